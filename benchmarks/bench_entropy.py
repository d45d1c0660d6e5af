"""Top-p entropy before and after vs the full entropy vs a naive top-p, on logits of Qwen's real vocabulary (CPU).

"before" is today's implementation up to commit 3f33d2f, kept verbatim in ``_entropy_reference.py``; "after" is
``verl_tor.ops`` with its CPU default (the ``escalate`` method, chunk 256) and, for comparison, the ``bracket``
method and the ``radix`` method (the default off CPU since issue 19's second round), both at the CPU chunk (256).
Each method runs in its own child process so its peak memory (ru_maxrss above the process's state right after the
logits exist) is its own; times are medians of a few repeats. Ratios are against the full-vocab entropy, measured in
the same run. Rows: ``zipf`` (Zipf-shaped scores with a random exponent in [0.8, 2.4] over a random vocabulary order:
nuclei from tens of tokens to most of the vocabulary, float32) or issue 19's bf16 mixtures ``llm`` / ``wide``
(``bench_gpu.make_logits``).

    python benchmarks/bench_entropy.py [--tokens 4096] [--vocab 151936] [--repeats 3] [--rounds 1]
        [--rows zipf|llm|wide] [--methods full,top_p_before,...]
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

METHODS = ("full", "top_p_before", "top_p_after", "top_p_after_bracket", "top_p_after_radix", "top_p_naive")


def naive_top_p_entropy(logits, top_p):
    """The obvious version: sort the whole (N, V) block at once (several N×V temporaries)."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
    keep = (torch.cumsum(sorted_p, -1) - sorted_p) < top_p
    q = sorted_p * keep
    q = q / q.sum(-1, keepdim=True)
    return -(q * torch.log(q.clamp_min(1e-30))).sum(-1)


def make_rows(kind: str, tokens: int, vocab: int):
    import torch

    if kind != "zipf":
        from bench_gpu import make_logits

        return make_logits(kind, tokens, vocab, "cpu")
    gen = torch.Generator().manual_seed(0)
    # filled in place, so the process peak before timing is the logits alone (2.3 GiB at 4096 x 151936 float32).
    # Peaked rows like an LLM's: a Zipf-shaped score (random exponent) over a random vocabulary order; the nucleus at
    # p=0.95 then spans tens to thousands of tokens, as in real rollouts.
    logits = torch.empty(tokens, vocab)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    for i in range(tokens):
        scale = 0.8 + 1.6 * torch.rand((), generator=gen)
        logits[i] = (-scale * torch.log(ranks))[torch.randperm(vocab, generator=gen)]
    return logits


def child(method: str, tokens: int, vocab: int, repeats: int, top_p: float, kind: str) -> dict:
    import torch
    from _entropy_reference import compute_top_p_entropy_from_logits as top_p_before

    from verl_tor.ops import compute_entropy_from_logits, compute_top_p_entropy_from_logits

    logits = make_rows(kind, tokens, vocab)

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = {
        "full": lambda: compute_entropy_from_logits(logits),
        "top_p_before": lambda: top_p_before(logits, top_p),
        "top_p_after": lambda: compute_top_p_entropy_from_logits(logits, top_p),
        "top_p_after_bracket": lambda: compute_top_p_entropy_from_logits(logits, top_p, method="bracket"),
        "top_p_after_radix": lambda: compute_top_p_entropy_from_logits(logits, top_p, method="radix"),
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
        "logits_gb": logits.numel() * logits.element_size() / 1024**3,
        "checksum": float(out.double().sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--rows", choices=("zipf", "llm", "wide"), default="zipf")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (full is always run)")
    parser.add_argument("--rounds", type=int, default=1, help="run every method this many times, round robin")
    parser.add_argument("--child", choices=METHODS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.vocab, args.repeats, args.top_p, args.rows)))
        return

    import torch

    methods = ["full", *(m for m in args.methods.split(",") if m in METHODS and m != "full")]
    runs = {m: [] for m in methods}
    # round robin: on a shared machine the load drifts between processes; every round runs every method once, and a
    # method's time is its best round (each round's time is already the median of --repeats calls)
    for _ in range(args.rounds):
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, "--tokens", str(args.tokens)]
            cmd += ["--vocab", str(args.vocab), "--repeats", str(args.repeats), "--top-p", str(args.top_p)]
            cmd += ["--rows", args.rows]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for method in methods:
        best = min(runs[method], key=lambda r: r["seconds"])
        rows.append({**best, "extra_peak_gb": max(r["extra_peak_gb"] for r in runs[method])})
    full = rows[0]
    print(f"# entropy over {args.tokens} tokens x vocab {args.vocab}, rows {args.rows} ({full['logits_gb']:.2f} GB)")
    print(f"# cores={os.cpu_count()} torch={torch.__version__} threads={torch.get_num_threads()} top_p={args.top_p}")
    print(f"# load average before: {os.getloadavg()[0]:.1f}")
    print(f"# command: python benchmarks/bench_entropy.py {' '.join(sys.argv[1:])}")
    print(f"# seconds: best of {args.rounds} round(s), each the median of {args.repeats} calls")
    print("| method | seconds | x full | extra peak (GB) | extra peak / logits |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['seconds']:.2f} | {r['seconds'] / full['seconds']:.2f} | "
            f"{r['extra_peak_gb']:.2f} | {r['extra_peak_gb'] / r['logits_gb']:.2f} |"
        )
    by = {r["method"]: r for r in rows}
    if "top_p_before" in by and "top_p_after" in by:
        ratio = {m: by[m]["seconds"] / full["seconds"] for m in by if m.startswith("top_p")}
        print(
            "# top-p / full on CPU: before "
            + f"{ratio['top_p_before']:.2f}, after {ratio['top_p_after']:.2f}"
            + (f"; bracket method {ratio['top_p_after_bracket']:.2f}" if "top_p_after_bracket" in ratio else "")
            + (f"; radix method {ratio['top_p_after_radix']:.2f}" if "top_p_after_radix" in ratio else "")
        )
    reference = by.get("top_p_before")
    for name, r in by.items():
        if name.startswith("top_p") and reference and name != "top_p_before":
            agree = abs(r["checksum"] - reference["checksum"]) / max(abs(reference["checksum"]), 1e-9)
            print(f"# {name} vs top_p_before, entropy sum: relative difference {agree:.2e}")


if __name__ == "__main__":
    main()
