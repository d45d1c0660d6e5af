"""What a CPU run of verl's trainer reads: a tiny Qwen2.5-VL that reads its figure, and its task in verl's RL format.

    python -m verl_tor.local.prepare --out-dir /tmp/verl_tor_cpu     # -> data/train.parquet, data/val.parquet

The model is the shipped figure reader (``verl_tor.figures.FIGURE_READER_CHECKPOINT``: a 1M-parameter Qwen2.5-VL
trained offline to read the side lengths of a rectangle from its figure; ``save_pretrained`` format, loaded by verl
like a hub checkpoint). The data are that task's problems (``verl_tor.figures.write_figure_parquet``: the numbers
are only in the figure, ``data_source=hiyouga/geometry3k`` so verl's Geometry3K scorer rewards
``<think>...</think> \\boxed{}``), with problem seeds disjoint from the ones the model was trained on.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["TRAIN_PROMPTS", "VAL_PROMPTS", "ANSWER_TOKENS", "data_paths", "count_train_prompts", "prepare"]

TRAIN_PROMPTS = 256
"""Training problems ``prepare`` writes by default: a rollout batch takes at most this many prompts (verl's
dataloader drops an incomplete last batch, so a larger batch gives zero steps an epoch)."""
VAL_PROMPTS = 32
ANSWER_TOKENS = (26, 28)
"""Tokens of the shortest and the longest correct answer of the task under the figure reader's tokenizer
(``<think>The sides are 1 and 1. 1*1=1</think> \\boxed{1}`` and the one with a two-digit area; the end-of-turn
token comes on top). A response limit below the first cuts every answer before ``\\boxed{}`` closes: reward 0 for
every response. ``tests/test_local_on_cpu.py`` recounts them with the tokenizer."""


def data_paths(out_dir: str) -> dict[str, str]:
    """Where ``prepare`` writes (and the CPU recipes read, ``DATA_DIR=<CPU_DIR>/data``) the parquet files."""
    data = os.path.join(out_dir, "data")
    return {"train": os.path.join(data, "train.parquet"), "val": os.path.join(data, "val.parquet")}


def count_train_prompts(out_dir: str) -> int:
    """Rows of the training file under ``out_dir`` (read from the parquet footer), or the number ``prepare`` would
    write there when it does not exist yet."""
    path = data_paths(out_dir)["train"]
    if not os.path.exists(path):
        return TRAIN_PROMPTS
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def prepare(out_dir: str, seed: int = 0, n_train: int = TRAIN_PROMPTS, n_val: int = VAL_PROMPTS) -> dict[str, str]:
    """Write ``data/{train,val}.parquet`` under ``out_dir`` (idempotent: existing files are kept as they are);
    returns the model and data paths."""
    from verl_tor.figures import FIGURE_READER_CHECKPOINT, write_figure_parquet

    paths = data_paths(out_dir)
    if not all(os.path.exists(p) for p in paths.values()):
        paths.update(write_figure_parquet(os.path.dirname(paths["train"]), n_train=n_train, n_val=n_val, seed=seed))
    return {"model": FIGURE_READER_CHECKPOINT, **paths}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in prepare(args.out_dir, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
