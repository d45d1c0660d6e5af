"""Top-p entropy (chunked, no grad) vs full entropy vs a naive top-p, on logits of Qwen's real vocabulary.

Each method runs in its own child process so its peak memory (ru_maxrss above the process's state right after the
logits exist) is its own; times are medians of a few repeats. Ratios are against the full-vocab entropy, measured
in the same run. Target (benchmarks/README.md): the chunked top-p adds no peak memory above the logits themselves.

    python benchmarks/bench_entropy.py [--tokens 4096] [--vocab 151936] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("full", "top_p_chunked", "top_p_naive")


def naive_top_p_entropy(logits, top_p):
    """The obvious version: sort the whole (N, V) block at once (several N×V temporaries)."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
    keep = (torch.cumsum(sorted_p, -1) - sorted_p) < top_p
    q = sorted_p * keep
    q = q / q.sum(-1, keepdim=True)
    return -(q * torch.log(q.clamp_min(1e-30))).sum(-1)


def child(method: str, tokens: int, vocab: int, repeats: int, top_p: float) -> dict:
    import torch

    from verl_tor.ops import compute_entropy_from_logits, compute_top_p_entropy_from_logits

    gen = torch.Generator().manual_seed(0)
    # filled in place, so the process peak before timing is the logits alone (2.3 GiB at 4096 x 151936 float32).
    # Peaked rows like an LLM's: a Zipf-shaped score (random exponent) over a random vocabulary order; the nucleus at
    # p=0.95 then spans tens to thousands of tokens, as in real rollouts.
    logits = torch.empty(tokens, vocab)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    for i in range(tokens):
        scale = 0.8 + 1.6 * torch.rand((), generator=gen)
        logits[i] = (-scale * torch.log(ranks))[torch.randperm(vocab, generator=gen)]

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = {
        "full": lambda: compute_entropy_from_logits(logits),
        "top_p_chunked": lambda: compute_top_p_entropy_from_logits(logits, top_p),
        "top_p_naive": lambda: naive_top_p_entropy(logits, top_p),
    }[method]
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method,
        "seconds": statistics.median(times),
        "extra_peak_gb": (peak_kb - base_kb) / 1024**2,
        "logits_gb": logits.numel() * 4 / 1024**3,
        "checksum": float(out.double().sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--child", choices=METHODS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.vocab, args.repeats, args.top_p)))
        return

    import torch

    rows = []
    for method in METHODS:
        cmd = [sys.executable, __file__, "--child", method, "--tokens", str(args.tokens), "--vocab", str(args.vocab)]
        cmd += ["--repeats", str(args.repeats), "--top-p", str(args.top_p)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = rows[0]
    print(f"# entropy over {args.tokens} tokens x vocab {args.vocab} (float32 logits {full['logits_gb']:.2f} GB)")
    print(f"# cores={os.cpu_count()} torch={torch.__version__} threads={torch.get_num_threads()} top_p={args.top_p}")
    print(f"# command: python benchmarks/bench_entropy.py --tokens {args.tokens} --vocab {args.vocab}")
    print("| method | seconds | x full | extra peak (GB) | extra peak / logits |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['seconds']:.2f} | {r['seconds'] / full['seconds']:.2f} | "
            f"{r['extra_peak_gb']:.2f} | {r['extra_peak_gb'] / r['logits_gb']:.2f} |"
        )
    chunked, naive = rows[1], rows[2]
    agree = abs(chunked["checksum"] - naive["checksum"]) / max(abs(naive["checksum"]), 1e-9)
    print(f"# chunked vs naive top-p entropy sum: relative difference {agree:.2e}")


if __name__ == "__main__":
    main()
