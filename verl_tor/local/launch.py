"""Run a CPU recipe (``recipes/cpu_tiny/*.sh``: verl's real ``python -m verl.trainer.main_ppo``) from Python.

The demo, the loop tests and the benchmarks use it: it runs the recipe in its own process group, sends verl's output
to a log file, reads the per-step metrics verl's ``file`` logger writes (one JSON line per step, ``step`` and
``data``) while the run goes, and hands each new step to ``on_step``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RECIPES", "LoopRun", "recipes_dir", "read_metrics", "run_cpu_recipe"]

RECIPES = ("grpo", "grpo_tor", "dapo_tor", "grpo_tor_gpu_shape")
"""The scripts of ``recipes/cpu_tiny/``."""


@dataclass
class LoopRun:
    """One finished recipe run."""

    returncode: int
    steps: list[dict] = field(default_factory=list)
    """Per-step metrics (verl's ``file`` logger), in step order; ``steps[i]["step"]`` is verl's global step."""
    log_path: str = ""
    out_dir: str = ""
    seconds: float = 0.0

    def metric(self, key: str) -> list[float]:
        """``key`` at every step that logged it."""
        return [s[key] for s in self.steps if key in s]

    def tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def recipes_dir() -> Path:
    """``recipes/cpu_tiny`` of this checkout (the recipes live next to the package, not inside it)."""
    path = Path(__file__).resolve().parents[2] / "recipes" / "cpu_tiny"
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} not found: the CPU recipes ship with the verl_tor repository, not the wheel. "
            "Fix: run from a checkout (git clone ...; pip install -e .)."
        )
    return path


def read_metrics(path: str) -> list[dict]:
    """verl's ``file`` logger output -> one dict per step (``step`` + the step's metrics)."""
    steps = []
    if not os.path.exists(path):
        return steps
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                steps.append({"step": record["step"], **record["data"]})
    return steps


def run_cpu_recipe(
    recipe: str,
    overrides: Sequence[str] = (),
    *,
    cpu_dir: str,
    experiment: str,
    env: dict[str, str] | None = None,
    on_step: Callable[[dict], None] | None = None,
    timeout: float | None = None,
    poll_seconds: float = 0.5,
) -> LoopRun:
    """Run ``recipes/cpu_tiny/<recipe>.sh`` with hydra ``overrides``; returns its exit code and per-step metrics.

    Args:
        recipe: one of ``RECIPES``.
        cpu_dir: where ``verl_tor.local.prepare`` wrote ``model/`` and ``data/`` (the recipe's ``CPU_DIR``); runs
            go to ``<cpu_dir>/runs/<experiment>/`` (checkpoints, token maps, ``metrics.jsonl``, ``main_ppo.log``).
        experiment: ``trainer.experiment_name`` and the run's folder name.
        env: extra environment variables for the recipe (e.g. ``TOTAL_STEPS``, ``SEED``).
        on_step: called with each step's metrics as verl logs them.
        timeout: seconds before the run is killed (``returncode`` -9).
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r} is not one of {RECIPES}")
    out_dir = os.path.join(cpu_dir, "runs", experiment)
    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    log_path = os.path.join(out_dir, "main_ppo.log")
    run_env = {
        **os.environ,
        "CPU_DIR": cpu_dir,
        "EXPERIMENT_NAME": experiment,
        "LOGGER": '["console","file"]',
        "VERL_FILE_LOGGER_PATH": metrics_path,
        # the interpreter running this (a venv's python) runs the recipe's `python3 -m verl.trainer.main_ppo`
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        **(env or {}),
    }
    run_env.setdefault("RAY_TMP", tempfile.mkdtemp(prefix="vtray_", dir="/tmp"))  # short: Ray's socket paths
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    cmd = ["bash", str(recipes_dir() / f"{recipe}.sh"), *overrides]
    start = time.perf_counter()
    seen = 0
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env, start_new_session=True)
        try:
            while True:
                try:
                    returncode = proc.wait(timeout=poll_seconds)
                except subprocess.TimeoutExpired:
                    returncode = None
                if on_step is not None:
                    steps = read_metrics(metrics_path)
                    for step in steps[seen:]:
                        on_step(step)
                    seen = len(steps)
                if returncode is not None:
                    break
                if timeout is not None and time.perf_counter() - start > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    returncode = -9
                    break
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    if run_env["RAY_TMP"].startswith("/tmp/vtray_") and (env or {}).get("RAY_TMP") is None:
        shutil.rmtree(run_env["RAY_TMP"], ignore_errors=True)
    steps = read_metrics(metrics_path)
    if on_step is not None:
        for step in steps[seen:]:
            on_step(step)
    return LoopRun(
        returncode=returncode,
        steps=steps,
        log_path=log_path,
        out_dir=out_dir,
        seconds=time.perf_counter() - start,
    )
