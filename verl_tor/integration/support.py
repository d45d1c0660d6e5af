"""What ToR accepts: every advantage estimator × every policy loss verl registers, under each ``tor.apply``.

The matrix is not written by hand: each cell is ToR's own validation
(``verl_tor.integration.trainer.validate_tor_config``) of verl's ``ppo_trainer`` config with that estimator, loss
and apply, so it cannot drift from the code. The recipes README
carries it between markers; ``tests/test_estimator_matrix_on_cpu.py`` regenerates it and checks every
accepted cell end to end (verl's advantage -> the ToR stage -> verl's ``ppo_loss``: the weights reach the gradient).

    python -m verl_tor.integration.support                          # print the table
    python -m verl_tor.integration.support --write recipes/README.md  # regenerate it in place
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from verl_tor.config import ToRConfigError

__all__ = ["APPLIES", "support_matrix", "render_support_matrix", "render_into", "BEGIN", "END"]

APPLIES = ("advantage", "loss")
"""The two ways ToR's weights reach the loss (``tor.apply``)."""

BEGIN, END = "<!-- BEGIN SUPPORT MATRIX -->", "<!-- END SUPPORT MATRIX -->"


def _compose_ppo_trainer() -> Any:
    from pathlib import Path

    import verl
    from hydra import compose, initialize_config_dir

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(
            "ppo_trainer", overrides=["trainer.v1.trainer_mode=tor_sync", "+tor.enable=true", "+tor.allow_gae=false"]
        )


def support_matrix() -> dict[tuple[str, str], dict[str, dict[bool, str | None]]]:
    """``(adv_estimator, loss_mode) -> apply -> allow_gae -> None (accepted) | the refusal message``.

    Rows and columns are verl's ``ADV_ESTIMATOR_REGISTRY`` and ``POLICY_LOSS_REGISTRY`` as installed.
    """
    from omegaconf import open_dict
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    from verl_tor.integration.trainer import validate_tor_config

    cfg = _compose_ppo_trainer()
    out: dict[tuple[str, str], dict[str, dict[bool, str | None]]] = {}
    with open_dict(cfg):
        for estimator in sorted(ADV_ESTIMATOR_REGISTRY):
            for loss_mode in sorted(POLICY_LOSS_REGISTRY):
                cell: dict[str, dict[bool, str | None]] = {}
                for apply in APPLIES:
                    cell[apply] = {}
                    for allow_gae in (False, True):
                        cfg.algorithm.adv_estimator = estimator
                        cfg.actor_rollout_ref.actor.policy_loss.loss_mode = loss_mode
                        cfg.tor.apply, cfg.tor.allow_gae = apply, allow_gae
                        try:
                            validate_tor_config(cfg, use_reference_policy=True)
                            cell[apply][allow_gae] = None
                        except ToRConfigError as exc:
                            cell[apply][allow_gae] = str(exc)
                out[(estimator, loss_mode)] = cell
    return out


def render_support_matrix(matrix: dict | None = None) -> str:
    """The matrix as markdown: one row per estimator, one column per loss, then why each refusal happens."""
    matrix = support_matrix() if matrix is None else matrix
    estimators = sorted({e for e, _ in matrix})
    losses = sorted({m for _, m in matrix})

    def cell(estimator: str, loss_mode: str) -> str:
        by_apply = matrix[(estimator, loss_mode)]
        plain = [a[0].upper() for a in APPLIES if by_apply[a][False] is None]
        opt_in = [a[0].upper() for a in APPLIES if by_apply[a][True] is None]
        if plain:
            return " ".join(plain)
        if opt_in:
            return "opt-in: " + " ".join(opt_in)
        return "—"

    lines = [
        "| `adv_estimator` \\ `loss_mode` | " + " | ".join(f"`{m}`" for m in losses) + " |",
        "| --- |" + " --- |" * len(losses),
    ]
    for estimator in estimators:
        lines.append(f"| `{estimator}` | " + " | ".join(cell(estimator, m) for m in losses) + " |")
    lines += [
        "",
        "A: accepted with `tor.apply=advantage` (the default); L: accepted with `tor.apply=loss`; opt-in: accepted "
        "only with `tor.allow_gae=true`; —: refused by ToR's config check, before Ray starts. Why:",
        "",
    ]

    def refusal(estimator: str, loss_mode: str, apply: str) -> str | None:
        return matrix[(estimator, loss_mode)][apply][False]

    # an estimator refused whatever the loss: its own reason; then, on a row that runs, why a loss lacks A or L
    refused_rows = [e for e in estimators if all(refusal(e, m, a) for m in losses for a in APPLIES)]
    for estimator in refused_rows:
        lines.append(f"- `{estimator}`: {refusal(estimator, 'vanilla' if 'vanilla' in losses else losses[0], 'loss')}")
    running = [e for e in estimators if e not in refused_rows]
    for loss_mode in losses if running else []:
        for apply in APPLIES:
            reason = refusal(running[0], loss_mode, apply)
            if reason is not None and (apply == "loss" or refusal(running[0], loss_mode, "loss") is None):
                lines.append(f"- `{loss_mode}` ({apply[0].upper()}): {reason}")
    return "\n".join(lines)


def render_into(text: str, table: str | None = None) -> str:
    """``text`` with the block between ``BEGIN`` and ``END`` replaced by the current table."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no {BEGIN} ... {END} block to fill. Fix: add the two markers where the table goes.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render_support_matrix() if table is None else table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ToR's support matrix over verl's estimators and policy losses")
    parser.add_argument("--write", metavar="FILE", help="regenerate the table between the markers in FILE")
    args = parser.parse_args(argv)
    if args.write:
        with open(args.write, encoding="utf-8") as f:
            text = f.read()
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(render_into(text))
        return 0
    print(render_support_matrix())
    return 0


if __name__ == "__main__":
    sys.exit(main())
