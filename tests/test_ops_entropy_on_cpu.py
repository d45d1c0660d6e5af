"""Full and top-p entropy against python-loop references, hand-computed values and the escalation paths."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import verl_tor.ops.entropy as entropy_module
from verl_tor.ops import compute_entropy_from_logits, compute_top_p_entropy_from_logits
from verl_tor.ops.entropy import TOP_P_TOLERANCE


def reference_entropy(row: list[float]) -> float:
    """-Σ p log p in float64, one python row."""
    finite = [x for x in row if x != -math.inf]
    top = max(finite)
    z = sum(math.exp(x - top) for x in finite)
    probs = [math.exp(x - top) / z for x in finite]
    return -sum(p * math.log(p) for p in probs if p > 0)


def reference_top_p_entropy(row: list[float], top_p: float) -> float:
    """The paper's truncated entropy by the definition, in float64: sort, keep while the mass before < p (a mass
    within the documented relative tolerance of p counts as reaching it), renormalise."""
    finite = [x for x in row if x != -math.inf]
    top = max(finite)
    z = sum(math.exp(x - top) for x in finite)
    probs = sorted((math.exp(x - top) / z for x in finite), reverse=True)
    kept, before = [], 0.0
    for p in probs:
        if before >= top_p * (1 - TOP_P_TOLERANCE):
            break
        kept.append(p)
        before += p
    mass = sum(kept)
    return -sum((p / mass) * math.log(p / mass) for p in kept if p > 0)


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """A mix of peaked and flat rows, like an LLM's: a spike of random height over Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * (0.5 + 2.5 * torch.rand(rows, 1, generator=g))
    spike = torch.randint(0, vocab, (rows, 1), generator=g)
    return logits.scatter_add(1, spike, 12 * torch.rand(rows, 1, generator=g))


# ---------------------------------------------------------------------------------------------- hand-computed
def test_hand_computed_top_p_entropy():
    # probabilities 0.5, 0.3, 0.2 (in shuffled order, as logits)
    logits = torch.tensor([[math.log(0.3), math.log(0.5), math.log(0.2)]])
    h_full = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    h_two = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))  # {0.5, 0.3} renormalised
    assert compute_entropy_from_logits(logits).item() == pytest.approx(h_full, rel=1e-6)
    # p=0.4: mass before the top token is 0 < 0.4 -> keep it; before the second is 0.5 >= 0.4 -> stop: H = 0
    assert compute_top_p_entropy_from_logits(logits, 0.4).item() == pytest.approx(0.0, abs=1e-6)
    # p=0.7: keep 0.5 (before 0) and 0.3 (before 0.5 < 0.7); the 0.2 has 0.8 before it
    assert compute_top_p_entropy_from_logits(logits, 0.7).item() == pytest.approx(h_two, rel=1e-6)
    assert compute_top_p_entropy_from_logits(logits, 0.95).item() == pytest.approx(h_full, rel=1e-6)
    assert compute_top_p_entropy_from_logits(logits, 1.0).item() == pytest.approx(h_full, rel=1e-6)


