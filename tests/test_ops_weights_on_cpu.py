"""ToR weights and metrics: hand-written 2x6 batches per mode, the random control, properties, the public API."""

from __future__ import annotations

import importlib
import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import verl_tor.ops as ops
from verl_tor import metrics as M
from verl_tor.config import CHOICES, ToRConfig
from verl_tor.ops import build_segments, compute_tor_weights, select_tor_tokens

# 2 responses x 6 positions; row 0 has 5 valid tokens, row 1 has 4 (N = 9). Padding holds junk (9.9, NaN).
ENTROPY = torch.tensor(
    [
        [0.10, 2.00, 0.00, 1.50, 0.70, 9.90],
        [1.20, 0.00, 0.30, 0.90, 9.90, math.nan],
    ]
)
SENSITIVITY = torch.tensor(
    [
        [0.50, 0.85, 0.90, 0.20, 0.05, 9.90],
        [0.00, 0.80, 0.30, 0.60, 9.90, math.nan],
    ]
)
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0],
    ]
)
TOR = ToRConfig(enable=True)  # paper defaults: ρ_r = ρ_p = 0.3, γ_r = 1.0, γ_p = 0.5, batch scope


def weights_of(config: ToRConfig, entropy=ENTROPY, sensitivity=SENSITIVITY, mask=MASK, index=None, step=0):
    return compute_tor_weights(entropy, sensitivity, mask, config, index=index, step=step)


