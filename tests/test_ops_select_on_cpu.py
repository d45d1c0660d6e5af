"""Exact top-fraction selection: hand-written cases, a naive sort reference, properties, and a > 2^24-token batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_tor.config import CHOICES
from verl_tor.ops import (
    build_segments,
    compute_selection_threshold,
    count_top_fraction,
    select_top_fraction,
    select_top_k_per_segment,
)

SCOPES = CHOICES["scope"]

# 2 responses x 6 positions; row 0 has 5 valid tokens, row 1 has 3 (verl pads on the right).
SCORES = torch.tensor(
    [
        [0.10, 0.90, 0.50, 0.30, 0.70, 0.20],
        [0.80, 0.40, 0.60, 0.00, 0.95, 0.05],
    ]
)
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0],
    ]
)


def reference_select(scores, mask, ratio, row_segment):
    """Naive: per scope, sort the valid scores descending and keep the first ceil(ρN) (distinct scores only)."""
    chosen = torch.zeros(scores.shape, dtype=torch.bool)
    for segment in row_segment.unique().tolist():
        in_scope = mask.bool() & (row_segment == segment)[:, None]
        positions = in_scope.nonzero().tolist()
        positions.sort(key=lambda rc: -float(scores[rc[0], rc[1]]))
        k = math.ceil(round(ratio * len(positions), 9))  # fine for the ratios these tests draw
        for r, c in positions[:k]:
            chosen[r, c] = True
    return chosen


def segment_counts(mask: torch.Tensor, row_segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    return torch.zeros(num_segments, dtype=torch.long).index_add_(0, row_segment, mask.long().sum(dim=1))


# ---------------------------------------------------------------------------------------------- hand-written
def test_batch_scope_half_selects_the_global_top4():
    got = select_top_fraction(SCORES, MASK, 0.5, scope="batch")
    # valid scores: .1 .9 .5 .3 .7 | .8 .4 .6 -> N=8, k=4: .9 .8 .7 .6
    want = torch.tensor(
        [
            [0, 1, 0, 0, 1, 0],
            [1, 0, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(got, want)
    assert compute_selection_threshold(SCORES, got) == pytest.approx(0.6)


def test_sequence_scope_half_selects_ceil_per_row():
    got = select_top_fraction(SCORES, MASK, 0.5, scope="sequence")
    # row 0: N=5 -> k=3 (.9 .7 .5); row 1: N=3 -> k=2 (.8 .6); the masked .95 and .2 never count
    want = torch.tensor(
        [
            [0, 1, 1, 0, 1, 0],
            [1, 0, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(got, want)
    assert compute_selection_threshold(SCORES, got) == pytest.approx(0.5)


def test_group_scope_with_one_group_equals_batch_scope():
    index = np.array(["uid-a", "uid-a"], dtype=object)
    assert torch.equal(
        select_top_fraction(SCORES, MASK, 0.5, scope="group", index=index),
        select_top_fraction(SCORES, MASK, 0.5, scope="batch"),
    )
    # two groups of one row each is the sequence scope
    assert torch.equal(
        select_top_fraction(SCORES, MASK, 0.5, scope="group", index=["a", "b"]),
        select_top_fraction(SCORES, MASK, 0.5, scope="sequence"),
    )


@pytest.mark.parametrize("scope", SCOPES)
def test_ratio_zero_selects_nothing_and_ratio_one_every_valid_token(scope):
    index = [0, 1]
    none = select_top_fraction(SCORES, MASK, 0.0, scope=scope, index=index)
    every = select_top_fraction(SCORES, MASK, 1.0, scope=scope, index=index)
    assert not none.any()
    assert torch.equal(every, MASK.bool())
    assert compute_selection_threshold(SCORES, none) == 0.0


@pytest.mark.parametrize("scope", SCOPES)
def test_all_masked_row_selects_nothing_there(scope):
    mask = MASK.clone()
    mask[1] = 0
    got = select_top_fraction(SCORES, mask, 0.5, scope=scope, index=[0, 1])
    # only row 0 is valid (N=5 -> k=3 in every scope): .9 .7 .5
    want = torch.tensor(
        [
            [0, 1, 1, 0, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(got, want)
    all_masked = select_top_fraction(SCORES, torch.zeros_like(MASK), 0.5, scope=scope, index=[0, 1])
    assert not all_masked.any()
    assert compute_selection_threshold(SCORES, all_masked) == 0.0


@pytest.mark.parametrize("scope", SCOPES)
def test_ties_at_the_cut_take_exactly_the_missing_count(scope):
    # top-p entropy style: lots of exact zeros. Row 1's 1.0 is always in; the rest of each cut falls among zeros.
    scores = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    mask = torch.ones(2, 6)
    got = select_top_fraction(scores, mask, 0.5, scope=scope, index=[7, 8], seed=3)
    if scope == "batch":
        assert int(got.sum()) == 6  # ceil(0.5 * 12)
    else:
        assert got.sum(dim=1).tolist() == [3, 3]
    assert bool(got[1, 0])
    assert compute_selection_threshold(scores, got) == 0.0


@pytest.mark.parametrize("scope", SCOPES)
def test_ties_are_broken_uniformly_not_by_position(scope):
    # 8 tied tokens per row, 4 to take per row: every position should be picked ~half the time over many seeds.
    scores = torch.zeros(2, 8)
    mask = torch.ones(2, 8)
    picks = torch.zeros(2, 8)
    seeds = 1500
    for seed in range(seeds):
        picks += select_top_fraction(scores, mask, 0.5, scope=scope, index=[0, 1], seed=seed).float()
    freq = picks / seeds
    # std of a frequency over 1500 draws is <= 0.013; 0.07 is > 5 std, and position-ordered ties would give 1 or 0
    assert (freq - 0.5).abs().max() < 0.07, freq


def test_ratio_count_is_exact_where_float_rounding_would_overshoot():
    # why: the naive formulas overshoot. float64: 0.07 * 100 == 7.000000000000001; float32 (a per-scope count
    # tensor times ρ): 0.3 rounds up to 0.30000001, so 50 * 0.3 -> 15.000001.
    assert math.ceil(0.07 * 100) == 8
    assert torch.ceil(torch.tensor([50.0]) * 0.3).item() == 16
    assert count_top_fraction(0.07, 100) == 7
    assert count_top_fraction(0.3, 50) == 15
    assert count_top_fraction(0.3, torch.tensor([10, 50])).tolist() == [3, 15]
    assert count_top_fraction(0.3, 10) == 3
    cases = {(0.1, 10): 1, (0.7, 10): 7, (0.14, 50): 7, (0.3, 11): 4, (0.29, 100): 29, (0.57, 100): 57, (0.3, 0): 0}
    cases.update({(1 / 3, 3): 1, (0.0, 17): 0, (1.0, 17): 17, (0.3, 25_165_824): 7_549_748})
    cases.update({(1e-9, 1): 1, (1e-9, 10**9): 1, (1e-9, 10**9 + 1): 2, (1 - 1e-12, 10): 10})
    for (ratio, n), want in cases.items():
        assert count_top_fraction(ratio, n) == want, (ratio, n)
    n = torch.arange(0, 2000)
    assert count_top_fraction(1e-9, n).tolist() == [min(int(i), 1) for i in n]
    assert count_top_fraction(1e-300, n).tolist() == [min(int(i), 1) for i in n]  # beyond int64: python ints
    for ratio in (0.0, 0.1, 0.2, 0.3, 0.35, 0.5, 0.7, 0.95, 1.0):
        got = count_top_fraction(ratio, n)
        assert got.dtype == torch.int64
        assert got.tolist() == [count_top_fraction(ratio, int(i)) for i in n]
        # the exact rational answer for ratios with at most two decimals
        hundredths = round(ratio * 100)
        assert got.tolist() == [-(-hundredths * int(i) // 100) for i in n]
    with pytest.raises(ValueError, match="ratio"):
        count_top_fraction(1.5, 10)


def test_build_segments_accepts_verl_uids_in_every_form():
    uids = ["b", "a", "b", "c"]
    want = [0, 1, 0, 2]  # numbered by first appearance
    for index in (uids, np.array(uids, dtype=object), np.array(uids)):
        row_segment, num = build_segments(4, "group", index)
        assert row_segment.tolist() == want and num == 3
    row_segment, num = build_segments(4, "group", torch.tensor([5, 2, 5, 9]))
    assert num == 3 and row_segment[0] == row_segment[2] and len(set(row_segment.tolist())) == 3
    assert build_segments(4, "batch")[0].tolist() == [0, 0, 0, 0]
    assert build_segments(4, "sequence")[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="index"):
        build_segments(4, "group")
    with pytest.raises(ValueError, match="3 entries for 4 rows"):
        build_segments(4, "group", ["a", "b", "c"])
    with pytest.raises(ValueError, match="scope"):
        build_segments(4, "token")


def test_nan_on_valid_tokens_raises_but_nan_on_padding_is_ignored():
    scores = SCORES.clone()
    scores[0, 5] = math.nan  # padding
    assert torch.equal(select_top_fraction(scores, MASK, 0.5), select_top_fraction(SCORES, MASK, 0.5))
    scores[0, 0] = math.nan  # valid
    with pytest.raises(ValueError, match="NaN"):
        select_top_fraction(scores, MASK, 0.5)


def test_select_top_k_per_segment_takes_explicit_counts():
    row_segment = torch.tensor([0, 1])
    got = select_top_k_per_segment(SCORES, MASK, torch.tensor([1, 5]), row_segment)  # 5 > N=3: clipped
    want = torch.tensor(
        [
            [0, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_naive_sort_reference_on_random_batches(scope, dtype):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b, t = torch.randint(1, 9, (2,), generator=g).tolist()
        # distinct and exactly representable in bf16: a permutation of small integers
        scores = torch.randperm(b * t, generator=g).reshape(b, t).to(dtype) / 4
        mask = torch.rand(b, t, generator=g) < 0.7
        ratio = round(float(torch.rand(1, generator=g)), 2)
        index = torch.randint(0, 3, (b,), generator=g).tolist()
        row_segment, _ = build_segments(b, scope, index)
        got = select_top_fraction(scores, mask, ratio, scope=scope, index=index)
        assert torch.equal(got, reference_select(scores.float(), mask, ratio, row_segment)), (scores, mask, ratio)


@pytest.mark.parametrize("uneven", [False, True])
def test_group_scope_row_grid_and_segmented_sort_agree_with_the_reference(uneven):
    """Scopes of equal size (verl's n rollouts per uid) take the row-wise topk grid; very uneven ones the sort."""
    from verl_tor.ops.select import _segment_grid

    g = torch.Generator().manual_seed(3)
    b, t = 48, 37
    if uneven:  # one prompt holds 40 of the 48 rows: a padded grid would be 8x the batch
        index = [0] * 40 + list(range(1, 9))
    else:  # 4 prompts x 12 rollouts, shuffled as verl may order them
        index = torch.randperm(b, generator=g).remainder(4).tolist()
    row_segment, num = build_segments(b, "group", index)
    assert (_segment_grid(row_segment, num) is None) == uneven
    scores = torch.randperm(b * t, generator=g).reshape(b, t).float()
    mask = torch.rand(b, t, generator=g) < 0.6
    for ratio in (0.0, 0.05, 0.3, 0.8, 1.0):
        got = select_top_fraction(scores, mask, ratio, scope="group", index=index)
        assert torch.equal(got, reference_select(scores, mask, ratio, row_segment)), ratio
    ties = torch.randint(0, 3, (b, t), generator=g).float()  # ties at every cut: exact counts per scope
    got = select_top_fraction(ties, mask, 0.3, scope="group", index=index, seed=1)
    for s in range(num):
        rows = row_segment == s
        assert int(got[rows].sum()) == count_top_fraction(0.3, int(mask[rows].sum()))


@pytest.mark.parametrize("layout", ["random", "ascending", "periodic", "two_values", "constant"])
def test_large_batch_scope_bracket_is_exact_for_any_layout(layout):
    # 2^21 tokens: above the plain-kthvalue size, so the sampled bracket (and its fallback) runs.
    b, t = 512, 4096
    g = torch.Generator().manual_seed(1)
    n = b * t
    flat = {
        "random": lambda: torch.rand(n, generator=g),
        "ascending": lambda: torch.arange(n, dtype=torch.float32),
        # the strided sample sees only the spikes: the bracket misses and the exact fallback must run
        "periodic": lambda: (
            (torch.arange(n) % (n // 2**16) == (n // 2**16) // 2).float() * 5 + torch.rand(n, generator=g)
        ),
        "two_values": lambda: (torch.rand(n, generator=g) < 0.2).float(),
        "constant": lambda: torch.zeros(n),
    }[layout]()
    scores = flat.reshape(b, t)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    for ratio in (0.01, 0.3, 0.9):
        got = select_top_fraction(scores, mask, ratio, seed=5)
        k = count_top_fraction(ratio, int(mask.sum()))
        assert int(got.sum()) == k
        assert not (got & ~mask).any()
        lowest_selected = scores[got].min()
        highest_rest = scores[mask & ~got].max()
        assert lowest_selected >= highest_rest
        want_cut = torch.sort(scores[mask], descending=True).values[k - 1]
        assert compute_selection_threshold(scores, got) == float(want_cut)


# ---------------------------------------------------------------------------------------------- properties
@st.composite
def batches(draw, distinct: bool):
    b = draw(st.integers(1, 6))
    t = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if distinct:
        scores = torch.randperm(b * t, generator=g).reshape(b, t).float()
    else:  # few values: ties everywhere
        scores = torch.randint(0, 3, (b, t), generator=g).float()
    mask = torch.rand(b, t, generator=g) < draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    index = torch.randint(0, 3, (b,), generator=g).tolist()
    ratio = draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]) | st.floats(0.0, 1.0))
    scope = draw(st.sampled_from(SCOPES))
    return scores, mask, index, ratio, scope


