"""Exact top-fraction token selection over valid response tokens, per scope, with seeded tie-breaking.

No ``torch.quantile``: it refuses inputs above 2^24 elements, and a 512×12×4096 rollout batch has 25M tokens.
The batch scope uses one ``kthvalue`` (linear time) and resolves only the ties at the cut; the per-sequence and
per-group scopes use one segmented sort. Ties are broken by a seeded random permutation, never by position (the
top-p entropy gives many exact zeros, and position-ordered ties would favour early tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["count_top_fraction", "select_top_fraction", "select_top_k_per_segment", "build_segments"]

_CEIL_EPS = 1e-6  # ceil(0.3 * 10) must be 3, not 4 (0.3 * 10 == 3.0000000000000004 in float64)


def count_top_fraction(ratio: float, n: torch.Tensor | int) -> torch.Tensor | int:
    """ceil(ratio · n), robust to float noise; works on ints and on integer tensors (per scope)."""
    if isinstance(n, torch.Tensor):
        k = torch.ceil(n.double() * ratio - _CEIL_EPS).clamp_min(0).long()
        return torch.minimum(k, n.long())
    return min(max(math.ceil(n * ratio - _CEIL_EPS), 0), n)


def build_segments(
    response_mask: torch.Tensor, scope: str, index: Sequence[Any] | np.ndarray | torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Segment id of every row for a scope.

    Args:
        response_mask: (B, T).
        scope: ``batch`` (one segment), ``sequence`` (one per row) or ``group`` (rows sharing ``index``).
        index: (B,) verl's ``uid`` per row (strings, ints or a tensor); required for ``group``.
    Returns:
        row_segment: (B,) int64, and the number of segments.
    """
    b = response_mask.shape[0]
    device = response_mask.device
    if scope == "batch":
        return torch.zeros(b, dtype=torch.long, device=device), 1
    if scope == "sequence":
        return torch.arange(b, device=device), b
    if scope == "group":
        if index is None:
            raise ValueError("scope='group' needs index (verl's uid per row)")
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        values = np.asarray(list(index), dtype=object).astype(str)
        if len(values) != b:
            raise ValueError(f"index has {len(values)} entries for {b} rows")
        _, inverse = np.unique(values, return_inverse=True)
        return torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=device), int(inverse.max()) + 1 if b else 0
    raise ValueError(f"unknown scope {scope!r}; choose batch, sequence or group")


def _tie_break_keys(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator).to(device)


def select_top_k_per_segment(
    values: torch.Tensor, segment: torch.Tensor, k: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick exactly ``k[s]`` largest ``values`` in every segment ``s`` (ties in seeded random order).

    Args:
        values: (N,) scores of the valid tokens.
        segment: (N,) int64 segment id of each token.
        k: (S,) int64 how many to pick per segment (<= its size).
        generator: seeded CPU generator (tie-breaking).
    Returns:
        chosen: (N,) bool; cut: (S,) the smallest chosen value per segment (0 where nothing is chosen).
    """
    n, s = values.numel(), k.numel()
    device = values.device
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    cut = torch.zeros(s, dtype=torch.float32, device=device)
    if n == 0 or int(k.sum()) == 0:
        return chosen, cut
    # order = segment asc, value desc, random asc: shuffle, then two stable sorts (value, then segment)
    perm = _tie_break_keys(n, generator, device)
    order = perm[torch.argsort(values[perm], descending=True, stable=True)]
    order = order[torch.argsort(segment[order], stable=True)]
    seg_sorted = segment[order]
    sizes = torch.bincount(segment, minlength=s)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(n, device=device) - starts[seg_sorted]
    take = rank < k[seg_sorted]
    chosen[order[take]] = True
    # the cut of a segment is its last taken value (values are in descending order within the segment)
    last = starts + k - 1
    has = k > 0
    cut[has] = values[order[last[has]]].float()
    return chosen, cut


def _select_batch(values: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """Batch scope in linear time: k-th largest by ``kthvalue``, then only the ties at the cut are shuffled."""
    n = values.numel()
    if k == 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device), 0.0
    if k == n:
        return torch.ones(n, dtype=torch.bool, device=values.device), float(values.min())
    cut = torch.kthvalue(values, n - k + 1).values  # the k-th largest value
    chosen = values > cut
    need = k - int(chosen.sum())
    ties = torch.nonzero(values == cut).squeeze(1)
    pick = ties[_tie_break_keys(ties.numel(), generator, values.device)[:need]]
    chosen[pick] = True
    return chosen, float(cut)


def select_top_fraction(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    ratio: float,
    scope: str = "batch",
    index: Sequence[Any] | np.ndarray | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_cut: bool = False,
):
    """Select exactly ceil(ratio · N) valid tokens with the highest ``scores`` in every scope.

    Args:
        scores: (B, T) per-token scores (e.g. entropy in nats, or S_t).
        response_mask: (B, T) 1/True on valid response tokens; masked tokens are never selected.
        ratio: ρ in [0, 1]; 0 selects nothing, 1 every valid token.
        scope: ``batch`` | ``sequence`` | ``group`` (see ``build_segments``); N counts the scope's valid tokens.
        index: (B,) uid per row, for ``group``.
        generator: seeded CPU ``torch.Generator`` for tie-breaking (default: seed 0).
        return_cut: also return the per-scope cut (the smallest selected score; 0 for empty selections).
    Returns:
        (B, T) bool selection; with ``return_cut``, ``(selection, cut (S,))``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio} must be in [0, 1]")
    if scores.shape != response_mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and response_mask {tuple(response_mask.shape)} differ")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    mask = response_mask.bool()
    row_segment, n_segments = build_segments(mask, scope, index)
    values = scores[mask]  # (N,) row-major, like nonzero(mask)
    selection = torch.zeros_like(mask)
    if scope == "batch":
        chosen, cut_value = _select_batch(values, count_top_fraction(ratio, values.numel()), generator)
        cut = torch.tensor([cut_value], dtype=torch.float32)
    else:
        token_segment = row_segment.unsqueeze(1).expand_as(mask)[mask]
        sizes = torch.bincount(token_segment, minlength=n_segments)
        chosen, cut = select_top_k_per_segment(values, token_segment, count_top_fraction(ratio, sizes), generator)
    selection[mask] = chosen
    return (selection, cut) if return_cut else selection
