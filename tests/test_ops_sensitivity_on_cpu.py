"""Visual sensitivity S_t: every registered method against an elementwise python reference, masking, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_tor.config import CHOICES
from verl_tor.ops import SENSITIVITY_FNS, compute_visual_sensitivity


def reference(method: str, a: float, b: float, h_a: float, h_b: float) -> float:
    """S_t of one token: a = log p with the image, b = log p without; h_* the two entropies."""
    if method == "abs_log_ratio":
        return abs(a - b)
    if method == "prob_diff":
        return abs(math.exp(a) - math.exp(b))
    if method == "entropy_diff":
        return abs(h_a - h_b)
    if method == "k3":
        r = min(max(b - a, -20.0), 20.0)
        return min(max(math.exp(r) - r - 1.0, 0.0), 10.0)
    raise AssertionError(method)


def random_inputs(b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    old_log_prob = -torch.rand(b, t, generator=g) * 4
    noimg_log_prob = -torch.rand(b, t, generator=g) * 4
    entropy = torch.rand(b, t, generator=g) * 3
    noimg_entropy = torch.rand(b, t, generator=g) * 3
    mask = (torch.rand(b, t, generator=g) < 0.7).float()
    return old_log_prob, noimg_log_prob, entropy, noimg_entropy, mask


def test_registry_matches_the_config_choices():
    assert tuple(SENSITIVITY_FNS) == CHOICES["sensitivity"]


@pytest.mark.parametrize("method", CHOICES["sensitivity"])
def test_every_method_matches_the_elementwise_reference(method):
    old, noimg, h, h_noimg, mask = random_inputs(3, 7, seed=0)
    got = compute_visual_sensitivity(old, noimg, method, entropy=h, noimg_entropy=h_noimg, response_mask=mask)
    want = torch.tensor(
        [
            [reference(method, *vals) * m for *vals, m in zip(*rows)]
            for rows in zip(old.tolist(), noimg.tolist(), h.tolist(), h_noimg.tolist(), mask.tolist())
        ]
    )
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    torch.testing.assert_close(got, want)
    assert (got >= 0).all()


def test_hand_computed_values():
    old = torch.tensor([[0.0, -1.0, -30.0, 0.0, -2.0, 0.0]])
    noimg = torch.tensor([[0.0, -2.0, 0.0, -30.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    torch.testing.assert_close(
        compute_visual_sensitivity(old, noimg, "abs_log_ratio", response_mask=mask),
        torch.tensor([[0.0, 1.0, 30.0, 30.0, 1.0, 0.0]]),
    )
    torch.testing.assert_close(
        compute_visual_sensitivity(old, noimg, "prob_diff", response_mask=mask),
        torch.tensor([[0.0, math.exp(-1) - math.exp(-2), 1.0, 1.0, math.exp(-1) - math.exp(-2), 0.0]]),
    )
    # k3 with r = noimg - old: r=-1 -> e^-1; r=+30 clamps to 20 and k3 to 10; r=-30 clamps to -20 -> 19 -> 10; r=1
    k3 = compute_visual_sensitivity(old, noimg, "k3", response_mask=mask)
    torch.testing.assert_close(k3, torch.tensor([[0.0, math.exp(-1), 10.0, 10.0, math.e - 2, 0.0]]))


def test_masked_positions_are_zero_even_when_inputs_there_are_garbage():
    old, noimg, h, h_noimg, mask = random_inputs(2, 6, seed=1)
    mask[1] = 0
    for tensor in (old, noimg, h, h_noimg):
        tensor[1] = math.nan
    for method in CHOICES["sensitivity"]:
        got = compute_visual_sensitivity(old, noimg, method, h, h_noimg, response_mask=mask.bool())
        assert torch.equal(got[1], torch.zeros(6)), method
        assert torch.isfinite(got).all()


def test_entropy_diff_needs_both_entropies():
    old, noimg, h, h_noimg, mask = random_inputs(2, 6, seed=2)
    with pytest.raises(ValueError, match="noimg_entropy"):
        compute_visual_sensitivity(old, noimg, "entropy_diff", entropy=h)
    with pytest.raises(ValueError, match="entropy and noimg_entropy"):
        compute_visual_sensitivity(old, noimg, "entropy_diff")
    # the other methods ignore the entropies
    assert compute_visual_sensitivity(old, noimg, "k3").shape == (2, 6)


def test_unknown_method_and_shape_mismatch_raise():
    old, noimg, _, _, mask = random_inputs(2, 6, seed=3)
    with pytest.raises(ValueError, match="abs_log_ratio, prob_diff, entropy_diff, k3"):
        compute_visual_sensitivity(old, noimg, "kl")
    with pytest.raises(ValueError, match="noimg_log_prob"):
        compute_visual_sensitivity(old, noimg[:, :5])
    with pytest.raises(ValueError, match="response_mask"):
        compute_visual_sensitivity(old, noimg, response_mask=mask[:1])


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from(CHOICES["sensitivity"]),
    st.lists(st.floats(-40.0, 0.0), min_size=1, max_size=8),
    st.integers(0, 2**31 - 1),
)
def test_property_nonnegative_symmetric_where_expected_and_bounded(method, log_probs, seed):
    old = torch.tensor([log_probs])
    noimg = old[:, torch.randperm(old.shape[1], generator=torch.Generator().manual_seed(seed))]
    h, h_noimg = -old, -noimg
    got = compute_visual_sensitivity(old, noimg, method, entropy=h, noimg_entropy=h_noimg)
    assert (got >= 0).all()
    if method != "k3":  # the symmetric scores; k3 estimates a directed KL
        swapped = compute_visual_sensitivity(noimg, old, method, entropy=h_noimg, noimg_entropy=h)
        torch.testing.assert_close(got, swapped)
    else:
        assert (got <= 10.0).all()
    same = compute_visual_sensitivity(old, old, method, entropy=h, noimg_entropy=h)
    assert torch.equal(same, torch.zeros_like(same))