def test_one_hot_and_uniform_rows():
    logits = torch.tensor([[50.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    full = compute_entropy_from_logits(logits)
    assert full[0].item() == pytest.approx(0.0, abs=1e-6)
    assert full[1].item() == pytest.approx(math.log(4), rel=1e-6)
    top_p = compute_top_p_entropy_from_logits(logits, 0.6)  # uniform: keep 3 tokens (before: 0, .25, .5 < .6)
    assert top_p.tolist() == pytest.approx([0.0, math.log(3)], abs=1e-6)


def test_masked_vocabulary_gives_no_nan():
    logits = torch.tensor([[0.0, -math.inf, 1.0, -math.inf], [2.0, 2.0, -math.inf, -math.inf]])
    for out in (compute_entropy_from_logits(logits), compute_top_p_entropy_from_logits(logits, 0.95)):
        assert torch.isfinite(out).all()
    assert compute_entropy_from_logits(logits)[1].item() == pytest.approx(math.log(2), rel=1e-6)
    assert compute_top_p_entropy_from_logits(logits, 0.9)[1].item() == pytest.approx(math.log(2), rel=1e-6)


# ---------------------------------------------------------------------------------------------- exactness
def dominant_token_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows whose top token alone holds >= 95% of the mass: random logits plus a spike of 8-20 on one token."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    spike = torch.randint(0, vocab, (rows, 1), generator=g)
    return logits.scatter_add(1, spike, 8 + 12 * torch.rand(rows, 1, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("levels", [(256, 4096, 32768), ()])  # the topk path and the full sort
def test_one_token_nucleus_is_exactly_zero(monkeypatch, dtype, levels):
    # 0 exactly, not rounding noise: noise of ~1e-8 outranks the exact zeros of other rows, so the ρ cut would take
    # these rows first instead of drawing among all of them (select.py's seeded tie-breaking).
    monkeypatch.setattr(entropy_module, "_TOP_P_CANDIDATES", levels)
    logits = dominant_token_logits(1000, 500, seed=0).to(dtype)
    probs = torch.softmax(logits.double(), dim=-1)
    one_token = probs.max(dim=-1).values >= 0.95 * (1 + 1e-4)  # clear of the boundary either way
    several = probs.max(dim=-1).values < 0.95 * (1 - 1e-4)
    assert int(one_token.sum()) > 500 and int(several.sum()) > 100
    h = compute_top_p_entropy_from_logits(logits, 0.95, chunk_size=256)
    assert int((h[one_token] != 0).sum()) == 0
    assert (h[several] > 0).all()
    assert not torch.signbit(h).any()  # +0.0, not -0.0
    # hand-built: 0.97 / 0.02 / 0.01 keeps the top token only; so does a one-hot row, and any row at tiny p
    hand = torch.tensor([[math.log(0.02), math.log(0.97), math.log(0.01)], [0.0, 60.0, -5.0]])
    assert compute_top_p_entropy_from_logits(hand, 0.95).tolist() == [0.0, 0.0]
    assert compute_top_p_entropy_from_logits(hand, 1e-6).tolist() == [0.0, 0.0]


def test_issue_row_at_the_exact_boundary_keeps_two_tokens():
    # (0.5, 0.3, 0.15, 0.05) at p = 0.8: the mass before the third token is exactly 0.8, not < 0.8: keep two.
    row = torch.tensor([[math.log(x) for x in (0.15, 0.5, 0.05, 0.3)]])
    two = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))  # 0.6616
    three = -sum(q * math.log(q) for q in (0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95))  # 0.9933
    assert compute_top_p_entropy_from_logits(row, 0.8).item() == pytest.approx(two, rel=1e-6)
    assert two == pytest.approx(0.6616, abs=1e-4) and three == pytest.approx(0.9933, abs=1e-4)
    # just either side of the boundary (4x the tolerance, ~4e-6) moving p ...
    step = 4 * TOP_P_TOLERANCE
    assert compute_top_p_entropy_from_logits(row, 0.8 * (1 - step)).item() == pytest.approx(two, rel=1e-6)
    assert compute_top_p_entropy_from_logits(row, 0.8 * (1 + step)).item() == pytest.approx(three, rel=1e-6)
    # ... or the row: 0.3 +- 1e-5 puts the mass before the third token at 0.8 +- 1e-5
    for delta, want in ((1e-5, 2), (-1e-5, 3)):
        probs = (0.5, 0.3 + delta, 0.15 - delta, 0.05)
        kept = [q / sum(probs[:want]) for q in probs[:want]]
        h = compute_top_p_entropy_from_logits(torch.tensor([[math.log(x) for x in probs]]), 0.8).item()
        assert h == pytest.approx(-sum(q * math.log(q) for q in kept), rel=1e-5)
    # within the tolerance (1/4 of it) the masses count as equal: still two tokens
    assert compute_top_p_entropy_from_logits(row, 0.8 * (1 + TOP_P_TOLERANCE / 4)).item() == pytest.approx(two, 1e-6)


@pytest.mark.parametrize("levels", [(256,), (2, 4), ()])  # topk with room, escalation, full sort
@pytest.mark.parametrize("offset", [0.0, 37.25, -80.0])  # softmax is shift-invariant; so must the cut be
def test_uniform_blocks_tie_exactly_at_k_over_n(monkeypatch, levels, offset):
    # n equal logits (and a negligible -inf tail): at p = k/n the mass before token k+1 is exactly p -> keep k
    # tokens, H = ln k; just above (4x the tolerance) -> k+1 tokens. Equal logits give bit-equal weights, so this
    # holds at any logit magnitude.
    monkeypatch.setattr(entropy_module, "_TOP_P_CANDIDATES", levels)
    for n in range(2, 13):
        logits = torch.full((n - 1, n + 3), -math.inf)
        logits[:, :n] = offset
        logits = logits[:, torch.randperm(n + 3, generator=torch.Generator().manual_seed(n))]
        for k in range(1, n):
            at = compute_top_p_entropy_from_logits(logits[k - 1 : k], k / n)
            above = compute_top_p_entropy_from_logits(logits[k - 1 : k], k / n * (1 + 4 * TOP_P_TOLERANCE))
            assert at.item() == pytest.approx(math.log(k), abs=1e-6), (n, k)
            assert above.item() == pytest.approx(math.log(k + 1), abs=1e-6), (n, k)


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_entropy_matches_reference(dtype):
    logits = random_logits(9, 50, seed=0).to(dtype)
    got = compute_entropy_from_logits(logits.reshape(3, 3, 50), chunk_size=4)  # 9 rows: chunks of 4, 4, 1
    assert got.shape == (3, 3) and got.dtype == torch.float32
    want = torch.tensor([reference_entropy(row) for row in logits.double().tolist()], dtype=torch.float64).reshape(3, 3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_top_p_entropy_matches_reference(top_p, chunk_size):
    logits = random_logits(13, 64, seed=1)
    got = compute_top_p_entropy_from_logits(logits, top_p, chunk_size=chunk_size)
    want = torch.tensor([reference_top_p_entropy(row, top_p) for row in logits.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [3, 256])
def test_top_p_one_equals_full_entropy(chunk_size):
    logits = random_logits(10, 300, seed=2).reshape(2, 5, 300)
    torch.testing.assert_close(
        compute_top_p_entropy_from_logits(logits, 1.0, chunk_size=chunk_size), compute_entropy_from_logits(logits)
    )


@pytest.mark.parametrize("levels", [(2, 8, 32), (4,), (1000,), ()])
def test_escalating_topk_levels_are_exact(monkeypatch, levels):
    # Tiny levels against a 100-token vocabulary exercise every path at test scale: rows done at the first level,
    # rows escalated, rows whose lower bound skips a level, and rows left for the full sort, sorted a slice at a
    # time (the real levels are 256 / 4096 / 32768 against 151,936 tokens).
    monkeypatch.setattr(entropy_module, "_TOP_P_CANDIDATES", levels)
    monkeypatch.setattr(entropy_module, "_SORT_ROWS", 3)  # the full sort in slices of 3 rows (real: 32)
    logits = random_logits(40, 100, seed=3)
    for top_p in (0.5, 0.95):
        got = compute_top_p_entropy_from_logits(logits, top_p, chunk_size=16)
        want = torch.tensor(
            [reference_top_p_entropy(row, top_p) for row in logits.double().tolist()], dtype=torch.float64
        )
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_real_levels_on_a_large_vocabulary():
    # 8 rows x 40,000 tokens: peaked rows stop at 256 candidates, flat rows go to 4096 / 32768 or the full sort.
    logits = random_logits(8, 40_000, seed=4)
    got = compute_top_p_entropy_from_logits(logits, 0.95)
    want = torch.tensor([reference_top_p_entropy(row, 0.95) for row in logits.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(2, 40),
    st.floats(0.05, 0.999),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
)
def test_property_top_p_entropy_matches_reference(rows, vocab, top_p, chunk_size, seed):
    logits = random_logits(rows, vocab, seed)
    got = compute_top_p_entropy_from_logits(logits, top_p, chunk_size=chunk_size)
    want = torch.tensor([reference_top_p_entropy(row, top_p) for row in logits.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert (got >= 0).all() and (got <= math.log(vocab) + 1e-4).all()


# ---------------------------------------------------------------------------------------------- contract
def test_top_p_entropy_has_no_grad_and_full_entropy_does():
    logits = random_logits(3, 20, seed=5).requires_grad_(True)
    assert not compute_top_p_entropy_from_logits(logits, 0.9).requires_grad
    full = compute_entropy_from_logits(logits, chunk_size=2)
    full.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_empty_batch_and_invalid_arguments():
    assert compute_entropy_from_logits(torch.zeros(0, 5)).shape == (0,)
    assert compute_top_p_entropy_from_logits(torch.zeros(2, 0, 5), 0.9).shape == (2, 0)
    for top_p in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top_p"):
            compute_top_p_entropy_from_logits(torch.zeros(1, 5), top_p)
    with pytest.raises(ValueError, match="chunk_size"):
        compute_top_p_entropy_from_logits(torch.zeros(1, 5), 0.9, chunk_size=0)


# ---------------------------------------------------------------------------------------------- the bracket method
# The default on accelerators (``method=None`` picks it off CPU); every check above, run through it on CPU, with the
# sample and the candidate count scaled to test vocabularies (real: 4096 samples, 30 candidates, V = 151,936).
@pytest.fixture
def small_bracket(monkeypatch):
    monkeypatch.setattr(entropy_module, "_BRACKET_SAMPLE", 16)
    monkeypatch.setattr(entropy_module, "_BRACKET_CANDIDATES", 3)
    monkeypatch.setattr(entropy_module, "_SORT_ROWS", 3)


@pytest.mark.parametrize("levels", [(256, 4096, 32768), (2,), ()])  # top-k first, tiny top-k, every row bracketed
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.999])
def test_bracket_matches_reference(monkeypatch, small_bracket, levels, top_p):
    monkeypatch.setattr(entropy_module, "_TOP_P_CANDIDATES", levels)
    logits = random_logits(40, 300, seed=6)
    # the same kept sets as the escalation (today's method; at p = 0.999 one row lies within TOP_P_TOLERANCE of the
    # cut, where both drop the cut token, as documented, and differ from the float64 definition by 3e-4)
    want = compute_top_p_entropy_from_logits(logits, top_p, method="escalate")
    reference = [reference_top_p_entropy(row, top_p) for row in logits.double().tolist()]
    torch.testing.assert_close(want.double(), torch.tensor(reference, dtype=torch.float64), rtol=1e-3, atol=1e-3)
    for chunk_size in (1, 7, 64):
        got = compute_top_p_entropy_from_logits(logits, top_p, chunk_size=chunk_size, method="bracket")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["every row sorted", "brackets that miss"])
def test_bracket_fallback_to_the_full_sort_is_exact(monkeypatch, small_bracket, case):
    if case == "every row sorted":
        monkeypatch.setattr(entropy_module, "_BRACKET_MAX_FRACTION", 0.0)
    else:  # a zero-width estimate: the exact narrowing then often finds the cut outside the bracket
        monkeypatch.setattr(entropy_module, "_BRACKET_SIGMAS", 0.0)
        monkeypatch.setattr(entropy_module, "_BRACKET_CANDIDATES", 1)
    monkeypatch.setattr(entropy_module, "_TOP_P_CANDIDATES", (2,))
    sorted_rows = []
    real_sort = torch.sort

    def counting_sort(t, *args, **kwargs):
        sorted_rows.append(t.shape[0] if t.shape[-1] == 200 else 0)
        return real_sort(t, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", counting_sort)
    logits = random_logits(30, 200, seed=7)
    got = compute_top_p_entropy_from_logits(logits, 0.9, chunk_size=8, method="bracket")
    want = torch.tensor([reference_top_p_entropy(row, 0.9) for row in logits.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert sum(sorted_rows) > 0  # the fallback really ran


def test_bracket_one_token_nucleus_and_boundary_ties(monkeypatch, small_bracket):
    monkeypatch.setattr(entropy_module, "_TOP_P_CANDIDATES", ())  # no top-k: every row goes through the bracket
    logits = dominant_token_logits(600, 500, seed=8)
    probs = torch.softmax(logits.double(), dim=-1)
    one_token = probs.max(dim=-1).values >= 0.95 * (1 + 1e-4)
    h = compute_top_p_entropy_from_logits(logits, 0.95, chunk_size=64, method="bracket")
    assert int(one_token.sum()) > 100 and int((h[one_token] != 0).sum()) == 0
    assert not torch.signbit(h).any()
    row = torch.tensor([[math.log(x) for x in (0.15, 0.5, 0.05, 0.3)]])
    two = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))
    assert compute_top_p_entropy_from_logits(row, 0.8, method="bracket").item() == pytest.approx(two, rel=1e-6)
    for n in range(2, 9):  # n equal logits: at p = k/n keep exactly k
        block = torch.zeros(1, n)
        for k in range(1, n):
            at = compute_top_p_entropy_from_logits(block, k / n, method="bracket")
            assert at.item() == pytest.approx(math.log(k), abs=1e-6), (n, k)


def test_bracket_makes_a_fixed_number_of_host_decisions():
    """The escalation asks the host per chunk and per level; the bracket once over all rows and twice (three counted
    calls: tolist, any, bool) per quarter chunk of rows short of p, however many chunks the top-k pass runs (issue 19:
    2,121 synchronisations per 16,384 rows)."""
    from torch.overrides import TorchFunctionMode

    class CountHostDecisions(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("nonzero", "item", "__bool__", "__int__", "__float__", "cpu", "tolist", "any", "all"):
                self.count += 1
            return func(*args, **(kwargs or {}))

    logits = random_logits(512, 400, seed=9)  # mostly peaked rows, some flat
    counts = {}
    for method in ("escalate", "bracket"):
        with CountHostDecisions() as mode:
            out = compute_top_p_entropy_from_logits(logits, 0.95, chunk_size=16, method=method)
        counts[method] = mode.count
        want = torch.tensor([reference_top_p_entropy(r, 0.95) for r in logits.double().tolist()], dtype=torch.float64)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    short = int((torch.softmax(logits, -1).topk(256).values.sum(-1) < 0.95).sum())
    assert counts["bracket"] <= 1 + 3 * math.ceil(short / 4), (counts, short)  # 32 top-k chunks cost nothing
    assert counts["escalate"] >= 32, counts  # at least one per chunk


def test_method_and_chunk_size_by_device():
    from verl_tor.ops.entropy import DEFAULT_ACCELERATOR_TOP_P_CHUNK_SIZE, default_top_p_chunk_size

    assert default_top_p_chunk_size("cpu") == 256 and default_top_p_chunk_size("cuda") == 2048
    assert DEFAULT_ACCELERATOR_TOP_P_CHUNK_SIZE == 2048
    with pytest.raises(ValueError, match="method='sort'.*Fix"):
        compute_top_p_entropy_from_logits(torch.zeros(1, 5), 0.9, method="sort")


# ---------------------------------------------------------------------------------------------- the radix method
# The default on accelerators since issue 19's second round (``method=None`` picks it off CPU). Below
# ``_RADIX_MIN_VOCAB`` (16,384) it sorts its short rows; ``radix_bins`` lowers that to 0 so the bit-pattern histograms
# run at test vocabularies (every check is also run once through the sort fallback).
@pytest.fixture
def radix_bins(monkeypatch):
    monkeypatch.setattr(entropy_module, "_RADIX_MIN_VOCAB", 0)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels", [(256, 4096, 32768), (2,), ()])  # top-k first, tiny top-k, every row through bins
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.999])
def test_radix_matches_reference(monkeypatch, radix_bins, dtype, levels, top_p):
    monkeypatch.setattr(entropy_module, "_TOP_P_CANDIDATES", levels)
    logits = random_logits(40, 300, seed=6).to(dtype)
    want = torch.tensor([reference_top_p_entropy(r, top_p) for r in logits.double().tolist()], dtype=torch.float64)
    # at p = 0.999 one float32 row has the mass before its cut token within float32 rounding of the cut: the
    # escalation (float32 softmax) drops that token (3e-4 off the float64 definition, as documented); radix decides
    # it so too where the top-k pass finishes the row, and like float64 where its bins do. Either is the answer.
    escalate = compute_top_p_entropy_from_logits(logits, top_p, method="escalate").double()
    at_the_cut = (escalate - want).abs() > 1e-5
    assert int(at_the_cut.sum()) <= 1
    for chunk_size in (1, 7, 64):
        got = compute_top_p_entropy_from_logits(logits, top_p, chunk_size=chunk_size, method="radix").double()
        assert got.dtype == torch.float64 and got.shape == (40,)
        torch.testing.assert_close(got[~at_the_cut], want[~at_the_cut], rtol=1e-5, atol=1e-5)
        either = torch.minimum((got - want).abs(), (got - escalate).abs())
        assert (either[at_the_cut] < 1e-5).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_sort_fallback_below_the_bins_vocabulary(monkeypatch, dtype):
    monkeypatch.setattr(entropy_module, "_TOP_P_CANDIDATES", ())
    logits = random_logits(20, 300, seed=10).to(dtype)  # 300 < _RADIX_MIN_VOCAB: sorted, the same values
    want = torch.tensor([reference_top_p_entropy(r, 0.9) for r in logits.double().tolist()], dtype=torch.float64)
    got = compute_top_p_entropy_from_logits(logits, 0.9, method="radix")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_radix_one_token_nucleus_is_exactly_zero(monkeypatch, radix_bins, dtype):
    monkeypatch.setattr(entropy_module, "_TOP_P_CANDIDATES", ())  # every row through the bins
    logits = dominant_token_logits(600, 500, seed=8).to(dtype)
    probs = torch.softmax(logits.double(), dim=-1)
    one_token = probs.max(dim=-1).values >= 0.95 * (1 + 1e-4)
    several = probs.max(dim=-1).values < 0.95 * (1 - 1e-4)
    h = compute_top_p_entropy_from_logits(logits, 0.95, chunk_size=64, method="radix")
    assert int(one_token.sum()) > 100 and int(several.sum()) > 50
    assert int((h[one_token] != 0).sum()) == 0 and (h[several] > 0).all()
    assert not torch.signbit(h).any()  # +0.0, not -0.0
    hand = torch.tensor([[math.log(0.02), math.log(0.97), math.log(0.01)], [0.0, 60.0, -5.0]]).to(dtype)
    assert compute_top_p_entropy_from_logits(hand, 0.95, method="radix").tolist() == [0.0, 0.0]
    assert compute_top_p_entropy_from_logits(hand, 1e-6, method="radix").tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 37.25, -80.0])  # exact in every dtype; the cut must not depend on it
def test_radix_ties_at_the_threshold(monkeypatch, radix_bins, dtype, offset):
    monkeypatch.setattr(entropy_module, "_TOP_P_CANDIDATES", ())
    # n equal logits: at p = k/n the mass before token k+1 is exactly p -> keep k (H = ln k); 4x the tolerance
    # above -> k+1. The tied tokens share one bin and are kept as a count.
    for n in range(2, 13):
        logits = torch.full((1, n + 3), -math.inf)
        logits[0, :n] = offset
        logits = logits[:, torch.randperm(n + 3, generator=torch.Generator().manual_seed(n))].to(dtype)
        for k in range(1, n):
            at = compute_top_p_entropy_from_logits(logits, k / n, method="radix")
            above = compute_top_p_entropy_from_logits(logits, k / n * (1 + 4 * TOP_P_TOLERANCE), method="radix")
            assert at.item() == pytest.approx(math.log(k), abs=1e-6), (n, k)
            assert above.item() == pytest.approx(math.log(k + 1), abs=1e-6), (n, k)
    # a tied block below the top, the cut inside it: 4 tokens at logit offset + 1 (weight e each) and 6 at offset
    # (weight 1), exact in every dtype; at p = (4e + j) / (4e + 6) the mass before the (j+1)-th lower token is
    # exactly p: keep j of them; 4x the tolerance above, j + 1
    row = torch.tensor([[offset + 1.0] * 4 + [offset] * 6]).to(dtype)
    for j in range(1, 6):
        top_p = (4 * math.e + j) / (4 * math.e + 6)
        for p, kept in ((top_p, j), (top_p * (1 + 4 * TOP_P_TOLERANCE), j + 1)):
            z = 4 * math.e + kept
            want = -4 * (math.e / z) * math.log(math.e / z) - kept * (1 / z) * math.log(1 / z)
            assert reference_top_p_entropy(row.double()[0].tolist(), p) == pytest.approx(want, rel=1e-9)
            assert compute_top_p_entropy_from_logits(row, p, method="radix").item() == pytest.approx(want, rel=1e-6)
    # the issue's row: (0.5, 0.3, 0.15, 0.05) at p = 0.8 keeps two
    issue = torch.tensor([[math.log(x) for x in (0.15, 0.5, 0.05, 0.3)]])
    assert compute_top_p_entropy_from_logits(issue, 0.8, method="radix").item() == pytest.approx(0.661563, abs=1e-6)


def test_radix_float32_second_pass_splits_the_cut_bin(radix_bins):
    # float32 logits within 2^-7 of each other share their high 16 bits (one first-pass bin): the cut is then found
    # among the low 16 bits. Values 1 + j 1e-5 (j < 600, with repeats) all lie in one or two high-half bins.
    g = torch.Generator().manual_seed(11)
    logits = 1.0 + 1e-5 * torch.randint(0, 600, (6, 2000), generator=g).float()
    logits[:, :3] += torch.tensor([4.0, 3.0, 2.0])  # a few clear leaders above the crowd
    for top_p in (0.2, 0.5, 0.9, 0.999):
        got = compute_top_p_entropy_from_logits(logits, top_p, method="radix")
        want = torch.tensor([reference_top_p_entropy(r, top_p) for r in logits.double().tolist()], dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_rows_needing_the_whole_vocabulary(radix_bins, dtype):
    vocab = 3000
    g = torch.Generator().manual_seed(12)
    flat = torch.randn(3, vocab, generator=g) * 0.01  # nearly uniform: p = 0.999 keeps almost every token
    equal = torch.zeros(2, vocab)  # exactly uniform: keep ceil(p V) tokens, ln of that count
    logits = torch.cat([flat, equal]).to(dtype)
    for top_p in (0.95, 0.999, 1 - 1e-9):
        got = compute_top_p_entropy_from_logits(logits, top_p, method="radix")
        want = [reference_top_p_entropy(r, top_p) for r in logits.double().tolist()]
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        assert got[3].item() == pytest.approx(math.log(min(vocab, math.ceil(top_p * (1 - TOP_P_TOLERANCE) * vocab))))
    # p = 1: the full entropy, whatever the method
    torch.testing.assert_close(
        compute_top_p_entropy_from_logits(logits, 1.0, method="radix"), compute_entropy_from_logits(logits)
    )


def test_radix_on_a_large_vocabulary_against_the_escalation():
    # the default _RADIX_MIN_VOCAB: 8 rows x 40,000 tokens go through the bins; bf16 (the GPU case) and float32
    logits = random_logits(8, 40_000, seed=4)
    for dtype in (torch.bfloat16, torch.float32):
        x = logits.to(dtype)
        want = [reference_top_p_entropy(r, 0.95) for r in x.double().tolist()]
        got = compute_top_p_entropy_from_logits(x, 0.95, method="radix")
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        escalate = compute_top_p_entropy_from_logits(x, 0.95, method="escalate")
        torch.testing.assert_close(got, escalate, rtol=1e-5, atol=2e-6)


def test_radix_makes_one_host_decision(monkeypatch, radix_bins):
    """One ``nonzero`` over all rows, none per chunk of the top-k pass nor per block of short rows."""
    from torch.overrides import TorchFunctionMode

    class CountHostDecisions(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("nonzero", "item", "__bool__", "__int__", "__float__", "cpu", "tolist", "any", "all"):
                self.count += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(entropy_module, "_RADIX_CPU_ROWS", 4)  # short rows in many blocks
    logits = random_logits(512, 400, seed=9)
    entropy_module._radix_bins(torch.bfloat16, logits.device)  # the table is built once, outside the count
    with CountHostDecisions() as mode:
        out = compute_top_p_entropy_from_logits(logits, 0.95, chunk_size=16, method="radix")
    want = torch.tensor([reference_top_p_entropy(r, 0.95) for r in logits.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    short = int((torch.softmax(logits, -1).topk(256).values.sum(-1) < 0.95).sum())
    assert short > 8 and mode.count == 1, (short, mode.count)


def test_default_method_by_device(monkeypatch):
    calls = []
    for name in ("_compute_top_p_entropy_radix", "_compute_top_p_entropy_bracketed"):
        monkeypatch.setattr(entropy_module, name, lambda rows, *a, name=name: calls.append(name) or rows[:, 0].float())
    logits = torch.zeros(2, 8, device="meta")  # a non-CPU device without a GPU: only the dispatch runs
    compute_top_p_entropy_from_logits(logits, 0.9)
    compute_top_p_entropy_from_logits(torch.zeros(2, 8), 0.9, method="bracket")
    assert calls == ["_compute_top_p_entropy_radix", "_compute_top_p_entropy_bracketed"]