@settings(max_examples=60, deadline=None)
@given(batches(distinct=False), st.integers(0, 1000))
def test_property_exact_count_per_scope_and_cut_separates(batch, seed):
    scores, mask, index, ratio, scope = batch
    got = select_top_fraction(scores, mask, ratio, scope=scope, index=index, seed=seed)
    row_segment, num = build_segments(scores.shape[0], scope, index)
    assert torch.equal(
        segment_counts(got, row_segment, num), count_top_fraction(ratio, segment_counts(mask, row_segment, num))
    )
    assert not (got & ~mask.bool()).any()
    for segment in range(num):
        rows = (row_segment == segment)[:, None]
        chosen, rest = scores[got & rows], scores[mask & ~got & rows]
        if chosen.numel() and rest.numel():
            assert chosen.min() >= rest.max()


@settings(max_examples=40, deadline=None)
@given(batches(distinct=True), st.integers(0, 2**31 - 1))
def test_property_rows_permute_with_the_selection(batch, perm_seed):
    scores, mask, index, ratio, scope = batch
    perm = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    got = select_top_fraction(scores, mask, ratio, scope=scope, index=index)
    permuted = select_top_fraction(scores[perm], mask[perm], ratio, scope=scope, index=[index[i] for i in perm])
    assert torch.equal(permuted, got[perm])


