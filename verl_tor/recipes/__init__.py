"""The recipe files that ship inside the package: one copy, used by a checkout and by an installed wheel alike.

- ``common.sh``: the whole Geometry3K command line (``run_recipe`` / ``run_tor_recipe``, the paper's ``tor.*``
  values); a checkout's GPU recipes (``recipes/*_geo3k/*.sh``) source it.
- ``cpu_tiny/{grpo,grpo_tor,dapo_tor}.sh``: the same body scaled to the figure reader on CPU; ``verl-tor demo`` runs
  them (``verl_tor.local.launch``) and a checkout's ``recipes/cpu_tiny/*.sh`` forward to them.
- ``config/tor_trainer.yaml``: verl's ``ppo_trainer`` plus the ``tor:`` block, reachable from any directory as
  ``--config-path=pkg://verl_tor.recipes.config --config-name=tor_trainer`` (hydra's package search path; the
  folder is a package so that hydra can resolve it) or as a folder (``config_dir()``, ``verl-tor config-path``).

They are package data (``setup.cfg`` ``[options.package_data]`` for wheels, ``MANIFEST.in`` for sdists), not code:
nothing here imports torch or verl.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_NAME", "CONFIG_PATH", "config_dir", "cpu_recipes_dir"]

CONFIG_NAME = "tor_trainer"
"""hydra ``--config-name`` of verl's ``ppo_trainer`` plus the ``tor:`` block."""

CONFIG_PATH = "pkg://verl_tor.recipes.config"
"""hydra ``--config-path`` of ``CONFIG_NAME`` for an installed package (no checkout, no ``$PWD``)."""


def config_dir() -> Path:
    """The folder holding ``tor_trainer.yaml`` (``--config-path=<this>`` for tools that want a directory)."""
    return Path(__file__).resolve().parent / "config"


def cpu_recipes_dir() -> Path:
    """The folder of the CPU recipes (``grpo.sh``, ``grpo_tor.sh``, ``dapo_tor.sh``), inside the package."""
    return Path(__file__).resolve().parent / "cpu_tiny"
