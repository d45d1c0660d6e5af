"""ToR token weights: w_t = γ_r on T_r, γ_p on T_p \\ T_r, 0 elsewhere (and the paper's ablation arms)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from verl_tor import metrics as M
from verl_tor.config import ToRConfig
from verl_tor.ops.select import build_segments, select_top_fraction, select_top_k_per_segment

__all__ = ["ToRSelection", "select_tor_tokens", "compute_tor_weights", "make_generator"]


def make_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded by (``tor.seed``, training step): reproducible, and different every step."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


@dataclass
class ToRSelection:
    """What ToR chose for one batch. All tensors (B, T)."""

    weights: torch.Tensor
    """float32 w_t (0 on padding)."""
    reasoning: torch.Tensor
    """bool T_r (all False when the mode does not rank by entropy)."""
    perception: torch.Tensor
    """bool T_p (all False when the mode does not rank by sensitivity)."""
    metrics: dict[str, float] = field(default_factory=dict)


def _masked_mean(x: torch.Tensor | None, mask: torch.Tensor) -> float:
    if x is None:
        return 0.0
    n = int(mask.sum())
    return float(x[mask].double().sum() / n) if n else 0.0


def select_tor_tokens(
    entropy: torch.Tensor | None,
    sensitivity: torch.Tensor | None,
    response_mask: torch.Tensor,
    config: ToRConfig,
    index: Sequence[Any] | np.ndarray | torch.Tensor | None = None,
    step: int = 0,
) -> ToRSelection:
    """Rank, select and weight the response tokens of a rollout batch.

    Args:
        entropy: (B, T) old-policy entropy per token, nats (full or top-p); unused by ``perception_only`` and
            ``all_tokens`` (may be None there).
        sensitivity: (B, T) S_t >= 0; unused by ``reasoning_only`` and ``all_tokens`` (may be None there).
        response_mask: (B, T) 1 on valid response tokens.
        config: ratios ρ_r/ρ_p, weights γ_r/γ_p, ``scope``, ``mode``, ``seed`` (``enable`` is the caller's business).
        index: (B,) verl's uid per row (needed for ``scope=group``).
        step: training step, mixed into the tie-breaking seed.
    """
    mask = response_mask.bool()
    cfg = config
    gen = make_generator(cfg.seed, step)
    none = torch.zeros_like(mask)
    need_r = cfg.mode in ("tor", "reasoning_only", "random")
    need_p = cfg.mode in ("tor", "perception_only", "random")
    for name, tensor, needed in (("entropy", entropy, need_r), ("sensitivity", sensitivity, need_p)):
        if needed and tensor is None:
            raise ValueError(f"tor.mode={cfg.mode!r} ranks tokens by {name}, but {name}=None was given")
    reasoning, cut_r = (
        select_top_fraction(entropy, mask, cfg.reasoning_ratio, cfg.scope, index, gen, return_cut=True)
        if need_r
        else (none, None)
    )
    perception, cut_p = (
        select_top_fraction(sensitivity, mask, cfg.perception_ratio, cfg.scope, index, gen, return_cut=True)
        if need_p
        else (none, None)
    )

    g_r, g_p = cfg.reasoning_weight, cfg.perception_weight
    if cfg.mode == "tor":
        weights = g_r * reasoning.float() + g_p * (perception & ~reasoning).float()
    elif cfg.mode == "reasoning_only":
        weights = g_r * reasoning.float()
    elif cfg.mode == "perception_only":
        weights = g_p * perception.float()
    elif cfg.mode == "all_tokens":
        weights = mask.float()
    elif cfg.mode == "random":
        weights = _random_weights(mask, reasoning, perception, cfg, index, gen)
    else:  # pragma: no cover - ToRConfig validates the mode
        raise ValueError(f"unknown mode {cfg.mode!r}")
    weights = weights * mask

    n_valid = int(mask.sum())
    frac = (lambda m: float(m.sum()) / n_valid) if n_valid else (lambda m: 0.0)
    out = {
        M.REASONING_FRAC: frac(reasoning),
        M.PERCEPTION_FRAC: frac(perception),
        M.OVERLAP_FRAC: frac(reasoning & perception),
        M.SELECTED_FRAC: frac(weights > 0),
        M.WEIGHT_MEAN: _masked_mean(weights, mask),
    }
    if need_r:
        out[M.ENTROPY_THRESHOLD] = float(cut_r.mean()) if cut_r.numel() else 0.0
        out[M.ENTROPY_MEAN_SELECTED] = _masked_mean(entropy, reasoning)
        out[M.ENTROPY_MEAN_REST] = _masked_mean(entropy, mask & ~reasoning)
    if need_p:
        out[M.SENSITIVITY_THRESHOLD] = float(cut_p.mean()) if cut_p.numel() else 0.0
        out[M.SENSITIVITY_MEAN_SELECTED] = _masked_mean(sensitivity, perception)
        out[M.SENSITIVITY_MEAN_REST] = _masked_mean(sensitivity, mask & ~perception)
    return ToRSelection(weights=weights.float(), reasoning=reasoning, perception=perception, metrics=out)


def _random_weights(mask, reasoning, perception, cfg, index, gen) -> torch.Tensor:
    """The control arm: per scope, |T_r ∪ T_p| uniformly random valid tokens; |T_r| of them get γ_r, the rest γ_p."""
    row_segment, n_segments = build_segments(mask, cfg.scope, index)
    token_segment = row_segment.unsqueeze(1).expand_as(mask)[mask]
    n_union = torch.bincount(token_segment, weights=(reasoning | perception)[mask].double(), minlength=n_segments)
    n_r = torch.bincount(token_segment, weights=reasoning[mask].double(), minlength=n_segments)
    keys = torch.rand(token_segment.numel(), generator=gen).to(mask.device)
    union, _ = select_top_k_per_segment(keys, token_segment, n_union.long(), gen)
    # among the drawn tokens, the |T_r| with the largest keys get γ_r: still uniform, as the keys are iid
    drawn_r, _ = select_top_k_per_segment(torch.where(union, keys, -1.0), token_segment, n_r.long(), gen)
    flat = torch.zeros(token_segment.numel(), dtype=torch.float32, device=mask.device)
    flat[union] = cfg.perception_weight
    flat[drawn_r] = cfg.reasoning_weight
    weights = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    weights[mask] = flat
    return weights


def compute_tor_weights(
    entropy: torch.Tensor | None,
    sensitivity: torch.Tensor | None,
    response_mask: torch.Tensor,
    config: ToRConfig,
    index: Sequence[Any] | np.ndarray | torch.Tensor | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ToR token weights and their ``tor/*`` metrics; see ``select_tor_tokens`` for the arguments.

    Returns:
        weights: (B, T) float32 in {0, γ_p, γ_r} (``all_tokens``: {0, 1}); metrics: python floats, never NaN.
    """
    selection = select_tor_tokens(entropy, sensitivity, response_mask, config, index=index, step=step)
    return selection.weights, selection.metrics
