"""Shared by the loop tests (``tests/test_main_ppo*_on_cpu.py``): running a CPU recipe through verl's real
``main_ppo`` and reading what it logged; their data folder is ``tests/conftest.py``'s ``cpu_dir``. Each module owns
the runs its tests share (session-scoped fixtures), and ``scripts/dev.sh test`` schedules by module
(``--dist loadscope``), so every run happens once, on one xdist worker."""

from __future__ import annotations

import math
from pathlib import Path

from verl_tor.local.launch import LoopRun, run_cpu_recipe

TESTS = Path(__file__).resolve().parent
TIMEOUT = 600


def run(cpu_dir: str, recipe: str, experiment: str, *overrides: str, steps: int = 2, **env: str) -> LoopRun:
    result = run_cpu_recipe(
        recipe,
        list(overrides),
        cpu_dir=cpu_dir,
        experiment=experiment,
        env={"TOTAL_STEPS": str(steps), **env},
        timeout=TIMEOUT,
    )
    return result


def assert_ok(result: LoopRun, steps: int) -> None:
    assert result.returncode == 0, f"main_ppo failed (rc {result.returncode}):\n{result.tail(60)}"
    assert [s["step"] for s in result.steps] == list(range(1, steps + 1)), result.tail(20)


# Metrics that measure the machine, not the training: left out of run-to-run comparisons.
VOLATILE = ("timing_s/", "timing_per_token_ms/", "perf/", "actor/perf/", "global_seqlen/", "throughput")


def training_metrics(step: dict) -> dict:
    return {k: v for k, v in step.items() if not any(part in k for part in VOLATILE)}


def is_nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


ONE_ROW = {"ROLLOUT_BATCH_SIZE": "1", "UPDATE_BATCH_SIZE": "1", "N_RESPONSES": "1", "MICRO_BATCH_SIZE": "1"}
# an entropy bonus gives the single trajectory a gradient whatever its advantage, so step 2 runs a moved policy
ONE_ROW_OVERRIDES = ("algorithm.adv_estimator=reinforce_plus_plus", "actor_rollout_ref.actor.entropy_coeff=0.01")