# ---------------------------------------------------------------------------------------------- hand-written
def test_tor_batch_scope_weights_and_metrics():
    weights, metrics = weights_of(TOR)
    # k = ceil(0.3 * 9) = 3 per set. T_r: entropy 2.0, 1.5, 1.2 -> (0,1) (0,3) (1,0).
    # T_p: sensitivity .90, .85, .80 -> (0,2) (0,1) (1,1). Overlap (0,1) keeps γ_r.
    want = torch.tensor(
        [
            [0.0, 1.0, 0.5, 1.0, 0.0, 0.0],
            [1.0, 0.5, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert weights.dtype == torch.float32
    assert torch.equal(weights, want)
    assert metrics == pytest.approx(
        {
            M.REASONING_FRAC: 3 / 9,
            M.PERCEPTION_FRAC: 3 / 9,
            M.OVERLAP_FRAC: 1 / 9,
            M.SELECTED_FRAC: 5 / 9,
            M.WEIGHT_MEAN: (3 * 1.0 + 2 * 0.5) / 9,
            M.ENTROPY_THRESHOLD: 1.2,
            M.SENSITIVITY_THRESHOLD: 0.8,
            M.ENTROPY_MEAN_SELECTED: (2.0 + 1.5 + 1.2) / 3,
            M.ENTROPY_MEAN_REST: (0.1 + 0.0 + 0.7 + 0.0 + 0.3 + 0.9) / 6,
            M.SENSITIVITY_MEAN_SELECTED: (0.9 + 0.85 + 0.8) / 3,
            M.SENSITIVITY_MEAN_REST: (0.5 + 0.2 + 0.05 + 0.0 + 0.3 + 0.6) / 6,
        }
    )


def test_tor_sequence_scope_weights():
    weights, metrics = weights_of(TOR.replace(scope="sequence"))
    # row 0: N=5 -> k=2: T_r (0,1) (0,3); T_p (0,2) (0,1). row 1: N=4 -> k=2: T_r (1,0) (1,3); T_p (1,1) (1,3).
    want = torch.tensor(
        [
            [0.0, 1.0, 0.5, 1.0, 0.0, 0.0],
            [1.0, 0.5, 0.0, 1.0, 0.0, 0.0],
        ]
    )
    assert torch.equal(weights, want)
    assert metrics[M.OVERLAP_FRAC] == pytest.approx(2 / 9)
    assert metrics[M.ENTROPY_THRESHOLD] == pytest.approx(0.9)  # the smallest selected entropy over all rows


def test_group_scope_with_numpy_uids():
    index = np.array(["q0", "q0"], dtype=object)  # one prompt group: the batch scope's answer
    assert torch.equal(weights_of(TOR.replace(scope="group"), index=index)[0], weights_of(TOR)[0])
    split = np.array(["q0", "q1"], dtype=object)  # one row per group: the sequence scope's answer
    assert torch.equal(
        weights_of(TOR.replace(scope="group"), index=split)[0], weights_of(TOR.replace(scope="sequence"))[0]
    )


def test_ablation_arms():
    reasoning, metrics_r = weights_of(TOR.replace(mode="reasoning_only"), sensitivity=None)
    assert torch.equal(
        reasoning,
        torch.tensor(
            [
                [0.0, 1.0, 0.0, 1.0, 0.0, 0.0],
                [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            ]
        ),
    )
    assert set(metrics_r) == {
        M.REASONING_FRAC,
        M.ENTROPY_THRESHOLD,
        M.ENTROPY_MEAN_SELECTED,
        M.ENTROPY_MEAN_REST,
        M.SELECTED_FRAC,
        M.WEIGHT_MEAN,
    }
    perception, metrics_p = weights_of(TOR.replace(mode="perception_only"), entropy=None)
    assert torch.equal(
        perception,
        torch.tensor(
            [
                [0.0, 0.5, 0.5, 0.0, 0.0, 0.0],
                [0.0, 0.5, 0.0, 0.0, 0.0, 0.0],
            ]
        ),
    )
    assert metrics_p[M.WEIGHT_MEAN] == pytest.approx(1.5 / 9)
    assert M.ENTROPY_THRESHOLD not in metrics_p and M.OVERLAP_FRAC not in metrics_p
    every, metrics_all = weights_of(TOR.replace(mode="all_tokens"), entropy=None, sensitivity=None)
    assert torch.equal(every, MASK.float())
    assert metrics_all == {M.SELECTED_FRAC: 1.0, M.WEIGHT_MEAN: 1.0}


def test_ratio_one_weights_every_valid_token_and_ratio_zero_needs_no_scores():
    every, metrics = weights_of(TOR.replace(reasoning_ratio=1.0))
    assert torch.equal(every, MASK.float())  # T_r = every valid token, so no token is left for γ_p
    assert metrics[M.SELECTED_FRAC] == 1.0 and metrics[M.OVERLAP_FRAC] == pytest.approx(3 / 9)
    # ρ_p = 0: no image-free pass was run, so sensitivity is None and T_p is empty
    only_r, metrics = weights_of(TOR.replace(perception_ratio=0.0), sensitivity=None)
    assert torch.equal(only_r, weights_of(TOR.replace(mode="reasoning_only"))[0])
    assert metrics[M.PERCEPTION_FRAC] == 0.0 and metrics[M.SENSITIVITY_THRESHOLD] == 0.0


def test_tokens_without_a_sensitivity_are_never_perception_tokens():
    """Row 1 is a text-only prompt (no S_t: sensitivity_mask False). Batch scope: T_p = ceil(0.3 * 5) = 2 of row 0's
    5 tokens, .90 (0,2) and .85 (0,1), even though row 1 holds .80; T_r still ranks all 9: (0,1) (0,3) (1,0)."""
    has_image = torch.tensor([[True] * 6, [False] * 6])
    weights, metrics = compute_tor_weights(ENTROPY, SENSITIVITY, MASK, TOR, sensitivity_mask=has_image)
    assert torch.equal(weights, torch.tensor([[0.0, 1.0, 0.5, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]))
    assert metrics[M.PERCEPTION_FRAC] == pytest.approx(2 / 9) and metrics[M.REASONING_FRAC] == pytest.approx(3 / 9)
    assert metrics[M.SENSITIVITY_MEAN_REST] == pytest.approx((0.5 + 0.2 + 0.05) / 3)  # over row 0's other tokens
    # sequence and group scopes: the text-only row's scope selects no perception token at all (not a random draw
    # among its tied zeros); row 0 keeps ceil(0.3 * 5) = 2
    zeros = torch.where(has_image, SENSITIVITY, 0.0)
    for scope, index in (("sequence", None), ("group", ["a", "b"])):
        cfg = TOR.replace(scope=scope, mode="perception_only")
        weights, _ = compute_tor_weights(ENTROPY, zeros, MASK, cfg, index=index, sensitivity_mask=has_image)
        assert (weights[1] == 0).all() and int((weights[0] > 0).sum()) == 2, scope


def test_perception_weight_zero_skips_perception_tokens():
    """mode=tor with γ_p = 0: T_p \\ T_r would get weight 0, so T_p is not ranked and needs no sensitivity."""
    cfg = TOR.replace(perception_weight=0.0)
    assert not cfg.needs_image_free_pass
    weights, metrics = weights_of(cfg, sensitivity=None)
    assert torch.equal(weights, weights_of(TOR.replace(mode="reasoning_only"))[0])
    assert M.PERCEPTION_FRAC not in metrics and M.OVERLAP_FRAC not in metrics
    assert metrics[M.REASONING_FRAC] == pytest.approx(3 / 9) and metrics[M.SELECTED_FRAC] == pytest.approx(3 / 9)


def test_all_masked_row_and_all_masked_batch():
    mask = MASK.clone()
    mask[1] = 0
    weights, _ = weights_of(TOR, mask=mask)
    # N = 5 -> k = 2: T_r (0,1) (0,3); T_p (0,2) (0,1)
    assert torch.equal(
        weights,
        torch.tensor(
            [
                [0.0, 1.0, 0.5, 1.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            ]
        ),
    )
    for mode in CHOICES["mode"]:
        for scope in CHOICES["scope"]:
            weights, metrics = weights_of(
                TOR.replace(mode=mode, scope=scope), mask=torch.zeros_like(MASK), index=["a", "b"]
            )
            assert torch.equal(weights, torch.zeros(2, 6)), (mode, scope)
            assert metrics and all(value == 0.0 for value in metrics.values()), (mode, scope, metrics)


def test_ties_break_by_seed_and_step():
    zeros = torch.zeros(4, 32)  # top-p entropy style: every entropy is exactly 0
    mask = torch.ones(4, 32)
    config = TOR.replace(mode="reasoning_only")
    first = weights_of(config, entropy=zeros, sensitivity=None, mask=mask, step=3)[0]
    assert int((first > 0).sum()) == math.ceil(0.3 * 128)
    assert torch.equal(first, weights_of(config, entropy=zeros, sensitivity=None, mask=mask, step=3)[0])
    other_steps = [weights_of(config, entropy=zeros, sensitivity=None, mask=mask, step=s)[0] for s in range(4, 8)]
    other_seeds = [
        weights_of(config.replace(seed=s), entropy=zeros, sensitivity=None, mask=mask, step=3)[0] for s in (1, 2)
    ]
    patterns = {tuple(w.flatten().tolist()) for w in [first, *other_steps, *other_seeds]}
    assert len(patterns) == 7


def test_missing_scores_raise_with_the_field_name():
    with pytest.raises(ValueError, match="entropy=None"):
        weights_of(TOR, entropy=None)
    with pytest.raises(ValueError, match="sensitivity=None"):
        weights_of(TOR.replace(mode="random"), sensitivity=None)
    with pytest.raises(ValueError, match="expected \\(2, 6\\)"):
        weights_of(TOR, entropy=ENTROPY[:, :5])


# ---------------------------------------------------------------------------------------------- the random control
def synthetic_batch(b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    entropy = torch.rand(b, t, generator=g) * (torch.rand(b, t, generator=g) < 0.5)  # half exact zeros
    sensitivity = torch.rand(b, t, generator=g)
    index = [f"uid{i // 4}" for i in range(b)]
    return entropy, sensitivity, mask, index


@pytest.mark.parametrize("scope", CHOICES["scope"])
def test_random_mode_matches_the_tor_weight_histogram_per_scope(scope):
    entropy, sensitivity, mask, index = synthetic_batch(16, 40, seed=0)
    config = TOR.replace(scope=scope)
    tor, _ = weights_of(config, entropy, sensitivity, mask, index=index)
    rand, metrics = weights_of(config.replace(mode="random"), entropy, sensitivity, mask, index=index)
    row_segment, num = build_segments(16, scope, index)

    def per_scope(selected):
        return torch.zeros(num, dtype=torch.long).index_add_(0, row_segment, selected.long().sum(dim=1))

    for value in (1.0, 0.5):
        assert torch.equal(per_scope(rand == value), per_scope(tor == value)), value
    assert not ((rand > 0) & ~mask).any()
    assert not torch.equal(rand, tor)  # drawn at random, not by score
    assert set(metrics) == {
        M.REASONING_FRAC,
        M.PERCEPTION_FRAC,
        M.SELECTED_FRAC,
        M.WEIGHT_MEAN,
        M.ENTROPY_MEAN_SELECTED,
        M.ENTROPY_MEAN_REST,
        M.SENSITIVITY_MEAN_SELECTED,
        M.SENSITIVITY_MEAN_REST,
    }
    assert metrics[M.REASONING_FRAC] == pytest.approx(float((rand == 1.0).sum() / mask.sum()))
    assert metrics[M.PERCEPTION_FRAC] == pytest.approx(float((rand == 0.5).sum() / mask.sum()))


def test_random_mode_draws_every_valid_token_equally_often():
    entropy, sensitivity, mask, _ = synthetic_batch(4, 10, seed=1)
    config = TOR.replace(mode="random")
    steps = 600
    hits_r = torch.zeros(4, 10)
    hits_any = torch.zeros(4, 10)
    for step in range(steps):
        weights, _ = weights_of(config, entropy, sensitivity, mask, step=step)
        hits_r += weights == 1.0
        hits_any += weights > 0
    n = int(mask.sum())
    tor, _ = weights_of(TOR, entropy, sensitivity, mask)
    p_r, p_any = float((tor == 1.0).sum()) / n, float((tor > 0).sum()) / n
    # std of a frequency over 600 draws is <= 0.021; 0.11 is > 5 std; positions outside the mask are never drawn
    assert ((hits_r[mask] / steps) - p_r).abs().max() < 0.11
    assert ((hits_any[mask] / steps) - p_any).abs().max() < 0.11
    assert hits_any[~mask].sum() == 0


# ---------------------------------------------------------------------------------------------- properties
@settings(max_examples=50, deadline=None)
@given(
    mode=st.sampled_from(CHOICES["mode"]),
    scope=st.sampled_from(CHOICES["scope"]),
    reasoning_ratio=st.sampled_from([0.1, 0.3, 0.5, 1.0]),
    perception_ratio=st.sampled_from([0.0, 0.3, 0.8]),
    reasoning_weight=st.sampled_from([0.5, 1.0, 1.5]),
    perception_weight=st.sampled_from([0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_weights_take_only_the_configured_values(
    mode, scope, reasoning_ratio, perception_ratio, reasoning_weight, perception_weight, seed
):
    if mode == "perception_only" and perception_ratio == 0:
        perception_ratio = 0.3  # the config refuses an arm that selects nothing
    config = ToRConfig(
        enable=True,
        mode=mode,
        scope=scope,
        reasoning_ratio=reasoning_ratio,
        perception_ratio=perception_ratio,
        reasoning_weight=reasoning_weight,
        perception_weight=perception_weight,
        seed=seed % 1000,
    )
    entropy, sensitivity, mask, index = synthetic_batch(6, 12, seed=seed)
    selection = select_tor_tokens(entropy, sensitivity, mask, config, index=index, step=seed % 7)
    weights = selection.weights
    allowed = {1.0} if mode == "all_tokens" else {reasoning_weight, perception_weight}
    allowed = {torch.tensor(value, dtype=torch.float32).item() for value in allowed}  # weights are float32
    assert set(weights[mask].unique().tolist()) <= allowed | {0.0}
    assert torch.equal(weights[~mask], torch.zeros(int((~mask).sum())))
    if mode == "tor":
        expected = torch.where(
            selection.reasoning, reasoning_weight, torch.where(selection.perception, perception_weight, 0.0)
        )
        assert torch.equal(weights, expected)
    assert all(isinstance(v, float) and math.isfinite(v) for v in selection.metrics.values())
    assert set(selection.metrics) <= set(M.ALL_METRICS) - {M.NO_IMAGE_FRAC, M.TIMING_NOIMG, M.TIMING_SELECT}
    again = select_tor_tokens(entropy, sensitivity, mask, config, index=index, step=seed % 7)
    assert torch.equal(again.weights, weights) and again.metrics == selection.metrics


# ---------------------------------------------------------------------------------------------- public API
def test_all_lists_exactly_the_public_api_of_the_submodules():
    # Liger-Kernel style: the package's __all__, each submodule's __all__ and what the submodules define agree.
    names = []
    for module_name in ("entropy", "select", "sensitivity", "weights"):
        module = importlib.import_module(f"verl_tor.ops.{module_name}")
        defined = {
            name
            for name, obj in vars(module).items()
            if not name.startswith("_")
            and (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__ == module.__name__
        }
        assert defined <= set(module.__all__), (module_name, defined - set(module.__all__))
        for name in module.__all__:
            assert getattr(ops, name) is getattr(module, name), name
        names += module.__all__
    assert sorted(ops.__all__) == sorted(names)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("scope", ["batch", "sequence", "group"])
@pytest.mark.parametrize("mode", ["tor", "random"])
def test_row_keys_make_ties_and_the_random_draw_independent_of_row_order(scope, mode):
    """verl's loop puts rows in the order their generations finish: with ``row_keys`` (the rows' identities) a
    shuffled batch selects the same tokens of each row, even where the cut falls inside exact-zero ties (top-p
    entropy) -- without them the seeded permutation of batch positions picks different tied tokens."""
    gen = torch.Generator().manual_seed(0)
    b, t = 12, 20
    entropy = torch.where(torch.rand(b, t, generator=gen) < 0.7, 0.0, torch.rand(b, t, generator=gen))  # 70% ties
    sensitivity = torch.where(torch.rand(b, t, generator=gen) < 0.5, 0.0, torch.rand(b, t, generator=gen))
    mask = torch.rand(b, t, generator=gen) < 0.9
    index = np.array([f"g{i // 4}" for i in range(b)], dtype=object)
    row_keys = torch.randint(0, 2**62, (b,), generator=gen)
    cfg = ToRConfig(enable=True, scope=scope, mode=mode)
    perm = torch.randperm(b, generator=gen)

    def weights(order, keys):
        w, _ = compute_tor_weights(
            entropy[order], sensitivity[order], mask[order], cfg, index=index[order.numpy()], step=3, row_keys=keys
        )
        return w

    base = torch.arange(b)
    keyed, shuffled = weights(base, row_keys), weights(perm, row_keys[perm])
    torch.testing.assert_close(shuffled, keyed[perm], rtol=0, atol=0)
    assert (keyed > 0).sum() > 0
    unkeyed, unkeyed_shuffled = weights(base, None), weights(perm, None)
    assert not torch.equal(unkeyed_shuffled, unkeyed[perm])  # the position-seeded draw depends on the order
