"""ToR token weights, w_t = γ_r on T_r, γ_p on T_p \\ T_r, 0 elsewhere (paper Eq. for w_t), and the ablation arms.

T_r is the top ρ_r of valid response tokens by the old policy's entropy, T_p the top ρ_p by visual sensitivity S_t,
both per ``tor.scope`` and with exact counts (``verl_tor.ops.select``). ``tor.mode`` picks the arm; the ``tor/*``
metrics describe the sets and weights of that arm. ``tor.enable`` is not read here: the caller decides whether to
call at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from verl_tor import metrics as M
from verl_tor.config import ToRConfig
from verl_tor.ops.select import (
    build_segments,
    compute_selection_threshold,
    compute_tie_keys,
    select_top_fraction,
    select_top_k_per_segment,
)

__all__ = ["ToRSelection", "compute_tor_weights", "make_generator", "select_tor_tokens"]

_RANKS_BY_ENTROPY = ("tor", "reasoning_only", "random")
_RANKS_BY_SENSITIVITY = ("tor", "perception_only", "random")


@dataclass(frozen=True)
class ToRSelection:
    """What ToR chose for one rollout batch; every tensor is ``(B, T)`` on the mask's device."""

    weights: torch.Tensor
    """float32 w_t in {0, γ_p, γ_r} ({0, 1} for ``all_tokens``); 0 on padding."""
    reasoning: torch.Tensor
    """bool, the tokens weighted as reasoning tokens: T_r (``random``: the drawn tokens given γ_r); all False when
    the mode does not rank by entropy."""
    perception: torch.Tensor
    """bool, T_p (``random``: the drawn tokens given γ_p); all False when the mode does not rank by sensitivity."""
    metrics: dict[str, float] = field(default_factory=dict)
    """``tor/*`` metrics (python floats, never NaN); see ``select_tor_tokens``."""


