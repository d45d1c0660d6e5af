"""Is the top-p entropy exactly the paper's definition? Three reproducible row sets, counted against exact references.

1. **One-token nuclei** (rows whose top token alone holds >= 95% of the mass): H must be exactly 0, an exact tie for
   ``select.py``'s seeded tie-breaking. Counts the rows that came out > 0 instead.
2. **Boundary ties** (probabilities on a 1/20 or 1/40 grid, p on the same grid): the mass before a token often
   equals p exactly, and the definition then stops (keep token i iff the mass before it is < p). Counts the rows
   whose H differs from the one of the kept set decided in exact rational arithmetic; and the issue's row
   (0.5, 0.3, 0.15, 0.05) at p = 0.8 (keep two: H = 0.662; three: H = 0.993).
3. **Continuous rows** (random logits, no ties): rows whose H differs from a float64 reference by > 1e-4 (the
   tolerance of the cut must not move typical rows); and the largest difference on heavy-tailed rows at Qwen's
   vocabulary, whose nucleus holds thousands of tokens.

Plus the arithmetic behind the cut: how far the float32 mass at the cut lands from its float64 value, in float32
ulps (2^-24 relative), for the old scheme (exp of float32 log-softmax, against p) and the current one (softmax, against
p times the row's summed softmax), against ``TOP_P_TOLERANCE`` (8 ulps); and how the boundary and continuous sets fare
at other tolerances (the current implementation with the constant patched).

    PYTHONPATH=. python benchmarks/bench_entropy_exactness.py        # [--scale 0.05 --max-vocab 4096]: a toy run
    PYTHONPATH=<checkout of an older commit> python benchmarks/bench_entropy_exactness.py   # the "before" numbers
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from fractions import Fraction

import torch

import verl_tor.ops.entropy as entropy_module
from verl_tor.ops import compute_top_p_entropy_from_logits

TOLERANCE = getattr(entropy_module, "TOP_P_TOLERANCE", 0.0)  # 0 before the tolerance existed


def one_token_rows(rows: int = 4000, vocab: int = 4096, seed: int = 0) -> tuple[int, int, float]:
    """(one-token rows, of them with H > 0, largest such H)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * (0.5 + torch.rand(rows, 1, generator=g))
    spike = torch.randint(0, vocab, (rows, 1), generator=g)
    logits = logits.scatter_add(1, spike, 6 + 14 * torch.rand(rows, 1, generator=g))
    top = torch.softmax(logits.double(), dim=-1).max(dim=-1).values
    one = top >= 0.95 * (1 + 1e-4)  # clear of the cut either way
    h = compute_top_p_entropy_from_logits(logits, 0.95)[one]
    return int(one.sum()), int((h > 0).sum()), float(h.max())


def exact_entropy(probs: list[Fraction], top_p: Fraction) -> float:
    """H of the kept set decided in rational arithmetic (keep while the mass before < p), in float64."""
    kept, before = [], Fraction(0)
    for p in sorted(probs, reverse=True):
        if before >= top_p:
            break
        kept.append(p)
        before += p
    z = sum(kept)
    return -sum(float(p / z) * math.log(float(p / z)) for p in kept if p > 0)


def boundary_rows(rows: int = 3000, seed: int = 0) -> tuple[int, int, int]:
    """(rows, rows with an exact tie at the cut, rows whose H is not the exact one)."""
    g = torch.Generator().manual_seed(seed)
    ties = wrong = 0
    vocab = 12
    for _ in range(rows):
        grid = 20 if bool(torch.rand((), generator=g) < 0.5) else 40
        support = int(torch.randint(2, 9, (), generator=g))
        # a random composition of `grid` units into `support` positive parts, scattered over the vocabulary
        cuts = sorted(torch.randperm(grid - 1, generator=g)[: support - 1].add(1).tolist())
        parts = [b - a for a, b in zip([0, *cuts], [*cuts, grid])]
        probs = [Fraction(n, grid) for n in parts]
        top_p = Fraction(int(torch.randint(1, grid, (), generator=g)), grid)
        cumulative, tie = Fraction(0), False
        for p in sorted(probs, reverse=True)[:-1]:
            cumulative += p
            tie |= cumulative == top_p
        ties += tie
        logits = torch.full((1, vocab), -math.inf)
        slots = torch.randperm(vocab, generator=g)[:support]
        logits[0, slots] = torch.tensor([math.log(n / grid) for n in parts], dtype=torch.float32)
        h = compute_top_p_entropy_from_logits(logits, float(top_p)).item()
        wrong += abs(h - exact_entropy(probs, top_p)) > 1e-5
    return rows, ties, wrong


