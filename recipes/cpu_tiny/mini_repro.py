#!/usr/bin/env python
"""CPU mini-reproduction: GRPO, ToR-GRPO and its ablation arms through verl's real ``main_ppo``, K steps x seeds.

    python recipes/cpu_tiny/mini_repro.py --jobs 2                     # the grid: 6 arms x 3 seeds (~50 min, 2 cores)
    python recipes/cpu_tiny/mini_repro.py --pilot --out /tmp/mr_pilot  # the learning-rate pilot: GRPO x 3 LRs
    python recipes/cpu_tiny/mini_repro.py --summarize /tmp/verl_tor_mini_repro   # plot + table of a finished folder
    python recipes/cpu_tiny/mini_repro.py --publish recipes/cpu_tiny/results     # ... and copy them there

Every run is ``recipes/cpu_tiny/{grpo,grpo_tor}.sh`` (``verl_tor.local.launch.run_cpu_recipe``: verl's
``python -m verl.trainer.main_ppo`` with the shipped figure reader, a 1M-parameter Qwen2.5-VL, and the figure task
rewarded by verl's Geometry3K scorer), ``--jobs`` at a time (default 1; each run is its own process tree and mostly
keeps one core busy, so ``--jobs 2`` on 2 cores nearly halves the wall time). Arms (``ARMS``):

- ``grpo``: ``grpo.sh``, stock verl (``trainer_mode=sync``, ToR off);
- ``tor``: ``grpo_tor.sh``, the paper's ``tor.*`` values (``TOR_PAPER_ARGS`` in ``verl_tor/recipes/common.sh``);
- ``reasoning_only`` / ``perception_only`` / ``random``: ``grpo_tor.sh`` + ``tor.mode=...`` (the paper's ablations and
  the random control with ToR's weight histogram);
- ``informative``: ``grpo_tor.sh`` + ``tor.rank_tokens=informative`` (rank only tokens with a non-zero advantage).

A seed sets the recipe's ``SEED`` (verl's data shuffling, the ``hf`` rollout's sampling seeds, FSDP's init seed) and
``tor.seed`` (ties and the random arm's draw). Validation runs before training (step 0), every ``--test-freq`` steps
and at the last step, greedy (verl's ``val_kwargs`` default) on ``--val`` held-out problems; verl dumps its
generations (``trainer.validation_data_dir``) and the accuracy here is verl's own Geometry3K accuracy
(``verl.utils.reward_score.geo3k.acc_reward``, mathruler's boxed-answer grading) of each dumped response -- verl's
logged ``val-core/.../acc`` is the reward 0.9·acc + 0.1·format, which the dump's ``score`` is checked against.

Output folder (``--out``, default ``/tmp/verl_tor_mini_repro``): ``config.json``, ``data/`` (the problems),
``runs/<arm>-seed<S>-lr<LR>/`` (verl's ``metrics.jsonl``, ``main_ppo.log``, ``val_generations/<step>.jsonl`` and
``run.json``: this script's record of the run), and ``summary.json``, ``table.md``, ``accuracy.png``. A finished
run (``run.json`` with exit code 0) is not run again: rerunning the command resumes an interrupted grid.
The plot is drawn with PIL (already a dependency; no plotting extra to install, and CI exercises it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from a checkout: import verl_tor from it
    sys.path.insert(0, str(REPO))

ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "grpo": ("grpo", ()),
    "tor": ("grpo_tor", ()),
    "reasoning_only": ("grpo_tor", ("tor.mode=reasoning_only",)),
    "perception_only": ("grpo_tor", ("tor.mode=perception_only",)),
    "random": ("grpo_tor", ("tor.mode=random",)),
    "informative": ("grpo_tor", ("tor.rank_tokens=informative",)),
}
"""arm -> (recipe of ``recipes/cpu_tiny/``, hydra overrides on top of it)."""

PILOT_ARMS = ("grpo",)
PILOT_LRS = (2e-4, 5e-4, 1e-3)
"""The pilot that chose the grid's LR (recipes/RESULTS.md): stock GRPO, seed 1. Greedy validation accuracy fell at all
three (0.64 -> 0.47 / 0.19 / below 0.15 at step 15 or earlier), so the grid runs below them, at 5e-5."""

DEFAULTS = {
    "arms": list(ARMS),
    "seeds": [1, 2, 3],
    "lrs": [5e-5],
    "steps": 15,
    "test_freq": 5,
    "n_val": 64,
    "n_train": 256,
    "prompts": 8,
    "responses": 4,
    "data_seed": 0,
}
"""The grid's settings (``--help`` says why each is what it is)."""

