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

__all__ = ["prepare"]


def prepare(out_dir: str, seed: int = 0, n_train: int = 256, n_val: int = 32) -> dict[str, str]:
    """Write ``data/{train,val}.parquet`` under ``out_dir`` (idempotent); returns the model and data paths."""
    from verl_tor.figures import FIGURE_READER_CHECKPOINT, write_figure_parquet

    data = os.path.join(out_dir, "data")
    paths = {"train": os.path.join(data, "train.parquet"), "val": os.path.join(data, "val.parquet")}
    if not all(os.path.exists(p) for p in paths.values()):
        paths.update(write_figure_parquet(data, n_train=n_train, n_val=n_val, seed=seed))
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