def _stream_salt(seed: int, step: int, stream: str = "") -> int:
    """A 63-bit salt from (``tor.seed``, training step, stream name): ``make_generator``'s seed, for hashed keys."""
    digest = hashlib.blake2b(f"verl_tor/{int(seed)}/{int(step)}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(seed: int, step: int, stream: str = "") -> torch.Generator:
    """A CPU generator seeded from (``tor.seed``, training step, stream name), identically in every process.

    Each step breaks ties differently but reproducibly, and the streams (``reasoning``, ``perception``, ``random``)
    are independent, so e.g. T_p's tie-breaks do not depend on whether T_r was computed first. blake2b rather than
    ``hash()``: python salts ``hash`` of strings per process.
    """
    return torch.Generator().manual_seed(_stream_salt(seed, step, stream))


def select_tor_tokens(
    entropy: torch.Tensor | None,
    sensitivity: torch.Tensor | None,
    response_mask: torch.Tensor,
    config: ToRConfig,
    index: Sequence[Any] | np.ndarray | torch.Tensor | None = None,
    step: int = 0,
    sensitivity_mask: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
) -> ToRSelection:
    """Rank, select and weight the response tokens of a rollout batch (``tor.mode`` picks the arm).

    Modes: ``tor`` γ_r on T_r, γ_p on T_p \\ T_r; ``reasoning_only`` γ_r on T_r; ``perception_only`` γ_p on T_p;
    ``random`` per scope |T_r ∪ T_p| valid tokens drawn uniformly, |T_r| of them weighted γ_r and the rest γ_p (the
    weight histogram of ``tor``, on random tokens); ``all_tokens`` 1 on every valid token.

    Args:
        entropy: ``(B, T)`` old-policy entropy per token, nats (full or top-p). Required by ``tor``,
            ``reasoning_only`` and ``random`` when ρ_r > 0; may be None otherwise.
        sensitivity: ``(B, T)`` S_t >= 0 (``compute_visual_sensitivity``). Required by ``tor``,
            ``perception_only`` and ``random`` when ρ_p > 0; may be None otherwise.
        response_mask: ``(B, T)`` bool or 0/1, valid response tokens. Padding always gets weight 0.
        config: ρ_r/ρ_p (``reasoning_ratio``/``perception_ratio``), γ_r/γ_p (``*_weight``), ``scope``, ``mode``,
            ``seed``.
        index: ``(B,)`` verl's uid per row; required for ``scope=group``.
        step: training step, mixed with ``config.seed`` into the tie-breaking seed.
        sensitivity_mask: ``(B, T)`` bool, the tokens that have a visual sensitivity (rows whose prompt has an image
            and whose image-free view was scored); default: every valid token. T_p is the top ρ_p of these tokens
            per scope, ceil(ρ_p·N_s) with N_s their count: a token without an image is never a perception token,
            and a scope without one (a text-only prompt's group or sequence) selects no T_p. Reasoning tokens and
            the fractions in the metrics still count every valid token.
        row_keys: ``(B,)`` int64 identity of each row (e.g. a hash of its prompt and response, as the stage
            computes it), optional: ties and the ``random`` draw then follow keys of (row identity, position, seed,
            step, stream) instead of a seeded permutation of batch positions, so the selection does not depend on the
            order of the rows (verl's loop does not fix it). Default: the seeded permutation.

    Returns:
        A ``ToRSelection``. Its metrics (fractions over valid tokens; 0.0 for empty sets, never NaN):
        ``tor``: every key of ``verl_tor.metrics`` that describes T_r, T_p and the weights;
        ``reasoning_only`` / ``perception_only``: the keys of their one set, plus selected_frac and weight_mean;
        ``random``: reasoning_frac / perception_frac and the entropy / sensitivity means describe the drawn γ_r /
        γ_p tokens (so the means show the control is random), plus selected_frac and weight_mean; no thresholds
        or overlap (the drawn sets have no cut and are disjoint);
        ``all_tokens``: selected_frac and weight_mean.
    """
    cfg = config
    valid = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    if valid.dim() != 2:
        raise ValueError(f"response_mask has shape {tuple(valid.shape)}; expected (B, T).")
    for name, tensor in (("entropy", entropy), ("sensitivity", sensitivity), ("sensitivity_mask", sensitivity_mask)):
        if tensor is not None and tensor.shape != valid.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(valid.shape)} (response_mask).")
    nothing = torch.zeros_like(valid)
    metrics: dict[str, float] = {}
    n_valid = int(torch.count_nonzero(valid))

    def frac(mask: torch.Tensor) -> float:
        return int(torch.count_nonzero(mask)) / n_valid if n_valid else 0.0

    if cfg.mode == "all_tokens":
        weights = valid.to(torch.float32)
        metrics[M.SELECTED_FRAC] = frac(valid)
        metrics[M.WEIGHT_MEAN] = 1.0 if n_valid else 0.0
        return ToRSelection(weights=weights, reasoning=nothing, perception=nothing, metrics=metrics)

    reasoning = nothing
    if cfg.mode in _RANKS_BY_ENTROPY:
        reasoning = _select(
            entropy, "entropy", cfg.reasoning_ratio, "tor.reasoning_ratio", valid, cfg, index, step, row_keys
        )
    perception = nothing
    candidates = valid if sensitivity_mask is None else valid & sensitivity_mask.to(torch.bool)
    # mode=tor with γ_p = 0 skips T_p (and the image-free pass, config.needs_image_free_pass): T_p \ T_r would get
    # weight 0 whatever it holds, so its metrics are left out
    ranks_perception = cfg.mode in _RANKS_BY_SENSITIVITY and not (cfg.mode == "tor" and cfg.perception_weight == 0)
    if ranks_perception:
        perception = _select(
            sensitivity,
            "sensitivity",
            cfg.perception_ratio,
            "tor.perception_ratio",
            candidates,
            cfg,
            index,
            step,
            row_keys,
        )

    if cfg.mode == "random":
        # Report on the sets that get the weights: the drawn γ_r tokens play T_r, the drawn γ_p tokens T_p.
        reasoning, perception = _draw_random_tokens(reasoning, perception, valid, cfg, index, step, row_keys)
    elif cfg.mode == "reasoning_only":
        perception = nothing
    elif cfg.mode == "perception_only":
        reasoning = nothing
    gets_gamma_p = perception & ~reasoning  # T_p \ T_r (random: already disjoint)
    weights = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    weights.masked_fill_(gets_gamma_p, cfg.perception_weight)
    weights.masked_fill_(reasoning, cfg.reasoning_weight)

    n_r, n_p_only = int(torch.count_nonzero(reasoning)), int(torch.count_nonzero(gets_gamma_p))
    # From counts, not weights.sum(): exact, and one pass less over a 25M-token batch.
    weight_sum = cfg.reasoning_weight * n_r + cfg.perception_weight * n_p_only
    n_nonzero = n_r * (cfg.reasoning_weight > 0) + n_p_only * (cfg.perception_weight > 0)
    metrics[M.WEIGHT_MEAN] = weight_sum / n_valid if n_valid else 0.0
    metrics[M.SELECTED_FRAC] = n_nonzero / n_valid if n_valid else 0.0
    if cfg.mode in _RANKS_BY_ENTROPY:
        metrics[M.REASONING_FRAC] = n_r / n_valid if n_valid else 0.0
        if cfg.mode != "random":
            metrics[M.ENTROPY_THRESHOLD] = compute_selection_threshold(entropy, reasoning) if n_r else 0.0
        if entropy is not None:
            metrics[M.ENTROPY_MEAN_SELECTED] = _compute_masked_mean(entropy, reasoning)
            metrics[M.ENTROPY_MEAN_REST] = _compute_masked_mean(entropy, valid & ~reasoning)
    if ranks_perception:
        metrics[M.PERCEPTION_FRAC] = frac(perception)
        if cfg.mode != "random":
            metrics[M.SENSITIVITY_THRESHOLD] = (
                compute_selection_threshold(sensitivity, perception) if sensitivity is not None else 0.0
            )
        if sensitivity is not None:
            metrics[M.SENSITIVITY_MEAN_SELECTED] = _compute_masked_mean(sensitivity, perception)
            metrics[M.SENSITIVITY_MEAN_REST] = _compute_masked_mean(sensitivity, candidates & ~perception)
    if cfg.mode == "tor" and ranks_perception:
        metrics[M.OVERLAP_FRAC] = frac(reasoning & perception)
    return ToRSelection(weights=weights, reasoning=reasoning, perception=perception, metrics=metrics)