@settings(max_examples=40, deadline=None)
@given(batches(distinct=True), st.sampled_from([0.25, 1.0, 8.0]), st.integers(-50, 50))
def test_property_invariant_to_positive_scaling_and_shift(batch, scale, shift):
    scores, mask, index, ratio, scope = batch
    got = select_top_fraction(scores, mask, ratio, scope=scope, index=index)
    # small integers times powers of two plus integers: exact in float32, so the order really is unchanged
    assert torch.equal(select_top_fraction(scores * scale + shift, mask, ratio, scope=scope, index=index), got)


@settings(max_examples=40, deadline=None)
@given(batches(distinct=True))
def test_property_matches_reference_when_scores_are_distinct(batch):
    scores, mask, index, ratio, scope = batch
    ratio = round(ratio, 2)
    row_segment, _ = build_segments(scores.shape[0], scope, index)
    got = select_top_fraction(scores, mask, ratio, scope=scope, index=index)
    assert torch.equal(got, reference_select(scores, mask, ratio, row_segment))


@pytest.mark.parametrize("scope", SCOPES)
def test_same_seed_same_tie_breaks_and_different_seeds_differ(scope):
    scores = torch.zeros(4, 64)  # 256 tied tokens
    mask = torch.ones(4, 64)
    index = [0, 0, 1, 1]
    first = select_top_fraction(scores, mask, 0.5, scope=scope, index=index, seed=11)
    assert torch.equal(first, select_top_fraction(scores, mask, 0.5, scope=scope, index=index, seed=11))
    generator = torch.Generator().manual_seed(11)
    assert torch.equal(first, select_top_fraction(scores, mask, 0.5, scope=scope, index=index, generator=generator))
    others = [select_top_fraction(scores, mask, 0.5, scope=scope, index=index, seed=s) for s in range(5)]
    assert len({tuple(o.flatten().tolist()) for o in others}) == 5


