"""``verl-tor``: the command line (``demo``, ``inspect``, ``docs``, ``check-config``, ``config-path``).

``verl-tor demo`` runs ToR on CPU with no downloads and prints what it selected; ``verl-tor docs`` prints the
README's config and metrics tables, generated from ``ToRConfig``'s field docstrings and ``verl_tor.metrics``
(the README is checked against it by a test, so the docs cannot drift from the code).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import time
from typing import Any

from verl_tor.config import CHOICES, ToRConfig, ToRConfigError
from verl_tor.tools.loop_demo import (
    LOOP_RESPONSE_LENGTH,
    MAX_SEED,
    DemoInputError,
    check_loop_demo,
    demo_recipe,
    fresh_folder,
)

DEMO_FLAGS = {
    "trainer.total_training_steps": "--steps",
    "data.train_batch_size": "--prompts",
    "actor_rollout_ref.actor.ppo_mini_batch_size": "--prompts",
    "actor_rollout_ref.rollout.n": "--n",
    "data.max_response_length": "--response-length",
    "actor_rollout_ref.rollout.response_length": "--response-length",
    "data.seed": "--seed",
    "actor_rollout_ref.rollout.seed": "--seed",
    "trainer.default_local_dir": "--out-dir",
    "algorithm.filter_groups.enable": "--algorithm dapo",
}
"""verl settings ``verl-tor demo`` sets through a flag of its own: an override of one of them names the flag."""


def parse_overrides(pairs: list[str], flags: dict[str, str] | None = None) -> dict[str, Any]:
    """``["tor.reasoning_ratio=0.2", "+tor.scope=group"]`` -> ``{"reasoning_ratio": 0.2, "scope": "group"}``.

    Parsed by hydra's own override parser, so a value means here what it means on verl's command line:
    ``1e-1`` is 0.1, ``0x1`` and ``yes`` are strings (which ``ToRConfig`` then refuses), ``null`` is None. Only
    ``tor.<field>`` keys (with hydra's ``+``/``++`` prefixes) apply; sweeps and deletions are refused. ``flags``
    (``DEMO_FLAGS``) maps verl settings the command sets itself to its flag, which the error for them then names.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out: dict[str, Any] = {}
    for pair in pairs:
        try:
            override = parser.parse_override(pair)
        except HydraException as exc:
            raise ToRConfigError(
                f"override {pair!r} is not a hydra override ({exc}). Fix: write tor.<field>=<value>, "
                "e.g. tor.reasoning_ratio=0.2"
            ) from exc
        key = override.key_or_group
        if not key.startswith("tor.") or key.count(".") != 1:
            raise ToRConfigError(
                f"override {pair!r}: only tor.<field> overrides apply here, and {key!r} is not one. "
                + _fix_for(key, flags)
            )
        if override.is_delete() or override.is_sweep_override():
            raise ToRConfigError(
                f"override {pair!r}: deletions and sweeps have no meaning for one run. Fix: give one value, "
                "e.g. tor.scope=group"
            )
        out[key.removeprefix("tor.")] = override.value()
    return out


def _fix_for(key: str, flags: dict[str, str] | None) -> str:
    """The fix for a non-``tor.*`` override: the command's own flag, the ToR field it looks like, or the recipe."""
    last = key.rsplit(".", 1)[-1]
    if flags and key in flags:
        return f"Fix: use {flags[key]} (the demo sets {key} from it)."
    if last in ToRConfig.field_docs():
        return f"Fix: write tor.{last}=<value> (see `verl-tor docs`)."
    return (
        "Fix: give a tor.<field> (see `verl-tor docs`); verl's own settings go on a recipe's command line instead, "
        f"e.g. `bash recipes/cpu_tiny/grpo_tor.sh {key}=<value>` (after python -m verl_tor.local.prepare)."
    )


def config_table() -> str:
    """Markdown table of every ``tor.*`` field: name, default, allowed values, meaning (from the docstrings)."""
    defaults = ToRConfig().to_dict()
    lines = ["| field | default | values | meaning |", "| --- | --- | --- | --- |"]
    for name, doc in ToRConfig.field_docs().items():
        values = " \\| ".join(CHOICES[name]) if name in CHOICES else ""
        default = str(defaults[name]).lower() if isinstance(defaults[name], bool) else defaults[name]
        escaped = doc.replace("|", "\\|")
        lines.append(f"| `tor.{name}` | `{default}` | {values} | {escaped} |")
    return "\n".join(lines)


def metrics_table() -> str:
    """Markdown table of every metric key verl_tor logs, from the docstrings in ``verl_tor.metrics``."""
    from verl_tor import metrics

    tree = ast.parse(inspect.getsource(metrics))
    lines = ["| metric | meaning |", "| --- | --- |"]
    body = tree.body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.Assign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            name = node.targets[0].id  # type: ignore[attr-defined]
            doc = " ".join(str(nxt.value.value).split()).replace("|", "\\|")
            lines.append(f"| `{getattr(metrics, name)}` | {doc} |")
    return "\n".join(lines)


def write_readme(path: str) -> None:
    """Regenerate the tables inside ``path``: the new text is rendered first and then written atomically (a temp
    file in the same folder, ``os.replace``), so a file without the marker blocks, or a failed write, is left as
    it was."""
    import os
    import shutil
    import tempfile

    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        rendered = render_readme(text)
    except ValueError as exc:
        raise ValueError(
            f"--write {path!r}: {exc}; the file was left unchanged. Fix: add both marker blocks (as in the project "
            "README), or run `verl-tor docs` and paste its output."
        ) from exc
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".verl-tor-docs-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(rendered)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def render_readme(text: str) -> str:
    """``text`` with the blocks between the ``BEGIN/END CONFIG TABLE`` and ``... METRICS TABLE`` markers regenerated."""
    import re

    for marker, table in (("CONFIG TABLE", config_table()), ("METRICS TABLE", metrics_table())):
        pattern = re.compile(rf"(<!-- BEGIN {marker} -->\n).*?(\n<!-- END {marker} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no <!-- BEGIN {marker} --> ... <!-- END {marker} --> block")
        text = pattern.sub(lambda m, t=table: m.group(1) + t + m.group(2), text)
    return text


def check_config(argv: list[str]) -> int:
    """Compose a ``verl.trainer.main_ppo`` command line's config and validate it as ``main_ppo`` does, without
    running anything: hydra's compose API on ``--config-path`` / ``--config-name`` + the overrides, then verl's
    ``validate_config`` (which, with verl_tor installed, also checks the ``tor`` block:
    ``verl_tor.integration.plugin``) and the ToR checks themselves. For ``VERL_TOR_DRY_RUN=1`` in
    ``verl_tor/recipes/common.sh``; returns 0, or 2 with the error."""
    import os

    config_path, config_name, overrides = None, "ppo_trainer", []
    for arg in argv:
        if arg.startswith("--config-path="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            print(f"error: {arg!r}: only --config-path=, --config-name= and overrides are understood", file=sys.stderr)
            return 2
        else:
            overrides.append(arg)
    try:
        import verl  # noqa: F401  - loads verl's plugins, verl_tor's among them
        from hydra import compose, initialize_config_dir, initialize_config_module
        from verl.trainer.ppo.utils import need_critic, need_reference_policy
        from verl.utils.config import validate_config

        from verl_tor.integration.trainer import validate_tor_config

        if config_path is None:
            config_path = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
        if config_path.startswith("pkg://"):  # a package's configs, as main_ppo's hydra reads them (no $PWD)
            init = initialize_config_module(config_module=config_path.removeprefix("pkg://"), version_base=None)
        else:
            init = initialize_config_dir(
                config_dir=os.path.abspath(config_path.removeprefix("file://")), version_base=None
            )
        with init:
            config = compose(config_name, overrides=overrides)
        use_ref = need_reference_policy(config)
        validate_config(config=config, use_reference_policy=use_ref, use_critic=need_critic(config))
        tor = validate_tor_config(config, use_reference_policy=use_ref)
    except Exception as exc:  # hydra's composition errors, verl's and ToR's validation errors
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        print(f"error: the config does not validate: {type(exc).__name__}: {exc}{cause}", file=sys.stderr)
        return 2
    print(
        f"config OK: {config_name} + {len(overrides)} overrides composed and validated (tor.enable={tor.enable})",
        file=sys.stderr,
    )
    return 0


def run_synthetic(args: argparse.Namespace, cfg: ToRConfig) -> int:
    """The ops on a synthetic rollout batch: a quick look at the selection, no model."""
    import torch

    from verl_tor.ops import compute_tor_weights, compute_visual_sensitivity

    g = torch.Generator().manual_seed(args.seed)
    batch, width = args.prompts * args.n, args.response_length
    lengths = torch.randint(width // 4, width + 1, (batch,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).float()
    # Entropy: mostly confident tokens with a heavy tail of forks; log-probs follow (high entropy -> lower log p).
    entropy = torch.distributions.Exponential(2.0).sample((batch, width)) * mask
    old_log_prob = -(entropy * torch.rand(batch, width, generator=g)) * mask
    noimg_log_prob = old_log_prob - torch.distributions.Exponential(4.0).sample((batch, width)) * (
        torch.rand(batch, width, generator=g) < 0.3
    )
    sensitivity = compute_visual_sensitivity(old_log_prob, noimg_log_prob, method=cfg.sensitivity, response_mask=mask)
    index = [f"prompt{i // args.n}" for i in range(batch)]
    t0 = time.perf_counter()
    weights, metrics = compute_tor_weights(entropy, sensitivity, mask, cfg, index=index, step=0)
    seconds = time.perf_counter() - t0
    print(f"verl-tor demo (synthetic): {batch} responses x <= {width} tokens, {int(mask.sum())} valid tokens")
    print(f"config: {cfg}")
    width_key = max(len(k) for k in metrics)
    for key in sorted(metrics):
        print(f"  {key:<{width_key}}  {metrics[key]:.4f}")
    values, counts = torch.unique(weights[mask.bool()], return_counts=True)
    print("  weight histogram: " + ", ".join(f"{v:.2f}: {c}" for v, c in zip(values.tolist(), counts.tolist())))
    print(f"  selection + weights took {seconds * 1e3:.1f} ms")
    return 0


def int_at_least(low: int, below: int | None = None):
    """An argparse ``type``: an integer >= ``low`` (and < ``below``); argparse names the flag in its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low or (below is not None and value >= below):
            bound = f" and < {below}" if below is not None else ""
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}{bound}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def output_dir(text: str) -> str:
    """An argparse ``type``: a folder that exists or can be created (not a file, nor under one; writable)."""
    import os

    path = os.path.abspath(os.path.expanduser(text))
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder; give a folder for the outputs")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {existing!r} is a file")
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: {existing!r} is not writable")
    return text


def existing_file(text: str) -> str:
    """An argparse ``type``: a file that exists."""
    import os

    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return text


ONE_STEP_RESPONSE_LENGTH = 24
"""``--one-step``'s response limit: its tiny model is random, so longer responses only cost time."""

DEMO_DESCRIPTION = f"""\
Without --one-step / --synthetic: verl's real trainer (python -m verl.trainer.main_ppo, the packaged CPU recipes) with
ToR on CPU for --steps steps. The data go to <out-dir>/data (written once, kept); every run gets a fresh folder
<out-dir>/runs/<recipe>-<k> (k = 1, 2, ...: a run never mixes with an earlier one) for its token maps,
metrics.jsonl and main_ppo.log. tor.enable=false runs stock GRPO, or stock DAPO with --algorithm dapo.
--one-step: one ToR step walked through in this process on a tiny random model (a fresh <out-dir>/one_step-<k>).
--synthetic: the token selection alone on synthetic scores. Settings verl's trainer would fail on after start-up are
refused before anything runs (exit 2). Response limit: {LOOP_RESPONSE_LENGTH} tokens (--synthetic too),
{ONE_STEP_RESPONSE_LENGTH} with --one-step."""


def seed_value(text: str) -> int:
    """An argparse ``type``: a seed verl can take (``0 <= seed <= MAX_SEED``; argparse names the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {value}")
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 0 to {MAX_SEED}, got {value}: the recipe seeds verl with seed + 1, which verl "
            "exports as PYTHONHASHSEED (at most 2^32 - 1)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    # the module docstring is reStructuredText (``verl-tor``); --help prints plain text
    from verl_tor import __version__

    parser = argparse.ArgumentParser(prog="verl-tor", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="verl's real trainer (main_ppo) with ToR, a few steps on CPU; --one-step: one step walked through",
        description=DEMO_DESCRIPTION,  # argparse re-wraps it to the terminal's width
    )
    positive = int_at_least(1)
    demo.add_argument("--seed", type=seed_value, default=0, help=f"0 to {MAX_SEED} (default 0)")
    demo.add_argument("--steps", type=positive, default=4, help="training steps of verl's trainer (not --one-step)")
    demo.add_argument(
        "--algorithm",
        choices=("grpo", "dapo"),
        default="grpo",
        help="the CPU recipe: ToR-GRPO or ToR-DAPO (stock GRPO / DAPO with tor.enable=false)",
    )
    demo.add_argument("--prompts", type=positive, default=4, help="prompts in the rollout batch (at most 256)")
    demo.add_argument("--n", type=positive, default=4, help="responses per prompt (GRPO group size; 2 or more)")
    demo.add_argument(
        "--response-length",
        type=positive,
        default=None,
        help=f"max new tokens per response (default {LOOP_RESPONSE_LENGTH}; {ONE_STEP_RESPONSE_LENGTH} with "
        "--one-step; the task's answers take 26-28)",
    )
    demo.add_argument(
        "--out-dir",
        type=output_dir,
        default="tor_demo_out",
        help="data here, each run in a fresh folder under it (default tor_demo_out)",
    )
    demo.add_argument(
        "--one-step", action="store_true", help="one ToR step walked through in this process (no Ray, no trainer)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars (--one-step)")
    demo.add_argument("--synthetic", action="store_true", help="ops only, on synthetic scores (no model)")
    demo.add_argument("overrides", nargs="*", help="tor.* overrides, e.g. tor.scope=group tor.perception_weight=1")
    insp = sub.add_parser("inspect", help="token maps for a local Qwen2-VL/2.5-VL checkpoint on verl-format data")
    insp.add_argument(
        "--model", required=True, help="Hugging Face checkpoint directory (e.g. a merged verl checkpoint)"
    )
    insp.add_argument("--data", required=True, help="verl RL parquet (prompt + images columns)")
    insp.add_argument(
        "--responses", type=existing_file, help="JSONL with {index, response} per line (default: generate)"
    )
    insp.add_argument("--n", type=positive, default=4, help="responses generated per prompt")
    insp.add_argument("--limit", type=positive, default=4, help="rows of --data to use")
    insp.add_argument("--max-new-tokens", type=positive, default=256)
    insp.add_argument("--out-dir", type=output_dir, default="tor_inspect_out")
    insp.add_argument("--no-progress", action="store_true")
    insp.add_argument("overrides", nargs="*", help="tor.* overrides")
    docs = sub.add_parser("docs", help="print the README's config and metrics tables")
    docs.add_argument("--write", metavar="README", help="regenerate the tables inside this file instead")
    check = sub.add_parser(
        "check-config", help="compose and validate a main_ppo command line's config (VERL_TOR_DRY_RUN=1)"
    )
    check.add_argument("main_ppo_args", nargs=argparse.REMAINDER, help="-- --config-path=... --config-name=... k=v")
    sub.add_parser(
        "config-path",
        help="print the tor_trainer config folder (or give main_ppo --config-path=pkg://verl_tor.recipes.config)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``verl-tor``; returns the exit code: 0, 1 (verl's trainer failed), 2 (refused input), 130 (Ctrl-C), 141 (the
    reader of stdout left, e.g. ``verl-tor docs | head``)."""
    import os

    try:
        return run_command(argv)
    except KeyboardInterrupt:
        # run_cpu_recipe has stopped verl's trainer and its Ray processes and removed their temp folder by now
        print("\nverl-tor: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout's reader is gone: stop quietly; point stdout at /dev/null so the interpreter's last flush is silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def run_command(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "config-path":
        from verl_tor.recipes import config_dir

        print(config_dir())
        return 0

    if args.command == "check-config":
        rest = args.main_ppo_args[1:] if args.main_ppo_args[:1] == ["--"] else args.main_ppo_args
        return check_config(rest)

    if args.command == "docs":
        if args.write:
            try:
                write_readme(args.write)
            except (OSError, ValueError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            return 0
        print(config_table())
        print()
        print(metrics_table())
        sys.stdout.flush()  # a closed pipe fails here, inside main's handler, not at interpreter exit
        return 0
    synthetic = args.command == "demo" and args.synthetic
    loop = args.command == "demo" and not (args.one_step or args.synthetic)
    if args.command == "inspect":
        what = "`verl-tor inspect`"
    else:
        what = "`verl-tor demo --synthetic`" if synthetic else "`verl-tor demo --one-step`"
    try:
        overrides = parse_overrides(args.overrides, flags=DEMO_FLAGS if args.command == "demo" else None)
        cfg = ToRConfig.from_mapping({"enable": True, **overrides})
        # verl's trainer (the plain demo) has a reference policy where the recipe has a KL loss (GRPO; DAPO is
        # checked below); the walk-through and inspect hold one model, the synthetic demo none
        if cfg.scorer_policy == "ref" and not loop:
            reason = "has no model (its scores are synthetic)" if synthetic else "has one model"
            raise ToRConfigError(
                f"tor.scorer_policy='ref': {what} {reason} and no reference policy, so it would silently score the "
                "image-free view as with tor.scorer_policy=old. Fix: leave tor.scorer_policy=old (the paper's) here; "
                "'ref' applies to verl's trainer: plain `verl-tor demo` (GRPO) or a recipe."
            )
        if not cfg.enable and (args.command == "inspect" or synthetic):
            raise ToRConfigError(
                f"tor.enable=false: {what} shows what ToR selects, and with ToR off it selects nothing. "
                "Fix: drop tor.enable=false (plain `verl-tor demo` with tor.enable=false runs stock GRPO)."
            )
        if cfg.rank_tokens == "informative" and (args.command == "inspect" or synthetic):
            raise ToRConfigError(
                f"tor.rank_tokens='informative' ranks tokens with a non-zero advantage, and {what} has no rewards, "
                "hence no advantages. Fix: leave tor.rank_tokens=all here (`verl-tor demo` has GRPO advantages)."
            )
        if loop:
            recipe = demo_recipe(args.algorithm, cfg.enable)
            args.response_length = args.response_length or LOOP_RESPONSE_LENGTH
            warnings = check_loop_demo(
                args.out_dir,
                steps=args.steps,
                seed=args.seed,
                recipe=recipe,
                prompts=args.prompts,
                n=args.n,
                response_length=args.response_length,
                scorer_policy=cfg.scorer_policy,
                needs_image_free_pass=cfg.needs_image_free_pass,
            )
    except (ToRConfigError, DemoInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "inspect":
        from verl_tor.tools.inspection import InspectError, run_inspect

        try:
            summary = run_inspect(
                args.model,
                args.data,
                args.out_dir,
                cfg,
                n=args.n,
                limit=args.limit,
                responses_path=args.responses,
                max_new_tokens=args.max_new_tokens,
                progress=not args.no_progress,
            )
        except InspectError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({k: summary[k] for k in ("rollouts", "tokens", "metrics", "token_map")}, indent=2))
        return 0
    if args.synthetic:
        args.response_length = args.response_length or LOOP_RESPONSE_LENGTH
        return run_synthetic(args, cfg)
    if args.one_step:
        from verl_tor.tools.demo import main as run_demo

        args.response_length = args.response_length or ONE_STEP_RESPONSE_LENGTH
        args.out_dir = fresh_folder(args.out_dir, "one_step")
        return run_demo(args, cfg)
    from verl_tor.tools.loop_demo import main as run_loop_demo

    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return run_loop_demo(
        out_dir=args.out_dir,
        steps=args.steps,
        seed=args.seed,
        recipe=recipe,
        overrides=[f"tor.{k}={v}" for k, v in overrides.items() if k != "enable"],
        prompts=args.prompts,
        n=args.n,
        response_length=args.response_length,
    )


if __name__ == "__main__":
    sys.exit(main())
