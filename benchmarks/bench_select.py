"""Token selection at rollout-batch scale: ours against a full sort and against chunked ``torch.quantile``.

A 512 prompts x 12 rollouts x 4096-token batch (25.2M positions, ~30% padding) on CPU, where verl's driver runs the
ToR stage. Scores look like ToR's: entropy with ~half exact zeros (top-p entropy; many ties at the cut) and a
continuous visual sensitivity. Times are the median and the minimum of ``--repeats`` runs, taken round robin over
the methods (a shared machine's load bursts then spread over all rows); "x ours" divides by our median for the same
job (the batch-scope row of the same operation). The target (benchmarks/README.md): ``compute_tor_weights`` at
batch scope in < 2 s on 2 CPU cores. Peak memory stays around 2 GB (three (B, T) inputs and a sort's temporaries).

    python benchmarks/bench_select.py [--prompts 512] [--n 12] [--response-length 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

from verl_tor.config import ToRConfig
from verl_tor.ops import compute_tor_weights, count_top_fraction, select_top_fraction

QUANTILE_CHUNK = 2**24 - 1
"""Largest input older torch.quantile accepts (it refused > 2^24 elements until pytorch#187574)."""


def make_batch(prompts: int, n: int, width: int, seed: int = 0):
    """(B, T) entropy, sensitivity, response_mask and uids; responses 40%..100% of the width (~30% padding)."""
    g = torch.Generator().manual_seed(seed)
    batch = prompts * n
    lengths = torch.randint(int(0.4 * width), width + 1, (batch,), generator=g)
    mask = torch.arange(width)[None] < lengths[:, None]  # (B, T) bool
    entropy = torch.empty(batch, width).exponential_(1.0, generator=g)
    entropy.masked_fill_(torch.rand(batch, width, generator=g) < 0.5, 0.0)  # top-p entropy: exact zeros
    sensitivity = torch.rand(batch, width, generator=g).pow_(3)
    uids = [f"prompt{i // n}" for i in range(batch)]
    return entropy, sensitivity, mask, uids


def select_by_sort(scores: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Naive exact selection: sort every valid score, keep the first ceil(ρN) (ties broken by sort order)."""
    position = mask.reshape(-1).nonzero().squeeze(1)
    values = scores.reshape(-1)[position]
    k = count_top_fraction(ratio, values.numel())
    order = torch.sort(values, descending=True).indices[:k]
    chosen = torch.zeros(mask.numel(), dtype=torch.bool)
    chosen[position[order]] = True
    return chosen.reshape(mask.shape)


def weights_by_sort(entropy, sensitivity, mask, config: ToRConfig) -> torch.Tensor:
    """ToR weights built on the naive sort selection (same arithmetic as ours, no metrics)."""
    reasoning = select_by_sort(entropy, mask, config.reasoning_ratio)
    perception = select_by_sort(sensitivity, mask, config.perception_ratio)
    weights = torch.zeros(mask.shape)
    weights.masked_fill_(perception & ~reasoning, config.perception_weight)
    weights.masked_fill_(reasoning, config.reasoning_weight)
    return weights


def select_by_chunked_quantile(scores: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Approximate: the (1-ρ) quantile of each < 2^24 chunk of valid scores, averaged by chunk size, as the cut.

    Not exact: the average of chunk quantiles is not the quantile of the union, and ``scores >= cut`` takes every
    tie at the cut (with many exact zeros that can be far more than ceil(ρN)).
    """
    values = scores[mask]
    cuts, sizes = [], []
    for chunk in values.split(QUANTILE_CHUNK):
        cuts.append(torch.quantile(chunk, 1.0 - ratio))
        sizes.append(chunk.numel())
    cut = sum(c * s for c, s in zip(cuts, sizes)) / sum(sizes)
    return mask & (scores >= cut)


def select_by_quantile(scores: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """One ``torch.quantile`` over all valid scores (refused above 2^24 elements by torch before pytorch#187574)."""
    return mask & (scores >= torch.quantile(scores[mask], 1.0 - ratio))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--n", type=int, default=12, help="rollouts per prompt")
    parser.add_argument("--response-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    entropy, sensitivity, mask, uids = make_batch(args.prompts, args.n, args.response_length)
    n_valid = int(mask.sum())
    k = count_top_fraction(0.3, n_valid)
    config = ToRConfig(enable=True)  # paper defaults, batch scope
    print(f"# bench_select: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(
        f"# cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}"
    )
    print(
        f"# batch: {mask.shape[0]} x {mask.shape[1]} = {mask.numel():,} positions, {n_valid:,} valid "
        f"({1 - n_valid / mask.numel():.0%} padding); rho = 0.3 -> k = {k:,}; "
        f"entropy exact zeros: {float((entropy[mask] == 0).float().mean()):.0%}; median of {args.repeats}"
    )

    # (job, method, fn, exact count or None for per-scope counts, index of our row for the same job)
    jobs: list[tuple[str, str, Callable[[], torch.Tensor], int | None, int]] = []

    def add(job, method, fn, expected, ours=None) -> int:
        jobs.append((job, method, fn, expected, len(jobs) if ours is None else ours))
        return len(jobs) - 1

    def weights(cfg):
        return compute_tor_weights(entropy, sensitivity, mask, cfg, index=uids)[0]

    for ratio in (0.3, 0.6):
        job = f"select T_r, rho={ratio} (batch)" + (": cut inside the exact zeros" if ratio == 0.6 else "")
        k_job = count_top_fraction(ratio, n_valid)
        ours = add(
            job, "ours: select_top_fraction", functools.partial(select_top_fraction, entropy, mask, ratio), k_job
        )
        add(job, "naive: full torch.sort", functools.partial(select_by_sort, entropy, mask, ratio), k_job, ours)
        chunked = functools.partial(select_by_chunked_quantile, entropy, mask, ratio)
        add(job, "torch.quantile per < 2^24 chunk, averaged (approx.)", chunked, k_job, ours)
        add(job, "torch.quantile, one call", functools.partial(select_by_quantile, entropy, mask, ratio), k_job, ours)
        if ratio == 0.3:
            for scope in ("sequence", "group"):
                fn = functools.partial(select_top_fraction, entropy, mask, 0.3, scope=scope, index=uids)
                add(f"select T_r, rho=0.3 ({scope})", "ours: select_top_fraction", fn, None, ours)
    n_weighted = int((weights_by_sort(entropy, sensitivity, mask, config) > 0).sum())
    job = "weights, mode tor (batch)"
    ours = add(job, "ours: compute_tor_weights + metrics", functools.partial(weights, config), n_weighted)
    naive = functools.partial(weights_by_sort, entropy, sensitivity, mask, config)
    add(job, "naive: 2 full sorts, no metrics", naive, n_weighted, ours)
    for scope in ("sequence", "group"):
        fn = functools.partial(weights, config.replace(scope=scope))
        add(f"weights, mode tor ({scope})", "ours: compute_tor_weights + metrics", fn, None, ours)

    # Round robin: repeat r of every job runs before repeat r+1 of any, so a burst of load from elsewhere on a shared
    # machine hits one repeat of several jobs rather than every repeat of one job.
    times: list[list[float]] = [[] for _ in jobs]
    cells: list[tuple[str, str]] = [("", "")] * len(jobs)
    for repeat in range(args.repeats):
        for i, (_, _, fn, expected, _) in enumerate(jobs):
            if times[i] and math.isnan(times[i][0]):
                continue
            t0 = time.perf_counter()
            try:
                out = fn()
            except RuntimeError as error:  # older torch.quantile: "quantile() input tensor is too large"
                times[i].append(math.nan)
                cells[i] = (f"refused: {error}", "-")
                continue
            times[i].append(time.perf_counter() - t0)
            if repeat == 0:
                got = int(out.sum()) if out.dtype == torch.bool else int((out > 0).sum())
                exact = "per scope" if expected is None else "yes" if got == expected else f"no ({got - expected:+,})"
                cells[i] = (f"{got:,}", exact)
            del out
        print(f"  repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    medians = [statistics.median(t) for t in times]

    header = ("job", "method", "median s", "min s", "x ours", "selected", "exact count")
    table = [header, tuple("---" for _ in header)]
    for i, (job, method, _, _, ours) in enumerate(jobs):
        if math.isnan(medians[i]):
            table.append((job, method, "-", "-", "-", *cells[i]))
            continue
        ratio = f"{medians[i] / medians[ours]:.2f}"
        table.append((job, method, f"{medians[i]:.3f}", f"{min(times[i]):.3f}", ratio, *cells[i]))
    for line in table:
        print("| " + " | ".join(line) + " |")
    print("# selected: |T_r| (select rows) or |w > 0| (weight rows). exact count: against ceil(rho*N) for the batch")
    print("# scope; sequence/group are exact per scope (the tests check). x ours: median / our batch-scope median.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