SETTINGS = ("steps", "test_freq", "n_val", "n_train", "prompts", "responses", "data_seed")
"""Settings every run of one output folder must share (``config.json``)."""

TRAIN_SCORE = "critic/score/mean"
VAL_REWARD = "val-core/hiyouga/geometry3k/acc/mean@1"
"""verl's logged validation score of the Geometry3K scorer: the reward (0.9·acc + 0.1·format), named ``acc``."""
TOR_KEYS = (
    "tor/reasoning_frac",
    "tor/perception_frac",
    "tor/overlap_frac",
    "tor/selected_frac",
    "tor/weight_mean",
    "tor/informative_frac",
    "tor/noimg_scored_frac",
)
LAST_STEPS = 5
"""The training reward of a run is the mean ``critic/score/mean`` of its last this many steps."""

COLORS = {
    "grpo": (0, 0, 0),
    "tor": (214, 39, 40),
    "reasoning_only": (31, 119, 180),
    "perception_only": (44, 160, 44),
    "random": (148, 103, 189),
    "informative": (255, 127, 14),
}


class MiniReproError(RuntimeError):
    """A run failed, or an output folder holds runs made with other settings."""


# ---------------------------------------------------------------------------------------------- running the grid
def experiment_name(arm: str, seed: int, lr: float) -> str:
    return f"{arm}-seed{seed}-lr{lr:g}"


