"""``verl-tor demo``: verl's real trainer (``python -m verl.trainer.main_ppo``) with ToR, a few steps on CPU.

1. ``verl_tor.local.prepare`` writes a tiny Qwen2.5-VL checkpoint and geometry problems in verl's RL format;
2. the packaged CPU recipe ``verl_tor/recipes/cpu_tiny/grpo_tor.sh`` (``dapo_tor.sh``; ``grpo.sh`` / ``dapo.sh`` with
   ToR off) runs verl's trainer on them (Ray, TransferQueue, the agent loop with the ``hf`` rollout, the FSDP2 actor
   on the ``cpu`` platform, weight sync, reward workers) with ``tor.log_token_maps`` on, in a fresh run folder
   ``<out-dir>/runs/<recipe>-<k>``;
3. a progress line per step (reward, policy loss, the ``tor/*`` metrics, times) as verl logs it, then a summary
   with the token maps the training-time writer wrote.

Everything that would fail only inside verl's trainer is checked first, before Ray starts (``check_loop_demo``).
``verl-tor demo --one-step`` runs the single-step walk-through instead (``verl_tor.tools.demo``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LOOP_RESPONSE_LENGTH",
    "MAX_SEED",
    "DemoInputError",
    "LoopDemoResult",
    "check_loop_demo",
    "claim_run_name",
    "fresh_folder",
    "demo_recipe",
    "demo_recipe_env",
    "format_step",
    "plural",
    "run_loop_demo",
]

LOOP_RESPONSE_LENGTH = 48
"""Response limit of ``verl-tor demo`` (``MAX_RESPONSE_LENGTH``): the task's answers take 26-28 tokens and the end of
turn (``verl_tor.local.prepare.ANSWER_TOKENS``), so 48 leaves room for a longer, wrong one."""

MAX_SEED = 2**32 - 2
"""Largest ``--seed``: the recipe runs with ``SEED = seed + 1`` (``seed`` 0 is the recipe's own default 1), and verl
exports the rollout seed as ``PYTHONHASHSEED``, which Python refuses above 2^32 - 1: every Ray worker would die at
start-up and Ray report a node time-out."""

PROGRESS_KEYS = (
    ("critic/score/mean", "reward", "{:.3f}"),
    ("actor/pg_loss", "pg_loss", "{:+.4f}"),
    ("tor/reasoning_frac", "T_r", "{:.2f}"),
    ("tor/perception_frac", "T_p", "{:.2f}"),
    ("tor/overlap_frac", "both", "{:.2f}"),
    ("tor/weight_mean", "w̄", "{:.2f}"),
    # three significant digits: on the figure reader the |Δ log p| cut is ~0.0015 and the top-p entropy cut often 0
    ("tor/entropy_threshold", "H cut", "{:.3g}"),
    ("tor/sensitivity_threshold", "|Δlogp| cut", "{:.3g}"),
    ("timing_s/tor_noimg", "noimg", "{:.2f}s"),
    ("timing_s/tor_select", "select", "{:.2f}s"),
    ("timing_s/step", "step", "{:.1f}s"),
)


class DemoInputError(ValueError):
    """A demo setting verl's trainer would fail on (or hang with) after start-up; the message names it and the fix."""


def plural(count: int, noun: str) -> str:
    """``1 step``, ``4 steps``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def demo_recipe(algorithm: str, tor_enabled: bool) -> str:
    """The ``recipes/cpu_tiny`` script: ``grpo_tor`` / ``dapo_tor`` with ToR, stock ``grpo`` / ``dapo`` without."""
    if algorithm not in ("grpo", "dapo"):
        raise DemoInputError(f"algorithm {algorithm!r}: the CPU recipes are grpo and dapo. Fix: --algorithm grpo")
    return f"{algorithm}_tor" if tor_enabled else algorithm


def demo_recipe_env(
    steps: int, seed: int, prompts: int, n: int, response_length: int, train_prompts: int
) -> dict[str, str]:
    """The recipe variables (``recipes/cpu_tiny/common.sh``) for a demo of ``steps`` steps of ``prompts`` x ``n``.

    One actor update a step (update batch = rollout batch). ``TOTAL_EPOCHS`` is what ``steps`` need: verl's V1
    trainer stops after ``(train_prompts // prompts) * total_epochs`` steps whatever ``total_training_steps`` says.
    DAPO's overlong buffer is a quarter of the response limit (the recipe's 12 of 48): a fixed 12 would penalise every
    response of a short limit.
    """
    steps_per_epoch = train_prompts // prompts
    return {
        "TOTAL_STEPS": str(steps),
        "TOTAL_EPOCHS": str(math.ceil(steps / steps_per_epoch)),
        "SEED": str(seed + 1),
        "ROLLOUT_BATCH_SIZE": str(prompts),
        "UPDATE_BATCH_SIZE": str(prompts),
        "N_RESPONSES": str(n),
        "MICRO_BATCH_SIZE": str(prompts * n),
        "MAX_RESPONSE_LENGTH": str(response_length),
        "OVERLONG_BUFFER": str(max(1, response_length // 4)),
    }


def check_loop_demo(
    out_dir: str,
    *,
    steps: int,
    seed: int,
    recipe: str,
    prompts: int,
    n: int,
    response_length: int,
    scorer_policy: str = "old",
    needs_image_free_pass: bool = True,
) -> list[str]:
    """Refuse, before anything runs, what verl's trainer would fail on (or hang with) only after Ray started.

    Raises ``DemoInputError`` (one line: the setting, why, the fix); returns warnings for settings that run but teach
    little. Fast: no verl, no Ray, the training file's row count read from its parquet footer.
    """
    from verl_tor.figures import FIGURE_READER_CHECKPOINT
    from verl_tor.local.launch import RecipeInputError, check_hydra_path
    from verl_tor.local.prepare import ANSWER_TOKENS, count_train_prompts

    for name, value in (("steps", steps), ("prompts", prompts), ("n", n), ("response_length", response_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DemoInputError(f"--{name.replace('_', '-')} {value!r}: give an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise DemoInputError(
            f"--seed {seed!r}: the recipe seeds verl with seed + 1, which verl exports as PYTHONHASHSEED (at most "
            f"2^32 - 1). Fix: give a seed from 0 to {MAX_SEED}."
        )
    try:
        check_hydra_path("--out-dir", os.path.abspath(out_dir))
        check_hydra_path("the figure reader's folder (verl_tor's installation)", FIGURE_READER_CHECKPOINT)
    except RecipeInputError as exc:
        raise DemoInputError(str(exc)) from None
    available = count_train_prompts(out_dir)
    if prompts > available:
        raise DemoInputError(
            f"--prompts {prompts}: the demo's data hold {available} training problems and verl's dataloader drops an "
            f"incomplete batch, so no step would run. Fix: --prompts {available} or fewer."
        )
    algorithm = recipe.split("_")[0]
    if algorithm == "dapo" and scorer_policy == "ref" and needs_image_free_pass and recipe.endswith("_tor"):
        raise DemoInputError(
            "tor.scorer_policy='ref' with --algorithm dapo: the DAPO recipe has no KL loss, so verl starts no "
            "reference policy to score the image-free view. Fix: --algorithm grpo (its KL loss has a reference "
            "policy), or tor.scorer_policy=old (the paper's)."
        )
    shortest, longest = ANSWER_TOKENS
    if algorithm == "dapo" and n > 1 and response_length < shortest:
        raise DemoInputError(
            f"--response-length {response_length} with --algorithm dapo: every answer takes at least {shortest} "
            "tokens, so every reward is 0, DAPO's dynamic sampling discards every group and keeps sampling forever. "
            f"Fix: --response-length {longest + 1} or more."
        )
    warnings = []
    if n == 1:
        dapo = ", and DAPO's dynamic sampling, which drops groups whose rewards all agree, keeps every group of one"
        warnings.append(
            "--n 1: a group of one response has nothing to compare with, so the advantage is the raw reward (GRPO's "
            f"group baseline and scale need two responses or more){dapo if algorithm == 'dapo' else ''}. "
            "Use --n 2 or more."
        )
    if response_length < shortest:
        warnings.append(
            f"--response-length {response_length}: every answer of this task takes at least {shortest} tokens, so "
            f"every response is cut before \\boxed{{}} closes and every reward is 0: nothing to learn. Use "
            f"--response-length {longest + 1} or more."
        )
    elif response_length < longest:
        warnings.append(
            f"--response-length {response_length}: answers with a two-digit area take {longest} tokens and are cut "
            f"before \\boxed{{}} closes (reward 0 however right). Use --response-length {longest + 1} or more."
        )
    return warnings


def fresh_folder(parent: str, prefix: str) -> str:
    """Create and return ``<parent>/<prefix>-<k>`` for the first free ``k`` from 1 (``os.mkdir`` claims it
    atomically, so two runs started at once get two folders)."""
    os.makedirs(parent, exist_ok=True)
    k = 1
    while True:
        path = os.path.join(parent, f"{prefix}-{k}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            k += 1


def claim_run_name(out_dir: str, recipe: str) -> str:
    """A fresh run folder ``<out_dir>/runs/<recipe>-<k>``, created here; returns its name (the experiment name): a
    demo never writes into an earlier run's folder, so its token maps, ``metrics.jsonl`` and ``main_ppo.log`` are
    its own. The data (``<out_dir>/data``) are shared."""
    return os.path.basename(fresh_folder(os.path.join(out_dir, "runs"), recipe))


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
    response_length: int = LOOP_RESPONSE_LENGTH,
    env: dict[str, str] | None = None,
    print_fn: Any = print,
) -> LoopDemoResult:
    """Prepare the data under ``out_dir``, run the CPU recipe for ``steps`` steps in a fresh run folder, report as it
    goes.

    ``prompts`` x ``n`` rollouts a step, one actor update a step; ``overrides`` are hydra overrides for main_ppo,
    ``env`` the recipe's variables (``verl_tor/recipes/cpu_tiny/common.sh``: ``LR``, ``SAVE_FREQ``, ...) on top of the
    demo's.
    Raises ``DemoInputError`` before anything runs for what ``check_loop_demo`` refuses.
    """
    from verl_tor.local.launch import run_cpu_recipe
    from verl_tor.local.prepare import count_train_prompts, prepare

    out_dir = os.path.abspath(out_dir)
    sizes = dict(steps=steps, seed=seed, recipe=recipe, prompts=prompts, n=n, response_length=response_length)
    check_loop_demo(out_dir, **sizes)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    paths = prepare(out_dir, seed=seed)
    seconds["prepare"] = time.perf_counter() - t0
    run_name = claim_run_name(out_dir, recipe)
    print_fn(f"[demo] model {paths['model']}, data {os.path.dirname(paths['train'])} ({seconds['prepare']:.1f} s)")
    print_fn(
        f"[demo] verl's main_ppo: verl_tor/recipes/cpu_tiny/{recipe}.sh, {plural(steps, 'step')} (verl's own output: "
        f"{os.path.join(out_dir, 'runs', run_name, 'main_ppo.log')})"
    )

    def on_step(step: dict) -> None:
        if "step" in step and any(k.startswith("tor/") or k.startswith("actor/") for k in step):
            print_fn("[demo] " + format_step(step, steps))

    tor_run = recipe.endswith("_tor")
    maps = [f"tor.log_token_maps={token_map_every}", "tor.log_token_maps_rollouts=8"] if tor_run else []
    run_env = demo_recipe_env(steps, seed, prompts, n, response_length, count_train_prompts(out_dir))
    run_env.update(env or {})
    t0 = time.perf_counter()
    run = run_cpu_recipe(
        recipe,
        [*maps, *overrides],
        cpu_dir=out_dir,
        experiment=run_name,
        env=run_env,
        on_step=on_step,
    )
    seconds["main_ppo"] = time.perf_counter() - t0
    map_dir = os.path.join(run.out_dir, "tor_token_maps")
    token_maps = sorted(os.path.join(map_dir, f) for f in os.listdir(map_dir)) if os.path.isdir(map_dir) else []
    return LoopDemoResult(run=run, token_maps=token_maps, seconds=seconds)


RECIPE_NAMES = {"grpo": "stock GRPO", "dapo": "stock DAPO", "grpo_tor": "ToR-GRPO", "dapo_tor": "ToR-DAPO"}


def main(out_dir: str, steps: int, seed: int, recipe: str, overrides: list[str], **sizes: Any) -> int:
    """``verl-tor demo``: run, print, summarise; 0 on success, 1 when verl's trainer failed."""
    t0 = time.perf_counter()
    if not recipe.endswith("_tor"):
        print(
            f"[demo] tor.enable=false: {RECIPE_NAMES[recipe]} (verl_tor/recipes/cpu_tiny/{recipe}.sh, "
            "trainer_mode=sync), no ToR stage"
        )
    result = run_loop_demo(out_dir, steps=steps, seed=seed, recipe=recipe, overrides=tuple(overrides), **sizes)
    total = time.perf_counter() - t0
    run = result.run
    if run.returncode != 0:
        print(f"\n[demo] verl's main_ppo failed (exit {run.returncode}); the end of {run.log_path}:\n{run.tail(40)}")
        return 1
    last = run.steps[-1] if run.steps else {}
    tor = {k: v for k, v in sorted(last.items()) if k.startswith("tor/")}
    print(f"\n[demo] {plural(len(run.steps), 'step')} of verl's real trainer ({RECIPE_NAMES[recipe]}) in {total:.0f} s")
    if tor:
        width = max(len(k) for k in tor)
        print("[demo] last step's ToR metrics:")
        for key, value in tor.items():
            print(f"         {key:<{width}}  {value:.4g}")
    if result.token_maps:
        print(f"[demo] token maps ({len(result.token_maps)}): {os.path.dirname(result.token_maps[0])}/")
        print(f"[demo] open {result.token_maps[-1]}")
    saved = sorted(d for d in os.listdir(run.out_dir) if d.startswith("global_step_"))
    kept = "checkpoints (" + ", ".join(saved) + "), " if saved else ""
    print(f"[demo] {kept}metrics.jsonl and verl's log (main_ppo.log): {run.out_dir}")
    return 0
