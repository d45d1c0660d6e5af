"""Exact top-fraction selection of response tokens per scope, with seeded random tie-breaking.

ToR keeps the top ρ of valid response tokens by a score (entropy for T_r, visual sensitivity for T_p; paper §3.2).
Three requirements shape this module:

- **Exact counts.** Every scope gets exactly ceil(ρ·N) of its N valid tokens, with ceil computed on the ratio as a
  rational (``count_top_fraction``): in floats, ceil(0.07·100) is 8 (float64) and ceil(0.3·50) is 16 (float32).
- **Scale.** A 512×12 rollout batch of 4096-token responses has 25M tokens; ``torch.quantile`` refused inputs above
  2^24 elements until pytorch#187574 (torch 2.14 accepts them, older ones do not), and a full sort of 25M floats
  takes seconds on a CPU. The batch scope finds the cut in linear time
  (a sampled bracket, then ``torch.kthvalue`` on the few values inside it); the sequence/group scopes lay each
  scope's rows side by side and take every scope's cut from one row-wise ``topk`` (very uneven scopes fall back to
  one segmented sort on 64-bit composite keys (segment id, score)).
- **Unbiased ties.** Top-p entropy gives many exact zeros, so the cut often falls inside a block of equal scores.
  Only the tied tokens at a scope's cut are resolved, by a seeded random permutation (``torch.randperm`` on a CPU
  generator), never by position: position order would favour early tokens of early responses.

Scores are compared in float32 (bf16/fp16 embed exactly; float64 inputs are rounded, so float64 values closer than
float32's resolution count as ties). NaN scores on valid tokens raise; ±inf are ordinary values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from verl_tor.config import CHOICES

__all__ = [
    "build_segments",
    "compute_selection_threshold",
    "compute_tie_keys",
    "count_top_fraction",
    "select_top_fraction",
    "select_top_k_per_segment",
]

_SCOPES = CHOICES["scope"]

_EXACT_KTH_BELOW = 1 << 20
"""Below this many elements the cut is a plain ``kthvalue``; above it, a sampled bracket skips most of the work."""

_BRACKET_SAMPLE = 1 << 16
"""Strided sample size used to bracket the cut: the bracket is ±4 binomial standard deviations (+16) wide around
the sample's estimate, so about 1-2% of the values fall inside and need the exact ``kthvalue``."""

_LOW32 = (1 << 32) - 1


