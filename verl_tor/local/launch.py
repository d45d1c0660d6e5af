"""Run a CPU recipe (``verl_tor/recipes/cpu_tiny/*.sh``: verl's real ``python -m verl.trainer.main_ppo``) from Python.

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

__all__ = [
    "RECIPES",
    "recipe_command",
    "LoopRun",
    "RecipeInputError",
    "check_hydra_path",
    "recipes_dir",
    "read_metrics",
    "run_cpu_recipe",
]

RECIPES = ("grpo", "grpo_tor", "dapo", "dapo_tor", "grpo_tor_gpu_shape")
"""The scripts of ``verl_tor/recipes/cpu_tiny/`` (package data; a checkout's ``recipes/cpu_tiny/`` forwards to them):
stock GRPO / DAPO (``trainer_mode=sync``, ToR off), their ToR arms, and ToR-GRPO in the GPU recipes' batching
shape."""


class RecipeInputError(ValueError):
    """A recipe input that would fail only once verl's trainer has started; the message names it and the fix."""


def check_hydra_path(name: str, path: str) -> None:
    """Refuse a path that hydra would not read back as itself when the recipe puts it in an override.

    The CPU recipes write folders into hydra overrides unquoted (``trainer.default_local_dir=<cpu_dir>/runs/...``,
    ``data.train_files=...``); hydra reads ``a,b`` as a sweep ("Ambiguous value"), refuses ``'``, ``#``, ``!``,
    ``&``, ``~``, brackets and non-ASCII letters, trims spaces at the ends, and OmegaConf resolves ``${...}`` --
    all after Ray has started. Checked with hydra's own override parser, so the rule is hydra's, not a copy.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        value = OverridesParser.create().parse_override(f"key={path}").value()
    except HydraException:
        value = None
    if value != path or "${" in path:
        raise RecipeInputError(
            f"{name} {path!r}: verl's hydra command line cannot carry this path (it would split it at a comma, "
            "or refuse characters such as ' # ! & ~ [ ] ( ) { } = or non-ASCII letters). Fix: choose a folder "
            "whose path has only letters, digits, '/', '.', '_', '-', ' ' (inside), ':' or '@'."
        )


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
    """The CPU recipes' folder: inside the package (``verl_tor/recipes/cpu_tiny``), so a wheel install runs them too."""
    from verl_tor.recipes import cpu_recipes_dir

    path = cpu_recipes_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} not found: this verl_tor install lacks its package data (the CPU recipes). "
            "Fix: reinstall verl_tor from its wheel or checkout (pip install --force-reinstall verl_tor)."
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
    """Run the CPU recipe ``<recipe>.sh`` with hydra ``overrides``; returns its exit code and per-step metrics.

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
    check_hydra_path("the run folder", os.path.abspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    log_path = os.path.join(out_dir, "main_ppo.log")
    own_ray_tmp = (env or {}).get("RAY_TMP") is None
    run_env = recipe_env(cpu_dir, experiment, metrics_path, env)
    if own_ray_tmp:
        run_env["RAY_TMP"] = tempfile.mkdtemp(prefix="vtray_", dir="/tmp")  # short: Ray's socket paths
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    cmd = ["bash", str(recipes_dir() / f"{recipe}.sh"), *overrides]
    start = time.perf_counter()
    seen = 0
    try:
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
                        kill_session(proc)
                        returncode = -9
                        break
            except BaseException:  # Ctrl-C (KeyboardInterrupt), or an exception from on_step
                kill_session(proc)
                raise
            # main_ppo's Ray processes outlive a failed driver for a moment; none may outlive the run
            kill_session(proc)
    finally:
        if own_ray_tmp:
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


def recipe_env(cpu_dir: str, experiment: str, metrics_path: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment ``run_cpu_recipe`` runs a recipe in: this process's, the recipe's folders and logger, the
    caller's ``env`` last."""
    return {
        **os.environ,
        "CPU_DIR": cpu_dir,
        "EXPERIMENT_NAME": experiment,
        "LOGGER": '["console","file"]',
        "VERL_FILE_LOGGER_PATH": metrics_path,
        # the interpreter running this (a venv's python) runs the recipe's `python3 -m verl.trainer.main_ppo`
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        **(env or {}),
    }


def recipe_command(
    recipe: str, overrides: Sequence[str] = (), *, cpu_dir: str, experiment: str, env: dict[str, str] | None = None
) -> list[str]:
    """The ``main_ppo`` command line ``run_cpu_recipe`` would run, one argument per item, without running it (the
    recipe's ``VERL_TOR_DRY_RUN=print``): what a test checks instead of starting verl's trainer."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r} is not one of {RECIPES}")
    metrics_path = os.path.join(cpu_dir, "runs", experiment, "metrics.jsonl")
    run_env = {**recipe_env(cpu_dir, experiment, metrics_path, env), "VERL_TOR_DRY_RUN": "print"}
    cmd = ["bash", str(recipes_dir() / f"{recipe}.sh"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} (dry run) failed with exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()


def session_processes(session: int) -> list[int]:
    """Ids of the live processes whose session id is ``session`` (Linux ``/proc``; empty elsewhere)."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # fields after the command name (which may hold spaces): state ppid pgrp session ...; a zombie is dead
        # already (waiting for its parent, or for a container's pid 1 that may never reap it)
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 3 and int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_session(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGKILL every process of the recipe's session and wait until they are gone.

    The recipe runs in a session of its own (``start_new_session``). Killing its process group is not enough: Ray's
    driver (``main_ppo``) makes itself a process-group leader at ``ray.init`` (Ray's reaper), so it and the Ray
    daemons and workers it starts sit in other groups of the same session, and would live on -- still writing to the
    Ray temp folder -- after the recipe's ``bash`` is gone.
    """
    session = proc.pid
    deadline = time.monotonic() + grace
    while True:
        pids = [pid for pid in session_processes(session) if pid != os.getpid()]
        if proc.poll() is None:
            pids.append(proc.pid)
        for pid in set(pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc.poll() is None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        if not pids or time.monotonic() > deadline:
            return
        time.sleep(0.1)
