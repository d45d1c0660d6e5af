"""How often the full-vocabulary entropy and the paper's top-p (0.95) entropy pick the same reasoning tokens.

Why ``tor.entropy=full`` is the default (verl already computes it; top-p costs a vocabulary sort per token): on
LLM-like next-token distributions -- a few plausible continuations holding a random share of the mass over a
Zipf tail with a random exponent -- the two rankings select nearly the same top-ρ tokens. Verify on your own
model with ``verl-tor inspect ... tor.entropy=top_p`` before relying on it.

    python benchmarks/bench_entropy_agreement.py
"""

from __future__ import annotations

import torch

from verl_tor.ops import compute_entropy_from_logits, compute_top_p_entropy_from_logits, select_top_fraction


def main() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, n = 32000, 4000
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    rows = []
    for _ in range(n):
        s = 0.8 + 1.6 * torch.rand((), generator=g, dtype=torch.float64)
        tail = ranks ** (-s)
        tail /= tail.sum()
        h = int(torch.randint(1, 6, (1,), generator=g))
        m = torch.rand((), generator=g, dtype=torch.float64)
        head = torch.zeros(vocab, dtype=torch.float64)
        head[:h] = 1.0 / h
        rows.append((m * head + (1 - m) * tail)[torch.randperm(vocab, generator=g)])
    logits = torch.stack(rows).log().float()
    full, top_p = compute_entropy_from_logits(logits), compute_top_p_entropy_from_logits(logits, 0.95)
    mask = torch.ones(1, n, dtype=torch.bool)
    print("# command: python benchmarks/bench_entropy_agreement.py")
    print("| ρ_r | share of full-entropy T_r also in top-p-entropy T_r |")
    print("| --- | --- |")
    for rho in (0.2, 0.3, 0.5):
        a = select_top_fraction(full[None], mask, rho)
        b = select_top_fraction(top_p[None], mask, rho)
        print(f"| {rho} | {(a & b).sum().item() / a.sum().item():.3f} |")


if __name__ == "__main__":
    main()