# ---------------------------------------------------------------------------------------------- scale
def test_batch_above_2_pow_24_tokens_selects_exactly(monkeypatch):
    # (4100, 4100) = 16.81M > 2^24 = 16.78M elements (a real 512x12x4096 rollout batch has 25M tokens).
    # torch.quantile refused inputs above 2^24 elements until pytorch#187574 (2026; torch 2.14 here accepts them,
    # the torch of a GPU image may not), so select.py never calls it: the patch below fails the test if it does.
    b = t = 4100
    assert b * t > 2**24
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(b, t, generator=g)
    scores[scores < 0.5] = 0.0  # top-p entropy style ties at zero
    scores = (scores * 256).floor() / 256  # and ties everywhere else
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    try:
        torch.quantile(scores.reshape(-1)[: 2**24 + 1], 0.7)
    except RuntimeError as error:  # older torch: the documented refusal
        assert "too large" in str(error)

    def refuse(*args, **kwargs):
        raise AssertionError("selection must not use torch.quantile")

    monkeypatch.setattr(torch, "quantile", refuse)
    monkeypatch.setattr(torch.Tensor, "quantile", refuse)
    for scope, index in (("batch", None), ("group", [i // 12 for i in range(b)])):
        got = select_top_fraction(scores, mask, 0.3, scope=scope, index=index, seed=1)
        row_segment, num = build_segments(b, scope, index)
        want = count_top_fraction(0.3, segment_counts(mask, row_segment, num))
        assert torch.equal(segment_counts(got, row_segment, num), want)
        assert not (got & ~mask).any()
        if scope == "batch":
            assert scores[got].min() >= scores[mask & ~got].max()
