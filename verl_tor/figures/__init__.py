"""A tiny Qwen2.5-VL that reads its figure, and the synthetic visual-math task it reads.

- ``task``: rectangles whose side lengths appear only in the figure; target responses in the
  ``<think>…</think> \\boxed{}`` format with the ground truth of every figure-derived character; two tasks
  (``TASKS``): ``area`` (two sides, one product) and ``area_plus`` (three values read, a distractor, a product and a
  sum: issue 20's reproduction), and ``classify_response`` (correct / misread / miscalculated / malformed);
- ``data``: verl's RL parquet (``write_figure_parquet``), rewarded by verl's Geometry3K scorer;
- ``model``: the figure reader's processor and config, ``FIGURE_READER_CHECKPOINT`` and
  ``FIGURE_READER_PLUS_CHECKPOINT`` (shipped: the area and area_plus readers), ``load_figure_reader``;
- ``sft``: the deterministic two-stage SFT that made the checkpoint (``python -m verl_tor.figures.sft``);
- ``evaluate``: accuracy greedy / sampled, with and without the image (``python -m verl_tor.figures.evaluate``);

ToR's T_p / T_r measured against the ground truth, through the real stage, is a tool on top of this package
(``verl_tor.tools.grounding``, ``benchmarks/bench_grounding.py``).

Importing this package imports neither torch nor verl; the functions below load them when called.
"""

from __future__ import annotations

import importlib
from typing import Any

from verl_tor.figures.model import FIGURE_READER_CHECKPOINT, FIGURE_READER_PLUS_CHECKPOINT
from verl_tor.figures.task import (
    DATA_SOURCE,
    ERROR_CLASSES,
    FIGURE_KINDS,
    KINDS,
    TASKS,
    Problem,
    Span,
    build_target,
    classify_response,
    label_response,
    make_problem,
    split_seeds,
)

_LAZY = {
    "build_figure_processor": "verl_tor.figures.model",
    "build_figure_reader": "verl_tor.figures.model",
    "load_figure_reader": "verl_tor.figures.model",
    "write_figure_parquet": "verl_tor.figures.data",
    "sample_responses": "verl_tor.figures.evaluate",
    "evaluate_figure_reader": "verl_tor.figures.evaluate",
    "evaluate_val": "verl_tor.figures.evaluate",
    "load_parquet_problems": "verl_tor.figures.evaluate",
    "SFTConfig": "verl_tor.figures.sft",
    "train_figure_reader": "verl_tor.figures.sft",
}

__all__ = [
    "DATA_SOURCE",
    "ERROR_CLASSES",
    "FIGURE_KINDS",
    "FIGURE_READER_CHECKPOINT",
    "FIGURE_READER_PLUS_CHECKPOINT",
    "KINDS",
    "TASKS",
    "Problem",
    "Span",
    "build_target",
    "classify_response",
    "label_response",
    "make_problem",
    "split_seeds",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'verl_tor.figures' has no attribute {name!r}")