def count_top_fraction(ratio: float, n: int | torch.Tensor) -> int | torch.Tensor:
    """ceil(ρ·N), exactly: how many tokens a scope with N valid tokens selects.

    Args:
        ratio: ρ in [0, 1], taken as the shortest decimal that prints as it (the number that was typed).
        n: N, a non-negative python int or an integer tensor of per-scope counts, any shape.

    Returns:
        ceil(ρ·N) with the type of ``n`` (int64 tensor for a tensor), in [0, N]; ρ=0 gives 0 and ρ=1 gives N.
    """
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} is invalid. Fix: give a fraction in [0, 1].")
    # The shortest decimal that prints as this float (python's repr) is the number that was typed: 0.1 -> 1/10,
    # whereas the float's binary value is a hair above 1/10 and would give ceil(0.1·10) = 2.
    frac = Fraction(repr(ratio))
    a, b = frac.numerator, frac.denominator
    if not isinstance(n, torch.Tensor):
        return (int(n) * a + b - 1) // b
    n = n.long()
    if n.numel() == 0 or a * max(int(n.max()), 1) + b < (1 << 63):  # int64 cannot overflow
        return (n * a + (b - 1)) // b  # ceil for n >= 0
    counts = [(int(m) * a + b - 1) // b for m in n.reshape(-1).tolist()]  # python ints: exact for any size
    return torch.tensor(counts, dtype=torch.long, device=n.device).reshape(n.shape)


def build_segments(
    batch_size: int,
    scope: str,
    index: Sequence[Any] | np.ndarray | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, int]:
    """The scope id of every row: the rows whose tokens are ranked together.

    Args:
        batch_size: B, rows of the padded batch.
        scope: ``batch`` (one scope: the paper's choice), ``sequence`` (one per row) or ``group`` (rows sharing
            the same ``index`` value).
        index: ``(B,)`` verl's ``uid`` per row: a numpy array, a list (strings, ints, any hashable) or a tensor.
            Required for ``group``, ignored otherwise.
        device: where the returned ids live.

    Returns:
        ``row_segment`` ``(B,)`` int64 in [0, S) and ``S``, the number of scopes (0 for an empty batch). Groups
        are numbered by first appearance (lists, numpy arrays) or by sorted value (tensors).
    """
    if scope == "batch":
        return torch.zeros(batch_size, dtype=torch.long, device=device), min(batch_size, 1)
    if scope == "sequence":
        return torch.arange(batch_size, dtype=torch.long, device=device), batch_size
    if scope != "group":
        raise ValueError(f"scope={scope!r} is invalid. Fix: choose one of {', '.join(_SCOPES)}.")
    if index is None:
        raise ValueError("scope='group' needs index, verl's uid per row (batch.non_tensor_batch['uid']). Fix: pass it.")
    if len(index) != batch_size:
        raise ValueError(f"index has {len(index)} entries for {batch_size} rows. Fix: give one uid per row.")
    if isinstance(index, torch.Tensor):
        _, inverse = torch.unique(index.reshape(-1), return_inverse=True)
        inverse = inverse.to(device=device, dtype=torch.long)
        return inverse, int(inverse.max()) + 1 if batch_size else 0
    keys = index.tolist() if isinstance(index, np.ndarray) else list(index)
    ids: dict[Any, int] = {}
    row_segment = [ids.setdefault(key, len(ids)) for key in keys]  # a python dict: any hashable uid, no sorting
    return torch.tensor(row_segment, dtype=torch.long, device=device), len(ids)


def select_top_fraction(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    ratio: float,
    scope: str = "batch",
    index: Sequence[Any] | np.ndarray | torch.Tensor | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    tie_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Select exactly ceil(ρ·N) highest-scoring valid tokens in every scope (N = the scope's valid tokens).

    Args:
        scores: ``(B, T)`` per-token score, any float dtype (compared in float32): entropy in nats for T_r,
            S_t for T_p. Values at masked positions are ignored (may be anything, NaN included).
        response_mask: ``(B, T)`` bool or 0/1, True/1 on valid response tokens.
        ratio: ρ in [0, 1]. 0 selects nothing, 1 every valid token.
        scope: ``batch`` | ``sequence`` | ``group``, see ``build_segments``.
        index: ``(B,)`` uid per row, for ``scope='group'``.
        seed: seeds the tie-breaking permutation when no ``generator`` is given.
        generator: a CPU ``torch.Generator`` for tie-breaking (advanced by the call); overrides ``seed``.
        tie_keys: ``(B, T)`` int64 in [0, 2^31), optional: tied tokens are taken in increasing key order instead of
            a seeded permutation of their positions. Keys derived from each token's content
            (``compute_tie_keys``) make the choice independent of the rows' order in the batch, which verl's loop
            does not fix (rows reach TransferQueue as their generations finish).

    Returns:
        ``(B, T)`` bool on ``scores.device``: the selected tokens. Masked tokens are never selected; an all-masked
        scope selects nothing. Use ``compute_selection_threshold`` for the smallest selected score.
    """
    _check_pair(scores, response_mask)
    row_segment, num_segments = build_segments(scores.shape[0], scope, index, device=scores.device)
    valid = _as_bool(response_mask)
    if num_segments == 1:  # one scope: a flat count is ~20x cheaper than per-row sums of a bool tensor
        per_segment = torch.count_nonzero(valid).reshape(1)
    else:
        per_segment = torch.zeros(num_segments, dtype=torch.long, device=scores.device)
        per_segment.index_add_(0, row_segment, valid.sum(dim=1))  # (S,) N per scope
    k = count_top_fraction(ratio, per_segment)
    return select_top_k_per_segment(scores, valid, k, row_segment, seed=seed, generator=generator, tie_keys=tie_keys)


def compute_tie_keys(row_keys: torch.Tensor, width: int, salt: int) -> torch.Tensor:
    """``(B,)`` int64 row identities -> ``(B, T)`` int64 tie-breaking keys in [0, 2^31), one per (row, position).

    A 64-bit finaliser (splitmix64's) of ``row_key ^ salt`` mixed with the position: uniform-looking keys that depend
    only on the row's identity, the position and ``salt`` (the seed, step and stream), not on where the row sits
    in the batch. Rows with the same identity get the same keys (their tokens are interchangeable then).
    """
    if row_keys.dim() != 1:
        raise ValueError(f"row_keys has shape {tuple(row_keys.shape)}; expected (B,)")
    position = torch.arange(width, dtype=torch.int64, device=row_keys.device)
    x = (row_keys.to(torch.int64) ^ _to_int64(salt)).unsqueeze(1) + position * _to_int64(0x9E3779B97F4A7C15)
    for multiplier in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB):  # int64 arithmetic wraps, as uint64 would
        x = (x ^ _shift_right(x, 30 if multiplier == 0xBF58476D1CE4E5B9 else 27)) * _to_int64(multiplier)
    x = x ^ _shift_right(x, 31)
    return x & ((1 << 31) - 1)


def _to_int64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on negative values)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def select_top_k_per_segment(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    k: torch.Tensor,
    row_segment: torch.Tensor,
    seed: int = 0,
    generator: torch.Generator | None = None,
    tie_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Select exactly ``k[s]`` highest-scoring valid tokens of every scope ``s`` (the engine of the module).

    Args:
        scores: ``(B, T)`` per-token score, any float dtype (compared in float32).
        response_mask: ``(B, T)`` bool or 0/1, valid response tokens.
        k: ``(S,)`` int tensor (or an int when S = 1), tokens to select per scope; clipped to [0, N_s].
        row_segment: ``(B,)`` int64 scope id of each row, in [0, S) (from ``build_segments``).
        seed, generator, tie_keys: tie-breaking, as in ``select_top_fraction``.

    Returns:
        ``(B, T)`` bool on ``scores.device``, exactly ``min(k[s], N_s)`` True per scope, all on valid tokens.
    """
    _check_pair(scores, response_mask)
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    valid = _as_bool(response_mask)
    if row_segment.shape != (scores.shape[0],):
        raise ValueError(f"row_segment has shape {tuple(row_segment.shape)}; expected ({scores.shape[0]},)")
    row_segment = row_segment.to(device=scores.device, dtype=torch.long)
    k = torch.as_tensor(k, dtype=torch.long, device=scores.device).reshape(-1)
    if row_segment.numel() and int(row_segment.max()) >= k.numel():
        raise ValueError(f"row_segment refers to scope {int(row_segment.max())} but k has {k.numel()} entries")
    # Masked tokens become -inf: then the k-th largest of a whole row/batch is the k-th largest valid score (k <= N),
    # and whatever the padding held (NaN included) is gone.
    filled = torch.where(valid, scores.to(torch.float32), -math.inf)  # (B, T) float32
    if bool(torch.isnan(filled).any()):
        raise ValueError("scores are NaN on some valid tokens. Fix: check the entropy/sensitivity inputs.")
    if tie_keys is not None and tie_keys.shape != valid.shape:
        raise ValueError(f"tie_keys has shape {tuple(tie_keys.shape)}; expected {tuple(valid.shape)}")
    flat_keys = None if tie_keys is None else tie_keys.reshape(-1).to(device=valid.device, dtype=torch.int64)
    if k.numel() == 1:
        return _select_top_k_global(filled, valid, int(k[0]), generator, flat_keys)
    grid = _segment_grid(row_segment, k.numel())
    if grid is None:  # very uneven scopes: a padded grid would waste memory
        return _select_top_k_segmented(filled, valid, k, row_segment, generator, flat_keys)
    rows, slots, size = grid  # scope s holds `size` rows side by side: one row of the grid per scope
    width = valid.shape[1]
    grid_scores = filled.new_full((k.numel(), size, width), -math.inf)
    grid_valid = torch.zeros((k.numel(), size, width), dtype=torch.bool, device=valid.device)
    grid_scores[rows, slots] = filled
    grid_valid[rows, slots] = valid
    grid_keys = None
    if flat_keys is not None:
        grid_keys = torch.zeros((k.numel(), size, width), dtype=torch.int64, device=valid.device)
        grid_keys[rows, slots] = flat_keys.reshape(valid.shape)
        grid_keys = grid_keys.reshape(-1)
    chosen = _select_top_k_rows(
        grid_scores.reshape(k.numel(), -1), grid_valid.reshape(k.numel(), -1), k, generator, grid_keys
    )
    return chosen.reshape(k.numel(), size, width)[rows, slots]


def compute_selection_threshold(scores: torch.Tensor, selected: torch.Tensor) -> float:
    """The smallest selected score (for batch scope: the global cut), 0.0 when nothing is selected.

    Args:
        scores: ``(B, T)`` the scores the selection ranked.
        selected: ``(B, T)`` bool, e.g. from ``select_top_fraction``.

    Returns:
        A python float in the scores' units.
    """
    if not bool(selected.any()):
        return 0.0
    return float(torch.where(selected, scores.to(torch.float32), math.inf).amin())


# ---------------------------------------------------------------------------------------------------- internals
def _select_top_k_global(
    filled: torch.Tensor, valid: torch.Tensor, k: int, generator: torch.Generator, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """One scope over the whole batch, linear time: find the cut, take everything above it, draw among its ties.

    ``filled`` is the ``(B, T)`` float32 scores with -inf on masked tokens.
    """
    n_valid = int(torch.count_nonzero(valid))
    k = max(0, min(k, n_valid))
    if k == 0:
        return torch.zeros_like(valid)
    if k == n_valid:
        return valid.clone()
    filled = filled.reshape(-1)  # (B*T,)
    cut = _find_kth_largest(filled, k)
    chosen = filled > cut  # (B*T,) never a masked token: those are -inf <= cut
    ties = (filled == cut) & valid.reshape(-1)  # `& valid`: a valid -inf score can tie with the padding
    need = k - int(torch.count_nonzero(chosen))
    n_ties = int(torch.count_nonzero(ties))
    if need == n_ties:
        chosen |= ties
    else:  # 0 < need < n_ties: a uniformly random `need`-subset of the tied tokens
        tied = torch.nonzero(ties).squeeze(1)  # (n_ties,) row-major, so the draw is reproducible
        if keys is None:
            pick = torch.randperm(n_ties, generator=generator)[:need].to(tied.device)
        else:  # stable: equal keys (identical rows) keep their row-major order
            pick = torch.sort(keys[tied], stable=True).indices[:need]
        chosen[tied[pick]] = True
    return chosen.reshape(valid.shape)


def _find_kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a 1-D float32 tensor (1 <= k <= len), as a 0-d tensor; exact.

    ``torch.kthvalue`` is linear but copies and partitions all 25M values (~0.4 s on 2 CPU cores). A strided sample
    brackets the answer in [lo, hi]; two counting passes check that the k-th largest is inside, and only the values
    inside the bracket are partitioned. If the check fails (an adversarial layout fooled the sample), the plain
    ``kthvalue`` runs: the result never depends on the sample, only the time does.
    """
    n = values.numel()
    if n <= _EXACT_KTH_BELOW:
        return torch.kthvalue(values, n - k + 1).values
    stride = n // _BRACKET_SAMPLE
    sample = torch.sort(values[stride // 2 :: stride], descending=True).values  # (s,) strided, deterministic
    s = sample.numel()
    q = k / n
    centre = q * s
    margin = 4.0 * math.sqrt(s * q * (1.0 - q)) + 16.0
    hi = sample[max(0, math.floor(centre - margin))]
    lo = sample[min(s - 1, math.ceil(centre + margin))]
    n_above = int(torch.count_nonzero(values > hi))
    inside = (values >= lo) & (values <= hi)
    n_inside = int(torch.count_nonzero(inside))
    if not n_above < k <= n_above + n_inside:
        return torch.kthvalue(values, n - k + 1).values
    if bool(lo == hi):  # the bracket is one tied value (e.g. a block of exact-zero entropies): it is the cut
        return hi
    middle = values[inside]
    return torch.kthvalue(middle, n_inside - (k - n_above) + 1).values


def _segment_grid(row_segment: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Lay the rows of each scope side by side: ``(scope, slot)`` per row and the slots per scope, or None.

    Sequence scope is one row per scope; group scope has n rows per prompt (verl's rollout.n), in any order. None
    when the largest scope has more than twice the mean number of rows (the padded grid would be mostly empty).
    """
    rows = row_segment
    sizes = torch.bincount(rows, minlength=num_segments)  # (S,)
    size = int(sizes.max()) if rows.numel() else 0
    if size == 0 or size * num_segments > 2 * rows.numel():
        return None
    order = torch.sort(rows, stable=True).indices
    start = torch.cumsum(sizes, 0) - sizes
    slots = torch.empty_like(rows)
    slots[order] = torch.arange(rows.numel(), device=rows.device) - start[rows[order]]
    return rows, slots, size


def _select_top_k_rows(
    filled: torch.Tensor,
    valid: torch.Tensor,
    k: torch.Tensor,
    generator: torch.Generator,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """One scope per row, all rows at once: each row's cut from one ``topk``, then a seeded draw among its ties.

    ``filled`` is ``(R, L)`` float32 scores with -inf on masked tokens; ``k`` is ``(R,)``.
    """
    k = torch.minimum(k.clamp_min(0), valid.sum(dim=1))  # (R,)
    k_max = int(k.max()) if k.numel() else 0
    if k_max == 0:
        return torch.zeros_like(valid)
    top = torch.topk(filled, k_max, dim=1, sorted=True).values  # (R, k_max), descending
    # A row selecting nothing gets cut +inf: nothing is above it, and its +inf ties get `need` = 0.
    cut = torch.where(k > 0, top.gather(1, (k - 1).clamp_min(0).unsqueeze(1)).squeeze(1), math.inf)  # (R,)
    chosen = filled > cut.unsqueeze(1)  # never a masked token: those are -inf <= cut
    ties = (filled == cut.unsqueeze(1)) & valid  # `& valid`: a valid -inf score can tie with the padding
    need = k - chosen.sum(dim=1)  # (R,)
    n_ties = ties.sum(dim=1)
    if bool((need < n_ties).any()):
        tied = torch.nonzero(ties.reshape(-1)).squeeze(1)  # (M,) row-major
        _take_random_ties(chosen.reshape(-1), tied, tied // filled.shape[1], need, n_ties, generator, keys)
    else:
        chosen |= ties
    return chosen


def _take_random_ties(
    chosen: torch.Tensor,
    tied: torch.Tensor,
    tied_segment: torch.Tensor,
    need: torch.Tensor,
    n_ties: torch.Tensor,
    generator: torch.Generator,
    keys: torch.Tensor | None = None,
) -> None:
    """Set ``chosen[t] = True`` for a uniformly random ``need[s]``-subset of each scope's tied positions (in place).

    A random permutation is the secondary sort key: within each scope the tied tokens come out in uniformly random
    order, and the first ``need`` of them are taken. ``tied`` must be in a fixed (row-major) order for the draw to be
    reproducible.
    """
    if keys is None:
        rank_key = torch.randperm(tied.numel(), generator=generator).to(tied.device)
    else:  # the callers' (flat) positions index the keys; keys < 2^31 fit below the segment bits
        rank_key = keys[tied]
    order = torch.sort((tied_segment << 32) | rank_key, stable=True).indices
    tied, tied_segment = tied[order], tied_segment[order]
    tie_start = torch.cumsum(n_ties, 0) - n_ties
    rank = torch.arange(tied.numel(), device=tied.device) - tie_start[tied_segment]
    chosen[tied[rank < need[tied_segment]]] = True


def _select_top_k_segmented(
    filled: torch.Tensor,
    valid: torch.Tensor,
    k: torch.Tensor,
    row_segment: torch.Tensor,
    generator: torch.Generator,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Many scopes at once: one sort of (segment, score) composite keys gives every scope's cut; draw among ties.

    ``filled`` is the ``(B, T)`` float32 scores with -inf on masked tokens (only valid positions are read).
    """
    num_segments = k.numel()
    width = valid.shape[1]
    position = torch.nonzero(valid.reshape(-1)).squeeze(1)  # (N,) flat positions of valid tokens, row-major
    chosen_flat = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    if position.numel() == 0:
        return chosen_flat.reshape(valid.shape)
    segment = row_segment[position // width]  # (N,)
    size = torch.bincount(segment, minlength=num_segments)  # (S,) N_s
    k = torch.minimum(k.clamp_min(0), size)
    # Descending-score key in [0, 2^32): float32 bits mapped to an order-preserving unsigned int, then reversed.
    # `+ 0.0` turns -0.0 into +0.0, which compare equal as floats but differ in bits.
    desc = _LOW32 - _order_key(filled.reshape(-1)[position] + 0.0)  # (N,) int64
    composite = (segment << 32) | desc  # sorts by segment, then score descending
    sorted_keys = torch.sort(composite).values
    start = torch.cumsum(size, 0) - size  # (S,) first sorted position of each scope
    has_cut = k > 0
    cut_at = torch.where(has_cut, start + k - 1, 0)
    # Scopes selecting nothing get cut -1: no desc key is < -1 or == -1, so none of their tokens is chosen.
    cut = torch.where(has_cut, sorted_keys[cut_at] & _LOW32, -1)  # (S,) cut as a desc key
    token_cut = cut[segment]
    chosen = desc < token_cut  # strictly above the cut
    ties = desc == token_cut
    need = k - torch.bincount(segment[chosen], minlength=num_segments)  # (S,) tied tokens still to take
    n_ties = torch.bincount(segment[ties], minlength=num_segments)
    if bool((need < n_ties).any()):
        tied = torch.nonzero(ties).squeeze(1)  # (M,)
        tied_keys = None if keys is None else keys[position]  # indexed like `chosen`: valid positions
        _take_random_ties(chosen, tied, segment[tied], need, n_ties, generator, tied_keys)
    else:
        chosen |= ties
    chosen_flat[position] = chosen
    return chosen_flat.reshape(valid.shape)


def _order_key(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in [0, 2^32) with the same order (IEEE-754 bits: flip negatives, offset positives)."""
    bits = values.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + (1 << 31), -1 - bits)


def _as_bool(response_mask: torch.Tensor) -> torch.Tensor:
    return response_mask if response_mask.dtype == torch.bool else response_mask != 0


def _check_pair(scores: torch.Tensor, response_mask: torch.Tensor) -> None:
    if scores.dim() != 2 or scores.shape != response_mask.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and response_mask {tuple(response_mask.shape)} must both be (B, T)."
        )