def prepare_out(out: str, config: dict) -> None:
    """Create ``out`` with ``config.json`` and the problems; refuse a folder whose runs used other settings."""
    from verl_tor.figures import write_figure_parquet

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        changed = {k: (old.get(k), config[k]) for k in SETTINGS if old.get(k) != config[k]}
        if changed:
            detail = ", ".join(f"--{k.replace('_', '-')} was {a} there, now {b}" for k, (a, b) in changed.items())
            raise MiniReproError(
                f"--out {out} holds runs made with other settings ({detail}). Fix: use another --out, or the same "
                "settings to resume."
            )
        config = {
            **old,
            "arms": sorted(set(old["arms"]) | set(config["arms"]), key=list(ARMS).index),
            "seeds": sorted(set(old["seeds"]) | set(config["seeds"])),
            "lrs": sorted(set(old["lrs"]) | set(config["lrs"])),
        }
    data = os.path.join(out, "data")
    if not all(os.path.exists(os.path.join(data, f"{s}.parquet")) for s in ("train", "val")):
        write_figure_parquet(data, n_train=config["n_train"], n_val=config["n_val"], seed=config["data_seed"])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def score_validations(val_dir: str) -> list[dict]:
    """Accuracy of every validation verl dumped into ``val_dir`` (``<step>.jsonl``), in step order.

    Each entry: ``step``, ``accuracy`` (verl's ``geo3k.acc_reward`` of each response against its ground truth),
    ``format`` (``geo3k.format_reward``), ``reward`` (the mean of the dump's ``score``: verl's reward) and ``n``.
    Raises ``MiniReproError`` when a dumped score is not 0.9·acc + 0.1·format (the dump was not scored by verl's
    Geometry3K reward, so its accuracy would not be that scorer's either).
    """
    from verl.utils.reward_score.geo3k import acc_reward, format_reward

    results = []
    files = [f for f in os.listdir(val_dir) if f.endswith(".jsonl")] if os.path.isdir(val_dir) else []
    for name in sorted(files, key=lambda f: int(f.split(".")[0])):
        acc, fmt, score = [], [], []
        with open(os.path.join(val_dir, name), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                a, b = acc_reward(row["output"], str(row["gts"])), format_reward(row["output"])
                if abs(0.9 * a + 0.1 * b - float(row["score"])) > 1e-5:
                    raise MiniReproError(
                        f"{name} in {val_dir}: response {row['output']!r} (ground truth {row['gts']!r}) has score "
                        f"{row['score']}, not 0.9·{a} + 0.1·{b}: the validation data is not scored by verl's "
                        "Geometry3K reward (data_source hiyouga/geometry3k). Fix: validate on the figure task's "
                        "parquet."
                    )
                acc.append(a)
                fmt.append(b)
                score.append(float(row["score"]))
        if acc:
            results.append(
                {
                    "step": int(name.split(".")[0]),
                    "accuracy": statistics.fmean(acc),
                    "format": statistics.fmean(fmt),
                    "reward": statistics.fmean(score),
                    "n": len(acc),
                }
            )
    return results


def run_one(out: str, config: dict, arm: str, seed: int, lr: float, log: Callable[[str], None] = print) -> dict:
    """Run one arm x seed x learning rate through ``run_cpu_recipe``; returns (and writes) its ``run.json``."""
    from verl_tor.local.launch import run_cpu_recipe

    recipe, arm_overrides = ARMS[arm]
    experiment = experiment_name(arm, seed, lr)
    run_dir = os.path.join(out, "runs", experiment)
    record_path = os.path.join(run_dir, "run.json")
    if os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        if record["returncode"] == 0:
            log(f"[mini_repro] {experiment}: done before, kept")
            return record
    val_dir = os.path.join(run_dir, "val_generations")
    shutil.rmtree(val_dir, ignore_errors=True)
    overrides = [
        *arm_overrides,
        *([f"tor.seed={seed}"] if recipe != "grpo" else []),
        "trainer.val_before_train=True",
        f"trainer.validation_data_dir={val_dir}",
    ]
    env = {
        "TOTAL_STEPS": str(config["steps"]),
        "TEST_FREQ": str(config["test_freq"]),
        "SEED": str(seed),
        "LR": f"{lr:g}",
        "ROLLOUT_BATCH_SIZE": str(config["prompts"]),
        "UPDATE_BATCH_SIZE": str(config["prompts"]),  # one actor update a step
        "N_RESPONSES": str(config["responses"]),
        "MICRO_BATCH_SIZE": str(config["prompts"] * config["responses"]),
    }

    def on_step(step: dict) -> None:
        parts = [f"step {step['step']}/{config['steps']}"]
        if TRAIN_SCORE in step:
            parts.append(f"reward {step[TRAIN_SCORE]:.3f}")
        if VAL_REWARD in step:
            parts.append(f"val reward {step[VAL_REWARD]:.3f}")
        if "timing_s/step" in step:
            parts.append(f"{step['timing_s/step']:.1f} s")
        log(f"[mini_repro] {experiment}: " + "  ".join(parts))

    log(f"[mini_repro] {experiment}: bash recipes/cpu_tiny/{recipe}.sh {' '.join(overrides)}  ({env})")
    result = run_cpu_recipe(recipe, overrides, cpu_dir=out, experiment=experiment, env=env, on_step=on_step)
    if result.returncode != 0:
        raise MiniReproError(
            f"{experiment} failed (exit code {result.returncode}); log {result.log_path}:\n{result.tail(40)}"
        )
    expected = list(range(config["steps"] + 1))
    if [s["step"] for s in result.steps] != expected:
        raise MiniReproError(f"{experiment}: verl logged steps {[s['step'] for s in result.steps]}, not {expected}")
    validations = score_validations(val_dir)
    by_step = {s["step"]: s for s in result.steps}
    for v in validations:  # the dump and verl's logged validation are the same generations
        logged = by_step.get(v["step"], {}).get(VAL_REWARD)
        if logged is None or abs(logged - v["reward"]) > 1e-5:
            raise MiniReproError(f"{experiment} step {v['step']}: dumped reward {v['reward']}, verl logged {logged}")
    record = {
        "arm": arm,
        "seed": seed,
        "lr": lr,
        "recipe": recipe,
        "overrides": overrides,
        "env": env,
        "returncode": result.returncode,
        "seconds": result.seconds,
        "val": validations,
        "train": [
            {k: s[k] for k in ("step", TRAIN_SCORE, "timing_s/step", *TOR_KEYS) if k in s}
            for s in result.steps
            if s["step"] > 0
        ],
    }
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    accs = "  ".join(f"{v['step']}:{v['accuracy']:.3f}" for v in validations)
    log(f"[mini_repro] {experiment}: done in {result.seconds:.0f} s; val accuracy by step {accs}")
    return record


# ---------------------------------------------------------------------------------------------- summary
def spread(values: Sequence[float]) -> dict:
    """Mean, min and max (``n`` values; NaN-free input)."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize_runs(records: Sequence[dict], last_steps: int = LAST_STEPS) -> list[dict]:
    """Per (arm, learning rate), over seeds: the validation accuracy curve, its first and last point, the training
    reward of the last ``last_steps`` steps and the mean ``tor/*`` metrics; in ``ARMS`` order, then by LR."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for record in records:
        groups.setdefault((record["arm"], record["lr"]), []).append(record)
    rows = []
    for (arm, lr), runs in sorted(groups.items(), key=lambda kv: (list(ARMS).index(kv[0][0]), kv[0][1])):
        runs = sorted(runs, key=lambda r: r["seed"])
        steps = [v["step"] for v in runs[0]["val"]]
        if any([v["step"] for v in r["val"]] != steps for r in runs):
            raise MiniReproError(f"{arm} lr {lr:g}: the seeds validated at different steps; rerun them alike")
        curve = [spread([r["val"][i]["accuracy"] for r in runs]) | {"step": s} for i, s in enumerate(steps)]
        train = [statistics.fmean([t[TRAIN_SCORE] for t in r["train"][-last_steps:]]) for r in runs]
        tor = {}
        for key in TOR_KEYS:
            per_seed = [[t[key] for t in r["train"] if key in t] for r in runs]
            if all(per_seed):
                tor[key] = spread([statistics.fmean(v) for v in per_seed])
        rows.append(
            {
                "arm": arm,
                "lr": lr,
                "seeds": [r["seed"] for r in runs],
                "val_steps": steps,
                "val_n": runs[0]["val"][0]["n"] if steps else 0,
                "accuracy": curve,
                "accuracy_by_seed": {str(r["seed"]): [v["accuracy"] for v in r["val"]] for r in runs},
                "format_last": spread([r["val"][-1]["format"] for r in runs]) if steps else None,
                "train_reward_last": spread(train),
                "train_reward_by_step": [
                    spread([r["train"][i][TRAIN_SCORE] for r in runs]) | {"step": r0["step"]}
                    for i, r0 in enumerate(runs[0]["train"])
                ],
                "tor": tor,
                "seconds": spread([r["seconds"] for r in runs]),
                "step_seconds": spread([statistics.fmean(t["timing_s/step"] for t in r["train"]) for r in runs]),
            }
        )
    return rows


def _fmt(s: dict | None, digits: int = 3) -> str:
    if s is None:
        return "—"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def format_table(rows: Sequence[dict], config: dict) -> str:
    """The markdown table of ``summarize_runs``' rows: mean [min, max] over seeds."""
    lines = [
        f"| arm | LR | seeds | val acc, step 0 | val acc, step {config['steps']} | change | train reward, last "
        f"{min(LAST_STEPS, config['steps'])} steps | informative frac · rows scored | s / run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        curve = row["accuracy"]
        change = None
        if curve:
            seeds = row["accuracy_by_seed"].values()
            change = spread([v[-1] - v[0] for v in seeds])
        informative = "—"
        if "tor/informative_frac" in row["tor"]:
            informative = (
                f"{_fmt(row['tor']['tor/informative_frac'], 2)} · {_fmt(row['tor'].get('tor/noimg_scored_frac'), 2)}"
            )
        lines.append(
            f"| `{row['arm']}` | {row['lr']:g} | {len(row['seeds'])} | {_fmt(curve[0] if curve else None)} | "
            f"{_fmt(curve[-1] if curve else None)} | {_fmt(change, 3)} | "
            f"{_fmt(row['train_reward_last'])} | {informative} | {row['seconds']['mean']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- the plot (PIL)
def draw_accuracy_plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """Validation accuracy vs step, one line per arm (mean over seeds) with its min-max band; one panel per LR."""
    from PIL import Image, ImageDraw, ImageFont

    lrs = sorted({row["lr"] for row in rows})
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    panel_w, panel_h = 640, 420
    width = panel_w * len(lrs)
    title_lines = _wrap(title, font, width - 40) if title else []
    title_h = 12 + 18 * len(title_lines)
    legend_h = 28 * ((len({r["arm"] for r in rows}) + 2) // 3) + 10
    left, right, top, bottom = 62, 16, 30, 46
    height = title_h + panel_h + legend_h
    image = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(title_lines):
        draw.text((width // 2, 8 + 18 * i), text, fill="black", font=font, anchor="ma")
    points = [p for row in rows for p in row["accuracy"]]
    lo = math.floor(min(p["min"] for p in points) * 20) / 20 if points else 0.0
    hi = math.ceil(max(p["max"] for p in points) * 20) / 20 if points else 1.0
    if hi - lo < 0.1:
        lo, hi = max(0.0, lo - 0.05), min(1.0, hi + 0.05)
    max_step = max((p["step"] for p in points), default=1) or 1
    for k, lr in enumerate(lrs):
        x0, y0 = k * panel_w + left, title_h + top
        x1, y1 = (k + 1) * panel_w - right, title_h + panel_h - bottom

        def px(step: float, acc: float, x0=x0, x1=x1, y0=y0, y1=y1) -> tuple[float, float]:
            return x0 + (x1 - x0) * step / max_step, y1 - (y1 - y0) * (acc - lo) / (hi - lo)

        draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        ticks = round((hi - lo) / 0.05)
        stride = max(1, math.ceil(ticks / 8))
        for i in range(0, ticks + 1, stride):
            acc = lo + 0.05 * i
            _, y = px(0, acc)
            draw.line([x0, y, x1, y], fill=(230, 230, 230))
            draw.text((x0 - 6, y), f"{acc:.2f}", fill="black", font=small, anchor="rm")
        steps = sorted({p["step"] for row in rows if row["lr"] == lr for p in row["accuracy"]})
        for step in steps:
            x, _ = px(step, lo)
            draw.line([x, y1, x, y1 + 4], fill="black")
            draw.text((x, y1 + 6), str(step), fill="black", font=small, anchor="ma")
        draw.text(((x0 + x1) // 2, y1 + 24), "training step", fill="black", font=font, anchor="ma")
        draw.text((x0, y0 - 6), f"greedy val accuracy, LR {lr:g}", fill="black", font=font, anchor="ld")
        for row in (r for r in rows if r["lr"] == lr):
            color = COLORS.get(row["arm"], (100, 100, 100))
            curve = row["accuracy"]
            band = [px(p["step"], p["max"]) for p in curve] + [px(p["step"], p["min"]) for p in reversed(curve)]
            overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
            if len(curve) > 1:
                ImageDraw.Draw(overlay).polygon(band, fill=(*color, 40))
            image.alpha_composite(overlay)
            draw = ImageDraw.Draw(image)
            line = [px(p["step"], p["mean"]) for p in curve]
            if len(line) > 1:
                draw.line(line, fill=color, width=3)
            for x, y in line:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    for i, arm in enumerate(arms):
        x, y = 20 + (i % 3) * 190, title_h + panel_h + 6 + 28 * (i // 3)
        color = COLORS.get(arm, (100, 100, 100))
        draw.rectangle([x, y + 4, x + 24, y + 14], fill=(*color, 40), outline=color)
        draw.line([x, y + 9, x + 24, y + 9], fill=color, width=3)
        draw.text((x + 32, y + 9), arm, fill="black", font=font, anchor="lm")
    image.convert("RGB").save(path, optimize=True)


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels in ``font``."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def summarize(out: str, publish: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Rebuild ``summary.json``, ``table.md`` and ``accuracy.png`` in ``out`` from its runs' ``run.json``."""
    config_path = os.path.join(out, "config.json")
    if not os.path.exists(config_path):
        raise MiniReproError(f"--summarize {out}: no config.json there. Fix: give the --out folder of a grid run.")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    records = []
    runs_dir = os.path.join(out, "runs")
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        path = os.path.join(runs_dir, name, "run.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            if record["returncode"] == 0:
                records.append(record)
    if not records:
        raise MiniReproError(f"--summarize {out}: no finished run under {runs_dir}. Fix: run the grid first.")
    rows = summarize_runs(records)
    summary = {"config": config, "last_steps": LAST_STEPS, "arms": rows}
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    table = format_table(rows, config)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table)
    title = (
        f"figure reader (1M Qwen2.5-VL), verl main_ppo on CPU: {config['prompts']}x{config['responses']} rollouts a "
        f"step, {config['n_val']} val problems, mean and min-max over seeds {sorted({r['seed'] for r in records})}"
    )
    draw_accuracy_plot(rows, os.path.join(out, "accuracy.png"), title)
    log(table)
    log(f"[mini_repro] wrote {out}/summary.json, table.md, accuracy.png")
    if publish:
        os.makedirs(publish, exist_ok=True)
        for name in ("summary.json", "table.md", "accuracy.png"):
            shutil.copyfile(os.path.join(out, name), os.path.join(publish, f"{os.path.basename(out)}_{name}"))
        log(f"[mini_repro] copied them to {publish}/{os.path.basename(out)}_*")
    return summary


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/verl_tor_mini_repro", help="output folder (outside the repo)")
    p.add_argument("--summarize", metavar="DIR", help="only rebuild summary.json, table.md and the plot of DIR")
    p.add_argument("--publish", metavar="DIR", help="also copy the summary, table and plot into DIR")
    p.add_argument("--pilot", action="store_true", help=f"arms {PILOT_ARMS} x LRs {PILOT_LRS}, seed 1")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="default: all six")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 1 2 3")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="default: 5e-5, below the pilot's LRs")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps K")
    p.add_argument("--test-freq", type=int, default=DEFAULTS["test_freq"], help="validate every this many steps")
    p.add_argument("--val", dest="n_val", type=int, default=DEFAULTS["n_val"], help="held-out problems")
    p.add_argument("--train", dest="n_train", type=int, default=DEFAULTS["n_train"], help="training problems")
    p.add_argument("--prompts", type=int, default=DEFAULTS["prompts"], help="prompts a step (one update a step)")
    p.add_argument("--responses", type=int, default=DEFAULTS["responses"], help="rollouts per prompt")
    p.add_argument("--data-seed", type=int, default=DEFAULTS["data_seed"], help="problem split seed")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once (a run's start-up and its pipeline mostly keep one core busy, so 2 on 2 cores nearly halve "
        "the grid's wall time; the step times in the table then measure a shared machine)",
    )
    return p


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> int:
    args = build_parser().parse_args(argv)
    if args.summarize:
        summarize(os.path.abspath(args.summarize), args.publish, log)
        return 0
    arms = args.arms or (list(PILOT_ARMS) if args.pilot else DEFAULTS["arms"])
    seeds = args.seeds or ([1] if args.pilot else DEFAULTS["seeds"])
    lrs = args.lrs or (list(PILOT_LRS) if args.pilot else DEFAULTS["lrs"])
    checks = (
        ("--steps", args.steps, 1),
        ("--test-freq", args.test_freq, 1),
        ("--val", args.n_val, 1),
        ("--jobs", args.jobs, 1),
    )
    for flag, value, low in checks:
        if value < low:
            raise MiniReproError(f"{flag}={value}: must be >= {low}")
    if args.n_train < args.steps * args.prompts:
        raise MiniReproError(
            f"--train={args.n_train} < --steps x --prompts = {args.steps * args.prompts}: verl would start a second "
            "epoch over the same problems. Fix: raise --train."
        )
    out = os.path.abspath(args.out)
    config = {
        "arms": arms,
        "seeds": seeds,
        "lrs": lrs,
        **{k: getattr(args, k) for k in SETTINGS},
        "command": " ".join(["python recipes/cpu_tiny/mini_repro.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    prepare_out(out, config)
    t0 = time.perf_counter()
    grid = [(arm, seed, lr) for lr in lrs for seed in seeds for arm in arms]
    counter = iter(range(1, len(grid) + 1))

    def one(arm: str, seed: int, lr: float) -> dict:
        log(f"[mini_repro] run {next(counter)}/{len(grid)} ({time.perf_counter() - t0:.0f} s so far)")
        return run_one(out, config, arm, seed, lr, log)

    if args.jobs == 1:
        for cell in grid:
            one(*cell)
    else:  # each run is its own main_ppo process tree; a thread only waits for it
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(one, *cell) for cell in grid]:
                future.result()
    summarize(out, args.publish, log)
    log(f"[mini_repro] {len(grid)} runs in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
