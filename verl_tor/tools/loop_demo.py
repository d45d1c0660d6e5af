"""``verl-tor demo``: verl's real trainer (``python -m verl.trainer.main_ppo``) with ToR, a few steps on CPU.

1. ``verl_tor.local.prepare`` writes a tiny Qwen2.5-VL checkpoint and geometry problems in verl's RL format;
2. the packaged CPU recipe ``verl_tor/recipes/cpu_tiny/grpo_tor.sh`` runs verl's trainer on them (Ray,
   TransferQueue, the agent loop with the ``hf`` rollout, the FSDP2 actor on the ``cpu`` platform, weight sync,
   reward workers) with ``tor.log_token_maps`` on;
3. a progress line per step (reward, policy loss, the ``tor/*`` metrics, times) as verl logs it, then a summary
   with the token maps the training-time writer wrote.

``verl-tor demo --one-step`` runs the single-step walk-through instead (``verl_tor.tools.demo``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoopDemoResult", "run_loop_demo", "format_step"]

PROGRESS_KEYS = (
    ("critic/score/mean", "reward", "{:.3f}"),
    ("actor/pg_loss", "pg_loss", "{:+.4f}"),
    ("tor/reasoning_frac", "T_r", "{:.2f}"),
    ("tor/perception_frac", "T_p", "{:.2f}"),
    ("tor/overlap_frac", "both", "{:.2f}"),
    ("tor/weight_mean", "w̄", "{:.2f}"),
    ("tor/entropy_threshold", "H cut", "{:.2f}"),
    ("tor/sensitivity_threshold", "|Δlogp| cut", "{:.2f}"),
    ("timing_s/tor_noimg", "noimg", "{:.2f}s"),
    ("timing_s/tor_select", "select", "{:.2f}s"),
    ("timing_s/step", "step", "{:.1f}s"),
)


@dataclass
class LoopDemoResult:
    run: Any
    """The recipe run (``verl_tor.local.launch.LoopRun``: exit code, per-step metrics, log, output folder)."""
    token_maps: list[str]
    seconds: dict[str, float] = field(default_factory=dict)


def format_step(step: dict, total: int) -> str:
    """One progress line from verl's per-step metrics."""
    parts = [f"step {step['step']}/{total}"]
    for key, label, fmt in PROGRESS_KEYS:
        if key in step:
            parts.append(f"{label} {fmt.format(step[key])}")
    return "  ".join(parts)


def run_loop_demo(
    out_dir: str,
    steps: int = 4,
    seed: int = 0,
    recipe: str = "grpo_tor",
    overrides: tuple[str, ...] = (),
    token_map_every: int = 1,
    prompts: int = 4,
    n: int = 4,
    response_length: int | None = None,
    env: dict[str, str] | None = None,
    print_fn: Any = print,
) -> LoopDemoResult:
    """Prepare the model and data under ``out_dir``, run the CPU recipe for ``steps`` steps, report as it goes.

    ``prompts`` x ``n`` rollouts a step, one actor update a step; ``overrides`` are hydra overrides for main_ppo,
    ``env`` the recipe's variables (``verl_tor/recipes/cpu_tiny/common.sh``: ``LR``, ``SAVE_FREQ``, ...).
    """
    from verl_tor.local.launch import run_cpu_recipe
    from verl_tor.local.prepare import prepare

    out_dir = os.path.abspath(out_dir)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    paths = prepare(out_dir, seed=seed)
    seconds["prepare"] = time.perf_counter() - t0
    print_fn(f"[demo] model {paths['model']}, data {os.path.dirname(paths['train'])} ({seconds['prepare']:.1f} s)")
    print_fn(
        f"[demo] verl's main_ppo: verl_tor/recipes/cpu_tiny/{recipe}.sh, {steps} steps (verl's own output: "
        f"{os.path.join(out_dir, 'runs', recipe, 'main_ppo.log')})"
    )

    def on_step(step: dict) -> None:
        if "step" in step and any(k.startswith("tor/") or k.startswith("actor/") for k in step):
            print_fn("[demo] " + format_step(step, steps))

    tor_run = recipe != "grpo"
    maps = [f"tor.log_token_maps={token_map_every}", "tor.log_token_maps_rollouts=8"] if tor_run else []
    extra_env = dict(env or {})
    env = {
        "TOTAL_STEPS": str(steps),
        "SEED": str(seed + 1),
        "ROLLOUT_BATCH_SIZE": str(prompts),
        "UPDATE_BATCH_SIZE": str(prompts),
        "N_RESPONSES": str(n),
        "MICRO_BATCH_SIZE": str(prompts * n),
    }
    if response_length is not None:
        env["MAX_RESPONSE_LENGTH"] = str(response_length)
    env.update(extra_env)
    t0 = time.perf_counter()
    run = run_cpu_recipe(
        recipe,
        [*maps, *overrides],
        cpu_dir=out_dir,
        experiment=recipe,
        env=env,
        on_step=on_step,
    )
    seconds["main_ppo"] = time.perf_counter() - t0
    map_dir = os.path.join(run.out_dir, "tor_token_maps")
    token_maps = sorted(os.path.join(map_dir, f) for f in os.listdir(map_dir)) if os.path.isdir(map_dir) else []
    return LoopDemoResult(run=run, token_maps=token_maps, seconds=seconds)


def main(out_dir: str, steps: int, seed: int, recipe: str, overrides: list[str], **sizes: Any) -> int:
    """``verl-tor demo``: run, print, summarise; 0 on success, 1 when verl's trainer failed."""
    t0 = time.perf_counter()
    if recipe == "grpo":
        print("[demo] tor.enable=false: stock GRPO (cpu_tiny/grpo.sh, trainer_mode=sync), no ToR stage")
    result = run_loop_demo(out_dir, steps=steps, seed=seed, recipe=recipe, overrides=tuple(overrides), **sizes)
    total = time.perf_counter() - t0
    run = result.run
    if run.returncode != 0:
        print(f"\n[demo] verl's main_ppo failed (exit {run.returncode}); the end of {run.log_path}:\n{run.tail(40)}")
        return 1
    last = run.steps[-1] if run.steps else {}
    tor = {k: v for k, v in sorted(last.items()) if k.startswith("tor/")}
    what = "stock GRPO" if recipe == "grpo" else "ToR"
    print(f"\n[demo] {len(run.steps)} steps of verl's real trainer ({what}) in {total:.0f} s")
    if tor:
        width = max(len(k) for k in tor)
        print("[demo] last step's ToR metrics:")
        for key, value in tor.items():
            print(f"         {key:<{width}}  {value:.4f}")
    if result.token_maps:
        print(f"[demo] token maps ({len(result.token_maps)}): {os.path.dirname(result.token_maps[0])}/")
        print(f"[demo] open {result.token_maps[-1]}")
    print(f"[demo] checkpoints, metrics.jsonl and verl's log: {run.out_dir}")
    return 0
