"""Whole-step cost of ToR in verl's real trainer loop: ToR-GRPO against stock GRPO, K steps each, in one run.

Runs ``recipes/cpu_tiny/grpo.sh`` (stock ``trainer_mode=sync``) and ``grpo_tor.sh`` (``tor_sync``, ``tor.enable=true``)
back to back through ``python -m verl.trainer.main_ppo`` on this machine, same seed and data, and prints per-step
times (verl's ``timing_s/*``), the ratio of the medians, and the share of a ToR step spent in ``tor_noimg`` (building
the image-free views + the extra log-prob pass) and ``tor_select`` (ranking + weights). Step 1 (warm-up) is left out.

    PYTHONPATH=. python benchmarks/bench_loop.py --steps 8
    PYTHONPATH=. python benchmarks/bench_loop.py --stock-metrics a.jsonl --tor-metrics b.jsonl   # any two verl runs

The second form summarises two runs you already have (verl's ``file`` logger output, e.g. from a GPU cluster).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile

import torch

PHASES = ("gen", "old_log_prob", "ref", "tor_noimg", "tor_select", "adv", "update_actor", "update_weights", "step")


def read_metrics(path: str) -> list[dict]:
    from verl_tor.local.launch import read_metrics as read

    return read(path)


NESTED_IN_ADV = ("tor_noimg", "tor_select")
"""The ToR stage runs inside verl's ``adv`` timer (``_compute_advantage``); ``adv`` here is verl's own part."""


def step_times(steps: list[dict], skip: int) -> dict[str, list[float]]:
    """Phase -> seconds at every training step after the first ``skip`` (``timing_s/<phase>``; a validation-only
    step 0 has no ``timing_s/step`` and is left out). ``adv`` is verl's advantage alone: the ToR stage timed inside
    it (``NESTED_IN_ADV``) is subtracted, so the phases add up to the step."""
    kept = [s for s in steps if s["step"] > skip and "timing_s/step" in s]
    times = {p: [s[f"timing_s/{p}"] for s in kept if f"timing_s/{p}" in s] for p in PHASES}
    times["adv"] = [
        s["timing_s/adv"] - sum(s.get(f"timing_s/{p}", 0.0) for p in NESTED_IN_ADV) for s in kept if "timing_s/adv" in s
    ]
    return times


def summarize(stock: list[dict], tor: list[dict], skip: int = 1) -> list[dict]:
    """One row per phase: median and spread (min-max) of stock and ToR, and ToR's share of its step."""
    a, b = step_times(stock, skip), step_times(tor, skip)
    step_b = statistics.median(b["step"]) if b["step"] else float("nan")
    rows = []
    for phase in PHASES:
        row = {"phase": phase}
        for name, times in (("stock", a[phase]), ("tor", b[phase])):
            row[name] = (statistics.median(times), min(times), max(times)) if times else None
        row["share_of_tor_step"] = row["tor"][0] / step_b if row["tor"] else None
        rows.append(row)
    return rows


def _fmt(cell) -> str:
    return "" if cell is None else f"{cell[0]:.3f} ({cell[1]:.3f}-{cell[2]:.3f})"


def print_table(rows: list[dict], n_stock: int, n_tor: int) -> None:
    step = next(r for r in rows if r["phase"] == "step")
    print(f"# steps measured: stock {n_stock}, ToR {n_tor} (median and min-max, seconds)")
    print("| phase | stock GRPO | ToR-GRPO | share of a ToR step |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        share = "" if r["share_of_tor_step"] is None else f"{100 * r['share_of_tor_step']:.1f}%"
        print(f"| {r['phase']} | {_fmt(r['stock'])} | {_fmt(r['tor'])} | {share} |")
    print("\n`adv` is verl's advantage alone: the ToR stage runs inside verl's `adv` timer and is subtracted from it.")
    if step["stock"] and step["tor"]:
        print(f"\nwhole step, ToR / stock (medians): {step['tor'][0] / step['stock'][0]:.3f}")


def run_pair(steps: int, seed: int, out_dir: str) -> tuple[list[dict], list[dict]]:
    from verl_tor.local.launch import run_cpu_recipe
    from verl_tor.local.prepare import prepare

    prepare(out_dir, seed=seed)
    env = {"TOTAL_STEPS": str(steps), "SEED": str(seed + 1)}
    results = []
    for recipe in ("grpo", "grpo_tor"):
        run = run_cpu_recipe(recipe, [], cpu_dir=out_dir, experiment=f"bench_{recipe}", env=env)
        if run.returncode != 0:
            raise SystemExit(f"{recipe} failed (exit {run.returncode}); the end of {run.log_path}:\n{run.tail(40)}")
        results.append(run.steps)
    return results[0], results[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per run (the first is left out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="model, data and runs (default: a temporary folder)")
    parser.add_argument("--stock-metrics", default=None, help="summarise this verl metrics.jsonl (stock run) ...")
    parser.add_argument("--tor-metrics", default=None, help="... against this one (ToR run); runs nothing")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: give at least 2 (step 1 is warm-up and is left out)")
    print(f"# bench_loop: {sys.executable} {' '.join(sys.argv)}")
    print(
        f"# cpu cores: {os.cpu_count()}, torch {torch.__version__}, python {platform.python_version()}, "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    if args.stock_metrics or args.tor_metrics:
        if not (args.stock_metrics and args.tor_metrics):
            parser.error("--stock-metrics and --tor-metrics go together")
        stock, tor = read_metrics(args.stock_metrics), read_metrics(args.tor_metrics)
    else:
        out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_loop_")
        stock, tor = run_pair(args.steps, args.seed, out_dir)
        print(f"# runs: {out_dir}/runs/bench_grpo, {out_dir}/runs/bench_grpo_tor")
    rows = summarize(stock, tor, skip=1)
    print_table(rows, len(step_times(stock, 1)["step"]), len(step_times(tor, 1)["step"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
