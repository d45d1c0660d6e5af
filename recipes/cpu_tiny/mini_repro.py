#!/usr/bin/env python
"""CPU mini-reproduction: GRPO, ToR-GRPO, its ablation arms and DAPO through verl's real ``main_ppo``, K steps x seeds.

    python recipes/cpu_tiny/mini_repro.py --pilot --jobs 2 --out /tmp/mr_pilot  # LR pilot: GRPO, seed 0, PILOT_LRS
    python recipes/cpu_tiny/mini_repro.py --part primary --lrs LR --jobs 2      # GRPO, ToR-GRPO x seeds 1-5
    python recipes/cpu_tiny/mini_repro.py --part ablations --lrs LR --jobs 2    # reasoning / perception only, random
    python recipes/cpu_tiny/mini_repro.py --part dapo --lrs LR --jobs 2         # DAPO, ToR-DAPO
    python recipes/cpu_tiny/mini_repro.py --summarize /tmp/verl_tor_mini_repro \\
        --publish recipes/cpu_tiny/results/area_plus                              # compact files, table, plots
    python recipes/cpu_tiny/mini_repro.py --summarize recipes/cpu_tiny/results/area_plus  # rebuilt from them

Every run is one of ``recipes/cpu_tiny/{grpo,grpo_tor,dapo,dapo_tor}.sh`` (``verl_tor.local.launch.run_cpu_recipe``:
verl's ``python -m verl.trainer.main_ppo`` on a 1M-parameter Qwen2.5-VL figure reader, the figure task rewarded by
verl's Geometry3K scorer), ``--jobs`` at a time (default 1; each run is its own process tree and mostly keeps one core
busy, so ``--jobs 2`` on 2 cores nearly halves the wall time). The task (``--task``, default ``area_plus``: read width,
height and the number inside, ignore a distractor, answer w*h + inside), its starting checkpoint (``--model``, default
``FIGURE_READER_PLUS_CHECKPOINT``) and verl's ``MAX_RESPONSE_LENGTH`` (64 for area_plus) are settings of the output
folder, like steps and batch. Arms (``ARMS``), run by part (``--part``, ``PARTS``) in seed-major order:

- ``grpo``: ``grpo.sh``, stock verl (``trainer_mode=sync``, ToR off);
- ``tor``: ``grpo_tor.sh``, the paper's ``tor.*`` values (``TOR_PAPER_ARGS`` in ``verl_tor/recipes/common.sh``);
- ``reasoning_only`` / ``perception_only`` / ``random``: ``grpo_tor.sh`` + ``tor.mode=...`` (the paper's ablations and
  the random control with ToR's weight histogram);
- ``dapo`` / ``dapo_tor``: ``dapo.sh`` / ``dapo_tor.sh`` (clip-higher, dynamic sampling, overlong shaping);
- ``informative`` (in no part): ``grpo_tor.sh`` + ``tor.rank_tokens=informative``.

A seed sets the recipe's ``SEED`` (verl's data shuffling, the ``hf`` rollout's sampling seeds, FSDP's init seed) and
``tor.seed`` (ties and the random arm's draw). Validation runs before training (step 0), every ``--test-freq`` steps
and at the last step, greedy (verl's ``val_kwargs`` default) on ``--val`` held-out problems; verl dumps its
generations (``trainer.validation_data_dir``). verl 0.9.1 writes a dump's rows in random ``uid`` order, so every run
rewards with ``indexed_geo3k.py`` (verl's Geometry3K score unchanged, plus the problem's index in the dump); each
response is then graded with verl's ``geo3k.acc_reward`` against its own problem and classified
(``verl_tor.figures.task.classify_response``) into ``scores.json``. verl's logged ``val-core/.../acc`` is the reward
0.9·acc + 0.1·format, which the dump's ``score`` is checked against.

The summary: per arm and validation step the accuracy (with a 95 % bootstrap band) and the error-class shares; per pair
of ``COMPARISONS`` (issue 20's protocol: ToR-GRPO against GRPO, each single set and random; ToR-DAPO against DAPO)
the paired difference on the same seeds and problems, in final greedy accuracy and area
under the accuracy curve (trapezoid over the validation steps / their span), mean over seeds with a 95 % bootstrap
interval (10,000 resamples of seeds, then problems within them, fixed RNG seed).

Output folder (``--out``, default ``/tmp/verl_tor_mini_repro``): ``config.json``, ``data/`` (the problems),
``runs/<arm>-seed<S>-lr<LR>/`` (verl's ``metrics.jsonl``, ``main_ppo.log``, ``val_generations/<step>.jsonl``, and this
script's ``run.json`` and ``scores.json``), and ``summary.json``, ``table.md``, ``accuracy.png``,
``error_classes.png``. ``--summarize`` reads only ``config.json``, ``run.json`` and ``scores.json``: ``--publish DIR``
copies those and the summary, table and plots, so ``--summarize DIR`` rebuilds them. A finished run (``run.json`` with
exit code 0) is not run again: rerunning the command resumes an interrupted grid; a line per finished run gives an ETA.
The plots are drawn with PIL (already a dependency; no plotting extra to install, and CI exercises it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from a checkout: import verl_tor from it
    sys.path.insert(0, str(REPO))

ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "grpo": ("grpo", ()),
    "tor": ("grpo_tor", ()),
    "reasoning_only": ("grpo_tor", ("tor.mode=reasoning_only",)),
    "perception_only": ("grpo_tor", ("tor.mode=perception_only",)),
    "random": ("grpo_tor", ("tor.mode=random",)),
    "dapo": ("dapo", ()),
    "dapo_tor": ("dapo_tor", ()),
    "informative": ("grpo_tor", ("tor.rank_tokens=informative",)),
}
"""arm -> (recipe of ``recipes/cpu_tiny/``, hydra overrides on top of it)."""

PARTS: dict[str, tuple[str, ...]] = {
    "primary": ("grpo", "tor"),
    "ablations": ("reasoning_only", "perception_only", "random"),
    "dapo": ("dapo", "dapo_tor"),
}
"""``--part``: the grid in parts that each fit a sitting (``all``: the three in this order; ``informative`` is in
none: run it with ``--arms informative``)."""

COMPARISONS: tuple[tuple[str, str], ...] = (
    ("tor", "grpo"),
    ("tor", "reasoning_only"),
    ("tor", "perception_only"),
    ("tor", "random"),
    ("dapo_tor", "dapo"),
    ("informative", "tor"),
)
"""(arm, baseline) pairs compared paired by seed and problem, in the order of issue 20's protocol: ToR-GRPO − GRPO
(primary), ToR-GRPO against each single set and against random tokens (the paper's ablation claim needs ToR-GRPO
above both single sets), ToR-DAPO − DAPO; then ``informative`` (in no part) against the ToR it modifies. A pair is
reported once both arms have a run at the same LR on a common seed."""

PILOT_ARMS = ("grpo",)
PILOT_LRS = (5e-5, 1e-4)
"""The learning-rate pilot: stock GRPO alone, seed 0 (not a grid seed), these two LRs; one LR for every arm is then
chosen from it (issue 20's protocol). 5e-5 is the old task's grid LR (2e-4 and above made greedy accuracy fall)."""

TASK_DEFAULTS = {"area": {"max_response_length": 48}, "area_plus": {"max_response_length": 64}}
"""Per task: the recipe's ``MAX_RESPONSE_LENGTH`` (area's answers take ~29 tokens, area_plus's ~45)."""

DEFAULTS = {
    "arms": [a for part in PARTS.values() for a in part],
    "seeds": [1, 2, 3, 4, 5],
    "lrs": [5e-5],
    "steps": 40,  # the protocol's pilot rule (recipes/RESULTS.md): GRPO flattens by step 40 at LR 5e-5
    "test_freq": 10,
    "n_val": 256,
    "n_train": 512,
    "prompts": 8,
    "responses": 4,
    "data_seed": 0,
    "task": "area_plus",
}
"""The grid's settings (``--help`` says why each is what it is)."""

SETTINGS = (
    "steps",
    "test_freq",
    "n_val",
    "n_train",
    "prompts",
    "responses",
    "data_seed",
    "task",
    "model",
    "max_response_length",
)
"""Settings every run of one output folder must share (``config.json``)."""

INDEXED_REWARD = str(Path(__file__).resolve().parent / "indexed_geo3k.py")
"""verl's Geometry3K reward + the problem's index in the validation dump (see that file for why)."""
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
"""The paired intervals: 10,000 resamples of seeds, then problems within them, from a fixed RNG seed."""
CLASS_CODES = "crmf"
"""``scores.json`` writes each response's class as one letter, ``ERROR_CLASSES`` in order: correct, misread,
miscalculated, malformed."""

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
    "dapo": (127, 127, 127),
    "dapo_tor": (227, 119, 194),
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
        write_figure_parquet(
            data, n_train=config["n_train"], n_val=config["n_val"], seed=config["data_seed"], task=config["task"]
        )
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


def read_dump(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def score_problems(val_dir: str, problems: Sequence) -> dict:
    """Each validation response of ``val_dir`` given its problem: accuracy and error class per problem and step.

    verl 0.9.1 writes a validation's rows sorted by a random per-prompt ``uid``, not in dataset order, so a row is
    mapped to its problem by the ``problem_index`` that ``indexed_geo3k.py`` puts in the dump (the parquet row's
    ``extra_info["index"]``, the position in ``problems``), and checked: its ``gts`` must be that problem's answer,
    and every problem answered exactly once (greedy, one response each). Anything else raises ``MiniReproError``.

    Returns the compact ``scores.json``: ``{"task", "n": len(problems), "classes": CLASS_CODES, "steps": {step:
    {"acc": "0110...", "class": "crmf..."}}}``, a character per problem in ``problems`` order (acc: verl's
    ``geo3k.acc_reward`` = 1; class: ``classify_response``, ``CLASS_CODES``).
    """
    from verl.utils.reward_score.geo3k import acc_reward

    from verl_tor.figures.task import ERROR_CLASSES, classify_response

    assert len(CLASS_CODES) == len(ERROR_CLASSES)
    files = [f for f in os.listdir(val_dir) if f.endswith(".jsonl")] if os.path.isdir(val_dir) else []
    steps = {}
    for name in sorted(files, key=lambda f: int(f.split(".")[0])):
        rows = read_dump(os.path.join(val_dir, name))
        acc: list[str | None] = [None] * len(problems)
        cls: list[str | None] = [None] * len(problems)
        for k, row in enumerate(rows):
            where = f"{os.path.join(val_dir, name)} row {k}"
            if "problem_index" not in row:
                raise MiniReproError(
                    f"{where}: no problem_index in verl's dump, so its problem is unknown (verl writes the rows in "
                    f"random uid order). Fix: run with reward.custom_reward_function.path={INDEXED_REWARD}."
                )
            i = int(row["problem_index"])
            if not 0 <= i < len(problems):
                raise MiniReproError(f"{where}: problem_index {i} outside the {len(problems)} validation problems")
            if str(row["gts"]) != problems[i].answer:
                raise MiniReproError(
                    f"{where}: ground truth {row['gts']!r} but problem {i} of the validation parquet has answer "
                    f"{problems[i].answer!r}: the dump is not of this folder's data/val.parquet. Fix: score it "
                    "against the parquet the run validated on."
                )
            if acc[i] is not None:
                raise MiniReproError(f"{where}: problem {i} answered twice (greedy validation answers each once)")
            correct = acc_reward(row["output"], str(row["gts"])) == 1.0
            acc[i] = "1" if correct else "0"
            cls[i] = CLASS_CODES[ERROR_CLASSES.index(classify_response(row["output"], problems[i], correct))]
        missing = [i for i, a in enumerate(acc) if a is None]
        if missing:
            raise MiniReproError(
                f"{os.path.join(val_dir, name)}: {len(missing)} of {len(problems)} problems not answered "
                f"(first: {missing[:5]}); the dump is incomplete or of another validation set"
            )
        steps[str(int(name.split(".")[0]))] = {"acc": "".join(acc), "class": "".join(cls)}
    return {"task": problems[0].task if problems else None, "n": len(problems), "classes": CLASS_CODES, "steps": steps}


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
        *([f"tor.seed={seed}"] if recipe.endswith("_tor") else []),
        "trainer.val_before_train=True",
        f"trainer.validation_data_dir={val_dir}",
        f"reward.custom_reward_function.path={INDEXED_REWARD}",
        "reward.custom_reward_function.name=compute_score",
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
        "MODEL_PATH": config["model"],
        "MAX_RESPONSE_LENGTH": str(config["max_response_length"]),
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
    from verl_tor.figures.evaluate import load_parquet_problems

    scores = score_problems(val_dir, load_parquet_problems(os.path.join(out, "data", "val.parquet")))
    for v in validations:  # the per-problem file and the aggregate read the same dump
        acc = scores["steps"][str(v["step"])]["acc"]
        if abs(acc.count("1") / len(acc) - v["accuracy"]) > 1e-9:
            raise MiniReproError(f"{experiment} step {v['step']}: per-problem accuracy disagrees with the dump's")
    with open(os.path.join(run_dir, "scores.json"), "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=1)
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


def is_finished(run_dir: str) -> bool:
    """A run ``run_one`` finished (its ``run.json`` with exit code 0): a resumed grid keeps it."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        return json.load(f)["returncode"] == 0


def order_grid(arms: Sequence[str], seeds: Sequence[int], lrs: Sequence[float]) -> list[tuple[str, int, float]]:
    """The runs in order: by LR, then part (``PARTS``; arms in none last), then seed, then arm -- seed-major within
    a part, so the arms of one seed (a pair: GRPO and ToR-GRPO) run side by side under ``--jobs 2`` and finish
    together, and an interrupted grid leaves whole pairs."""
    groups = [[a for a in part if a in arms] for part in PARTS.values()]
    groups.append([a for a in arms if not any(a in part for part in PARTS.values())])
    return [(arm, seed, lr) for lr in lrs for group in groups for seed in seeds for arm in group]


class Progress:
    """The line logged when a run ends: ``[mini_repro] run k/N <exp> done in X s; ETA Y min``.

    The ETA is the mean wall time of the runs this invocation ran (kept runs cost nothing and are left out) times the
    runs left, divided by ``--jobs``; before any run has finished it is unknown (``ETA ?``).
    """

    def __init__(self, total: int, jobs: int = 1):
        import threading

        self.total, self.jobs, self.done, self.durations = total, jobs, 0, []
        self._lock = threading.Lock()

    def finished(self, experiment: str, seconds: float, ran: bool = True) -> str:
        with self._lock:
            self.done += 1
            if ran:
                self.durations.append(seconds)
            left = self.total - self.done
            if left == 0:
                eta = "ETA 0 min"
            elif self.durations:
                eta = f"ETA {statistics.fmean(self.durations) * left / self.jobs / 60:.0f} min"
            else:
                eta = "ETA ?"
            what = f"done in {seconds:.0f} s" if ran else "kept (done before)"
            return f"[mini_repro] run {self.done}/{self.total} {experiment} {what}; {eta}"


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


# ---------------------------------------------------------------------------------------------- paired analysis
def load_scores(scores: dict) -> tuple[list[int], np.ndarray, np.ndarray]:
    """A ``scores.json`` as arrays: its validation steps (sorted), accuracy ``[step, problem]`` (0/1) and class index
    ``[step, problem]`` (into ``ERROR_CLASSES``)."""
    import numpy as np

    steps = sorted(int(s) for s in scores["steps"])
    codes = scores.get("classes", CLASS_CODES)
    acc = np.array([[c == "1" for c in scores["steps"][str(s)]["acc"]] for s in steps], dtype=float)
    cls = np.array([[codes.index(c) for c in scores["steps"][str(s)]["class"]] for s in steps], dtype=int)
    return steps, acc, cls


def curve_metrics(steps: Sequence[int], acc: np.ndarray) -> np.ndarray:
    """Per problem: (final-step accuracy, area under the accuracy curve) -- the trapezoid over the validation steps
    divided by their span, so a flat curve's area is its height. ``acc``: ``[..., step, problem]`` -> ``[..., problem,
    2]``."""
    import numpy as np

    final = acc[..., -1, :]
    if len(steps) < 2:
        area = final
    else:
        x = np.asarray(steps, dtype=float)
        widths = np.diff(x)[:, None]
        area = ((acc[..., 1:, :] + acc[..., :-1, :]) / 2 * widths).sum(axis=-2) / (x[-1] - x[0])
    return np.stack([final, area], axis=-1)


def bootstrap_mean(
    values: np.ndarray, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds x problems of ``values`` (``[seed, problem, K]``) with a percentile bootstrap interval.

    Two-stage, as the seeds and the problems are both samples: each resample draws seeds with replacement, then for
    each drawn seed problems with replacement. For a paired difference pass the per-(seed, problem) difference, so
    both arms get the same indices. Returns (mean, low, high), each ``[K]``.
    """
    import numpy as np

    values = np.asarray(values, dtype=float)
    n_seeds, n_problems = values.shape[:2]
    rng = np.random.default_rng(seed)
    means = []
    chunk = max(1, 2_000_000 // max(1, values.size))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        si = rng.integers(0, n_seeds, (b, n_seeds))
        pi = rng.integers(0, n_problems, (b, n_seeds, n_problems))
        means.append(values[si[:, :, None], pi].mean(axis=(1, 2)))  # [b, seed, problem, K] -> [b, K]
    means = np.concatenate(means)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return values.mean(axis=(0, 1)), low, high


def summarize_scores(records: Sequence[dict], scores: dict[str, dict]) -> dict:
    """The per-problem analysis of the runs that have a ``scores.json`` (``scores``: experiment name -> its content).

    Returns ``{"arms": [...], "paired": [...]}``: per (arm, LR) the accuracy curve with a bootstrap band and the
    error-class shares per validation step (means over seeds x problems); per pair of ``COMPARISONS`` whose arms
    both ran (at one LR), on the seeds both ran, the paired differences in final accuracy and area under
    the curve with their 95 % bootstrap interval.
    """
    import numpy as np

    from verl_tor.figures.task import ERROR_CLASSES

    groups: dict[tuple[str, float], dict[int, tuple]] = {}
    for record in records:
        name = experiment_name(record["arm"], record["seed"], record["lr"])
        if name in scores:
            groups.setdefault((record["arm"], record["lr"]), {})[record["seed"]] = load_scores(scores[name])
    arms, paired = [], []
    order = sorted(groups, key=lambda k: (k[1], list(ARMS).index(k[0])))
    for arm, lr in order:
        runs = groups[(arm, lr)]
        seeds = sorted(runs)
        steps = runs[seeds[0]][0]
        if any(runs[s][0] != steps or runs[s][1].shape != runs[seeds[0]][1].shape for s in seeds):
            raise MiniReproError(f"{arm} lr {lr:g}: the seeds validated at different steps or on different problems")
        acc = np.stack([runs[s][1] for s in seeds])  # [seed, step, problem]
        cls = np.stack([runs[s][2] for s in seeds])
        mean, low, high = bootstrap_mean(acc.transpose(0, 2, 1))
        arms.append(
            {
                "arm": arm,
                "lr": lr,
                "seeds": seeds,
                "n_problems": acc.shape[2],
                "accuracy": [
                    {"step": st, "mean": float(m), "low": float(lo), "high": float(hi)}
                    for st, m, lo, hi in zip(steps, mean, low, high, strict=True)
                ],
                "classes": {
                    name: [float((cls[:, i] == k).mean()) for i in range(len(steps))]
                    for k, name in enumerate(ERROR_CLASSES)
                },
            }
        )
    for (arm, base), lr in itertools.product(COMPARISONS, sorted({lr for _, lr in groups})):
        if (arm, lr) not in groups or (base, lr) not in groups:
            continue
        runs, base_runs = groups[(arm, lr)], groups[(base, lr)]
        seeds = sorted(set(runs) & set(base_runs))
        if not seeds:
            continue
        steps = runs[seeds[0]][0]
        if base_runs[seeds[0]][0] != steps:
            raise MiniReproError(f"{arm} and {base} (lr {lr:g}) validated at different steps: cannot pair them")
        diff = curve_metrics(steps, np.stack([runs[s][1] for s in seeds])) - curve_metrics(
            steps, np.stack([base_runs[s][1] for s in seeds])
        )  # [seed, problem, (final, area)]
        mean, low, high = bootstrap_mean(diff)
        per_seed = diff.mean(axis=1)
        paired.append(
            {
                "arm": arm,
                "baseline": base,
                "lr": lr,
                "seeds": seeds,
                "n_problems": int(diff.shape[1]),
                **{
                    metric: {
                        "mean": float(mean[j]),
                        "low": float(low[j]),
                        "high": float(high[j]),
                        "by_seed": {str(s): float(v) for s, v in zip(seeds, per_seed[:, j], strict=True)},
                    }
                    for j, metric in enumerate(("final", "area"))
                },
            }
        )
    return {"arms": arms, "paired": paired, "resamples": BOOTSTRAP_RESAMPLES, "rng_seed": BOOTSTRAP_SEED}


def format_paired_table(analysis: dict) -> str:
    """Markdown: per arm, the paired difference to its baseline (final accuracy, area under the curve) with the 95 %
    bootstrap interval over seeds x problems, then the per-arm final accuracy and error-class shares."""
    lines = [
        "| arm − baseline | LR | seeds x problems | Δ final accuracy [95 % CI] | Δ area under curve [95 % CI] | "
        "Δ final by seed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in analysis["paired"]:
        f, a = row["final"], row["area"]
        by_seed = " ".join(f"{v:+.3f}" for v in f["by_seed"].values())
        lines.append(
            f"| `{row['arm']}` − `{row['baseline']}` | {row['lr']:g} | {len(row['seeds'])} x {row['n_problems']} | "
            f"{f['mean']:+.3f} [{f['low']:+.3f}, {f['high']:+.3f}] | {a['mean']:+.3f} [{a['low']:+.3f}, "
            f"{a['high']:+.3f}] | {by_seed} |"
        )
    lines += [
        "",
        "| arm | LR | seeds | accuracy, first → last val step [95 % CI] | correct | misread | miscalculated | "
        "malformed (last step) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in analysis["arms"]:
        first, last = row["accuracy"][0], row["accuracy"][-1]
        classes = ("correct", "misread", "miscalculated", "malformed")
        shares = " | ".join(f"{row['classes'][k][-1]:.3f}" for k in classes)
        lines.append(
            f"| `{row['arm']}` | {row['lr']:g} | {len(row['seeds'])} | {first['mean']:.3f} → {last['mean']:.3f} "
            f"[{last['low']:.3f}, {last['high']:.3f}] | {shares} |"
        )
    return "\n".join(lines) + "\n"


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


def draw_class_plot(arms: Sequence[dict], path: str, title: str = "") -> None:
    """The error classes over training: one panel per class (share of responses, mean over seeds x problems), a
    line per arm (a second LR of an arm: the arm's colour, lighter)."""
    from PIL import Image, ImageDraw, ImageFont

    from verl_tor.figures.task import ERROR_CLASSES

    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    panel_w, panel_h, cols = 480, 320, 2
    rows_n = math.ceil(len(ERROR_CLASSES) / cols)
    width = panel_w * cols
    title_lines = _wrap(title, font, width - 40) if title else []
    title_h = 12 + 18 * len(title_lines)
    legend_h = 28 * ((len(arms) + 2) // 3) + 10
    left, right, top, bottom = 56, 16, 30, 42
    image = Image.new("RGB", (width, title_h + panel_h * rows_n + legend_h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(title_lines):
        draw.text((width // 2, 8 + 18 * i), text, fill="black", font=font, anchor="ma")
    lrs = sorted({a["lr"] for a in arms})

    def color(row: dict) -> tuple[int, int, int]:
        base = COLORS.get(row["arm"], (100, 100, 100))
        fade = 0.5 * lrs.index(row["lr"]) / max(1, len(lrs) - 1)
        return tuple(round(c + (255 - c) * fade) for c in base)

    max_step = max((p["step"] for a in arms for p in a["accuracy"]), default=1) or 1
    for k, name in enumerate(ERROR_CLASSES):
        x0 = (k % cols) * panel_w + left
        y0 = title_h + (k // cols) * panel_h + top
        x1, y1 = x0 - left + panel_w - right, y0 - top + panel_h - bottom
        values = [v for a in arms for v in a["classes"][name]]
        hi = max(0.1, math.ceil(max(values, default=0.1) * 10) / 10)

        def px(step: float, share: float, x0=x0, x1=x1, y0=y0, y1=y1, hi=hi) -> tuple[float, float]:
            return x0 + (x1 - x0) * step / max_step, y1 - (y1 - y0) * share / hi

        draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        for i in range(0, round(hi * 10) + 1, max(1, math.ceil(hi * 10 / 5))):
            _, y = px(0, i / 10)
            draw.line([x0, y, x1, y], fill=(230, 230, 230))
            draw.text((x0 - 6, y), f"{i / 10:.1f}", fill="black", font=small, anchor="rm")
        for step in sorted({p["step"] for a in arms for p in a["accuracy"]}):
            x, _ = px(step, 0)
            draw.text((x, y1 + 6), str(step), fill="black", font=small, anchor="ma")
        draw.text((x0, y0 - 6), f"{name} (share of responses)", fill="black", font=font, anchor="ld")
        for row in arms:
            line = [px(p["step"], v) for p, v in zip(row["accuracy"], row["classes"][name], strict=True)]
            if len(line) > 1:
                draw.line(line, fill=color(row), width=3)
            for x, y in line:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color(row))
    for i, row in enumerate(arms):
        x, y = 20 + (i % 3) * 200, title_h + panel_h * rows_n + 6 + 28 * (i // 3)
        draw.line([x, y + 9, x + 24, y + 9], fill=color(row), width=3)
        label = row["arm"] + (f" lr {row['lr']:g}" if len(lrs) > 1 else "")
        draw.text((x + 32, y + 9), label, fill="black", font=font, anchor="lm")
    image.save(path, optimize=True)


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
    scores = {}
    for record in records:
        name = experiment_name(record["arm"], record["seed"], record["lr"])
        path = os.path.join(runs_dir, name, "scores.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                scores[name] = json.load(f)
    analysis = summarize_scores(records, scores) if scores else None
    summary = {"config": config, "last_steps": LAST_STEPS, "arms": rows, "per_problem": analysis}
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    table = format_table(rows, config)
    if analysis:
        table = format_paired_table(analysis) + "\n" + table
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table)
    task = config.get("task", "area")
    setting = (
        f"{task}, verl main_ppo on CPU: {config['prompts']}x{config['responses']} rollouts a step, "
        f"{config['n_val']} val problems, seeds {sorted({r['seed'] for r in records})}"
    )
    plots = ["accuracy.png"]
    if analysis:  # the band: 95 % bootstrap interval over seeds x problems
        band = [
            {**a, "accuracy": [p | {"min": p["low"], "max": p["high"]} for p in a["accuracy"]]}
            for a in analysis["arms"]
        ]
        draw_accuracy_plot(band, os.path.join(out, "accuracy.png"), f"{setting}; mean, 95 % bootstrap band")
        draw_class_plot(analysis["arms"], os.path.join(out, "error_classes.png"), f"{setting}; error classes")
        plots.append("error_classes.png")
    else:
        draw_accuracy_plot(rows, os.path.join(out, "accuracy.png"), f"{setting}; mean and min-max over seeds")
    log(table)
    log(f"[mini_repro] wrote {out}/summary.json, table.md, {', '.join(plots)}")
    if publish:
        publish_compact(out, publish, [r for r in records], ["summary.json", "table.md", *plots])
        log(f"[mini_repro] copied the compact run files, table and plots to {publish}")
    return summary


PUBLISHED_RUN_FILES = ("run.json", "scores.json")
"""What ``--publish`` copies of each run: all ``--summarize`` reads (verl's dumps and logs stay behind)."""


def publish_compact(out: str, dest: str, records: Sequence[dict], files: Sequence[str]) -> None:
    """Copy ``config.json``, each run's ``PUBLISHED_RUN_FILES`` and ``files`` (summary, table, plots) to ``dest``, so
    ``--summarize dest`` rebuilds the same table and plots."""
    dest = os.path.abspath(dest)
    if dest == os.path.abspath(out):
        return
    os.makedirs(dest, exist_ok=True)
    shutil.copyfile(os.path.join(out, "config.json"), os.path.join(dest, "config.json"))
    for record in records:
        name = experiment_name(record["arm"], record["seed"], record["lr"])
        os.makedirs(os.path.join(dest, "runs", name), exist_ok=True)
        for file in PUBLISHED_RUN_FILES:
            src = os.path.join(out, "runs", name, file)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(dest, "runs", name, file))
    for file in files:
        shutil.copyfile(os.path.join(out, file), os.path.join(dest, file))


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/verl_tor_mini_repro", help="output folder (outside the repo)")
    p.add_argument("--summarize", metavar="DIR", help="only rebuild summary.json, table.md and the plot of DIR")
    p.add_argument("--publish", metavar="DIR", help="also copy the summary, table and plot into DIR")
    p.add_argument("--pilot", action="store_true", help=f"arms {PILOT_ARMS} x LRs {PILOT_LRS}, seed 0")
    p.add_argument(
        "--part",
        choices=[*PARTS, "all"],
        default="all",
        help="arms of one part: " + "; ".join(f"{k} = {' '.join(v)}" for k, v in PARTS.items()) + " (default: all)",
    )
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="these arms instead of --part's")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 1 2 3 4 5")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="default: 5e-5 (set it from the pilot)")
    p.add_argument("--task", choices=list(TASK_DEFAULTS), default=DEFAULTS["task"], help="the figure task")
    p.add_argument(
        "--model",
        default=None,
        help="starting checkpoint (default: the shipped reader of --task, FIGURE_READER_PLUS_CHECKPOINT for area_plus)",
    )
    p.add_argument(
        "--max-response-length", type=int, default=None, help="verl's MAX_RESPONSE_LENGTH (default: per task)"
    )
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
    part_arms = [a for part in PARTS.values() for a in part] if args.part == "all" else list(PARTS[args.part])
    arms = args.arms or (list(PILOT_ARMS) if args.pilot else part_arms)
    seeds = args.seeds or ([0] if args.pilot else DEFAULTS["seeds"])
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
    from verl_tor.figures.model import FIGURE_READER_CHECKPOINT, FIGURE_READER_PLUS_CHECKPOINT

    model = os.path.abspath(
        args.model or (FIGURE_READER_PLUS_CHECKPOINT if args.task == "area_plus" else FIGURE_READER_CHECKPOINT)
    )
    if not os.path.exists(os.path.join(model, "config.json")):
        raise MiniReproError(
            f"--model {model}: no checkpoint there (config.json missing). Fix: train it (python -m "
            f"verl_tor.figures.sft --task {args.task} --out-dir DIR) and pass --model DIR."
        )
    args.model = model
    args.max_response_length = args.max_response_length or TASK_DEFAULTS[args.task]["max_response_length"]
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
    grid = order_grid(arms, seeds, lrs)
    progress = Progress(len(grid), args.jobs)

    def one(arm: str, seed: int, lr: float) -> dict:
        start, experiment = time.perf_counter(), experiment_name(arm, seed, lr)
        ran = not is_finished(os.path.join(out, "runs", experiment))
        record = run_one(out, config, arm, seed, lr, log)
        log(progress.finished(experiment, time.perf_counter() - start, ran))
        return record

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