def compute_tor_weights(
    entropy: torch.Tensor | None,
    sensitivity: torch.Tensor | None,
    response_mask: torch.Tensor,
    config: ToRConfig,
    index: Sequence[Any] | np.ndarray | torch.Tensor | None = None,
    step: int = 0,
    sensitivity_mask: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ToR token weights and their ``tor/*`` metrics (the arguments are those of ``select_tor_tokens``).

    Returns:
        ``weights`` ``(B, T)`` float32 in {0, γ_p, γ_r} ({0, 1} for ``all_tokens``), 0 on padding; ``metrics``
        a dict of python floats, never NaN.
    """
    selection = select_tor_tokens(
        entropy,
        sensitivity,
        response_mask,
        config,
        index=index,
        step=step,
        sensitivity_mask=sensitivity_mask,
        row_keys=row_keys,
    )
    return selection.weights, selection.metrics


def _select(
    scores: torch.Tensor | None,
    name: str,
    ratio: float,
    ratio_field: str,
    valid: torch.Tensor,
    cfg: ToRConfig,
    index: Any,
    step: int,
    row_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-ρ selection of one set (T_r by entropy or T_p by sensitivity), with its own tie-breaking stream."""
    if ratio == 0:
        return torch.zeros_like(valid)
    if scores is None:
        raise ValueError(
            f"tor.mode={cfg.mode!r} with {ratio_field}={ratio} ranks tokens by {name}, but {name}=None was given. "
            f"Fix: pass the {name} tensor (B, T)."
        )
    generator = make_generator(cfg.seed, step, name)
    tie_keys = (
        None if row_keys is None else compute_tie_keys(row_keys, valid.shape[1], _stream_salt(cfg.seed, step, name))
    )
    return select_top_fraction(
        scores, valid, ratio, scope=cfg.scope, index=index, generator=generator, tie_keys=tie_keys
    )


def _draw_random_tokens(
    reasoning: torch.Tensor,
    perception: torch.Tensor,
    valid: torch.Tensor,
    cfg: ToRConfig,
    index: Any,
    step: int,
    row_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``random`` control: per scope, |T_r ∪ T_p| valid tokens uniformly at random, |T_r| of them for γ_r.

    Returns ``(B, T)`` bool (drawn γ_r tokens, drawn γ_p tokens), disjoint. Uniform: the keys are iid and ties are
    broken uniformly, so the top-|T_r ∪ T_p| keys of a scope are a uniform subset, and the top-|T_r| keys among them
    a uniform subset of that.
    """
    generator = make_generator(cfg.seed, step, "random")
    row_segment, num_segments = build_segments(valid.shape[0], cfg.scope, index, device=valid.device)

    def count_per_segment(mask: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(num_segments, dtype=torch.long, device=valid.device)
        return counts.index_add_(0, row_segment, mask.sum(dim=1))

    if row_keys is None:
        keys = torch.rand(valid.shape, generator=generator).to(valid.device)  # (B, T) iid U[0, 1)
    else:  # the same uniform draw, keyed by (row identity, position): independent of the rows' order
        hashed = compute_tie_keys(row_keys, valid.shape[1], _stream_salt(cfg.seed, step, "random"))
        keys = (hashed.to(torch.float64) / float(1 << 31)).to(valid.device)
    n_drawn = count_per_segment(reasoning | perception)  # (S,) |T_r ∪ T_p| per scope
    drawn = select_top_k_per_segment(keys, valid, n_drawn, row_segment, generator=generator)
    drawn_r = select_top_k_per_segment(keys, drawn, count_per_segment(reasoning), row_segment, generator=generator)
    return drawn_r, drawn & ~drawn_r


def _compute_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` over ``mask`` (both ``(B, T)``) as a python float; 0.0 for an empty mask."""
    count = int(torch.count_nonzero(mask))
    if count == 0:
        return 0.0
    # `where`, not `*`: padding may hold NaN/inf. A float32 sum is fine here: torch reduces pairwise (relative error
    # ~1e-7 over 25M terms) and is ~20x faster on CPU than a float64 accumulator.
    return float(torch.where(mask, values.to(torch.float32), 0.0).sum()) / count