def continuous_rows(rows: int = 2000, vocab: int = 2000, seed: int = 1) -> tuple[int, int]:
    """(rows, rows whose H differs from the float64 definition by > 1e-4) at p = 0.95."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * (0.5 + 3 * torch.rand(rows, 1, generator=g))
    spike = torch.randint(0, vocab, (rows, 1), generator=g)
    logits = logits.scatter_add(1, spike, 10 * torch.rand(rows, 1, generator=g))
    probs = torch.softmax(logits.double(), dim=-1).sort(dim=-1, descending=True).values
    before = probs.cumsum(dim=-1) - probs
    q = torch.where(before < 0.95, probs, 0.0)
    q = q / q.sum(dim=-1, keepdim=True)
    want = -torch.where(q > 0, q * q.log(), 0.0).sum(dim=-1)
    got = compute_top_p_entropy_from_logits(logits, 0.95).double()
    return rows, int(((got - want).abs() > 1e-4).sum())


def zipf_rows(rows: int = 32, vocab: int = 151936, seed: int = 0) -> tuple[int, float]:
    """(rows, largest |H - float64 H|) on ``bench_entropy.py``'s heavy-tailed rows at Qwen's vocabulary, p = 0.95."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = torch.stack(
        [
            (-(0.8 + 1.6 * torch.rand((), generator=g)) * ranks.log())[torch.randperm(vocab, generator=g)]
            for _ in range(rows)
        ]
    )
    probs = torch.softmax(logits.double(), dim=-1).sort(dim=-1, descending=True).values
    q = torch.where(probs.cumsum(dim=-1) - probs < 0.95, probs, 0.0)
    q = q / q.sum(dim=-1, keepdim=True)
    want = -torch.where(q > 0, q * q.log(), 0.0).sum(dim=-1)
    return rows, float((compute_top_p_entropy_from_logits(logits, 0.95).double() - want).abs().max())


def cut_mass_error(vocab: int, logit_offset: float, rows: int = 64, seed: int = 2) -> tuple[float, float]:
    """Largest |float32 mass - float64 mass| / float64 mass near p = 0.95, in float32 ulps: (old, current)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * (0.5 + 2 * torch.rand(rows, 1, generator=g))
    spike = torch.randint(0, vocab, (rows, 1), generator=g)
    logits = logits.scatter_add(1, spike, 15 * torch.rand(rows, 1, generator=g))
    logits = logits + logit_offset * (2 * torch.rand(rows, 1, generator=g) - 1)
    order = torch.sort(logits, dim=-1, descending=True).indices
    exact = torch.softmax(logits.double(), dim=-1).gather(1, order).cumsum(dim=-1)
    near = (exact - 0.95).abs() < 0.05
    old = torch.log_softmax(logits, dim=-1).gather(1, order).exp().cumsum(dim=-1, dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    current = probs.gather(1, order).cumsum(dim=-1, dtype=torch.float64) / probs.sum(dim=-1, keepdim=True)
    ulp = 2.0**-24
    return tuple(float(((m - exact).abs() / exact)[near].max()) / ulp for m in (old, current))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of every set's rows (tests: 0.05)")
    parser.add_argument("--max-vocab", type=int, default=151936, help="cap on the vocabulary sizes (tests: 4096)")
    args = parser.parse_args()

    def n(rows: int) -> int:
        return max(4, round(rows * args.scale))

    big = min(151936, args.max_vocab)
    print(f"# bench_entropy_exactness: {sys.executable} {' '.join(sys.argv)}")
    print(f"# verl_tor.ops.entropy from {entropy_module.__file__}; TOP_P_TOLERANCE = {TOLERANCE!r}")
    print(f"# torch {torch.__version__}, python {platform.python_version()}")
    rows, positive, largest = one_token_rows(n(4000))
    print("\n| set | rows | result |\n| --- | --- | --- |")
    print(f"| one-token nuclei (p = 0.95, V = 4096) | {rows} | {positive} with H > 0 (largest {largest:.2e}) |")
    rows, ties, wrong = boundary_rows(n(3000))
    print(
        f"| boundary grid (1/20, 1/40; p on the grid) | {rows} ({ties} with an exact tie) | {wrong} with H != exact |"
    )
    rows, moved = continuous_rows(n(2000))
    print(f"| continuous rows (p = 0.95, V = 2000) | {rows} | {moved} with \\|H - float64 H\\| > 1e-4 |")
    rows, worst = zipf_rows(n(32), big)
    print(f"| Zipf rows (p = 0.95, V = {big:,}) | {rows} | largest \\|H - float64 H\\| = {worst:.1e} |")
    issue = torch.tensor([[math.log(x) for x in (0.5, 0.3, 0.15, 0.05)]])
    h = compute_top_p_entropy_from_logits(issue, 0.8).item()
    print(f"| issue row (0.5, 0.3, 0.15, 0.05), p = 0.8 | 1 | H = {h:.4f} ({'two' if h < 0.8 else 'three'} tokens) |")
    print("\n| rows | logits | mass at the cut vs float64, worst, ulps: exp(log_softmax) | softmax / Σ softmax |")
    print("| --- | --- | --- | --- |")
    for vocab, offset in ((12, 0.0), (1000, 0.0), (4096, 10.0), (min(32000, big), 10.0), (big, 30.0)):
        old, current = cut_mass_error(vocab, offset)
        print(f"| 64 x {vocab} | peaked, shifted by up to ±{offset:g} | {old:.1f} | {current:.1f} |")
    if hasattr(entropy_module, "TOP_P_TOLERANCE"):
        print("\n| tolerance | boundary grid: H != exact | continuous: \\|H - float64 H\\| > 1e-4 |")
        print("| --- | --- | --- |")
        for exponent in (None, 22, 21, 20, 18):
            entropy_module.TOP_P_TOLERANCE = 0.0 if exponent is None else 2.0**-exponent
            label = "0" if exponent is None else f"2^-{exponent}"
            print(f"| {label} | {boundary_rows(n(3000))[2]} | {continuous_rows(n(2000))[1]} |")
        entropy_module.TOP_P_TOLERANCE = TOLERANCE


if __name__ == "__main__":
    main()
