"""verl's RL parquet for the figure task: ``write_figure_parquet(out_dir, n_train, n_val, seed, task)``.

The schema of ``recipes/data/geo3k.py`` (verl's ``examples/data_preprocess/geo3k.py``): the prompt holds
``<image>`` + the question, ``images`` the PNG bytes, ``data_source`` selects verl's Geometry3K scorer and
``reward_model.ground_truth`` is the area. ``extra_info`` keeps the sides and the target response, so the
ground truth of every figure-derived character can be rebuilt (``verl_tor.figures.task.build_target``).

    python -m verl_tor.figures.data --out-dir ~/data/figures --train 1024 --val 200 --seed 0 [--task area_plus]
"""

from __future__ import annotations

import argparse
import os

from verl_tor.figures.task import TASKS, make_problem, split_seeds, to_verl_row

__all__ = ["write_figure_parquet", "main"]


def write_figure_parquet(
    out_dir: str, n_train: int = 1024, n_val: int = 200, seed: int = 0, task: str = "area"
) -> dict[str, str]:
    """Write ``train.parquet`` and ``val.parquet`` of ``task`` (``verl_tor.figures.task.TASKS``; disjoint problem
    seeds, also disjoint from the SFT's); returns ``{"train": path, "val": path}``."""
    import pandas as pd

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rows = [to_verl_row(make_problem(s, task), split, i) for i, s in enumerate(split_seeds(split, n, seed))]
        path = os.path.join(out_dir, f"{split}.parquet")
        pd.DataFrame(rows).to_parquet(path)
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="area", choices=sorted(TASKS), help="the figure task (default: area)")
    args = parser.parse_args(argv)
    out_dir = os.path.expanduser(args.out_dir)
    for split, path in write_figure_parquet(out_dir, args.train, args.val, args.seed, args.task).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
