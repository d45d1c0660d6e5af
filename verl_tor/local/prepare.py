"""What a CPU run of verl's trainer reads: a tiny Qwen2.5-VL checkpoint and geometry problems in verl's RL format.

    python -m verl_tor.local.prepare --out-dir /tmp/verl_tor_cpu     # -> model/, data/train.parquet, data/val.parquet

The model is ``verl_tor.tiny``'s (saved with ``save_pretrained``, loaded by verl like a hub checkpoint); the data
uses the schema of ``recipes/data/geo3k.py`` (``data_source=hiyouga/geometry3k``: verl's Geometry3K scorer rewards
``<think>...</think> \\boxed{}``), with PIL-rendered figures whose numbers are only in the image.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["prepare", "write_geometry_parquet"]

DATA_SOURCE = "hiyouga/geometry3k"
INSTRUCTION = "Think inside <think> </think>, then give the final answer in \\boxed{}."


def write_geometry_parquet(path: str, n: int, seed: int) -> str:
    """``n`` rendered geometry problems (``verl_tor.tiny.make_geometry_problem``) as one verl parquet file."""
    import datasets

    from verl_tor.tiny import make_geometry_problem

    rows = {"data_source": [], "prompt": [], "images": [], "ability": [], "reward_model": [], "extra_info": []}
    for i in range(n):
        problem = make_geometry_problem(seed + i)
        answer = f"{problem['answer']:g}"
        rows["data_source"].append(DATA_SOURCE)
        rows["prompt"].append([{"role": "user", "content": "<image>" + problem["question"] + " " + INSTRUCTION}])
        rows["images"].append([problem["image"]])
        rows["ability"].append("math")
        rows["reward_model"].append({"style": "rule", "ground_truth": answer})
        rows["extra_info"].append({"index": i, "answer": answer, "question": problem["question"]})
    features = datasets.Features(
        {
            "data_source": datasets.Value("string"),
            "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "images": datasets.Sequence(datasets.Image()),
            "ability": datasets.Value("string"),
            "reward_model": {"style": datasets.Value("string"), "ground_truth": datasets.Value("string")},
            "extra_info": {
                "index": datasets.Value("int64"),
                "answer": datasets.Value("string"),
                "question": datasets.Value("string"),
            },
        }
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
    return path


def prepare(out_dir: str, seed: int = 0, n_train: int = 64, n_val: int = 16) -> dict[str, str]:
    """Write ``model/`` and ``data/{train,val}.parquet`` under ``out_dir`` (idempotent); returns their paths."""
    from verl_tor.tiny import save_tiny_checkpoint

    model = os.path.join(out_dir, "model")
    data = os.path.join(out_dir, "data")
    os.makedirs(data, exist_ok=True)
    if not os.path.exists(os.path.join(model, "config.json")):
        save_tiny_checkpoint(model, seed=seed)
    paths = {"model": model, "train": os.path.join(data, "train.parquet"), "val": os.path.join(data, "val.parquet")}
    if not os.path.exists(paths["train"]):
        write_geometry_parquet(paths["train"], n_train, seed=seed)
    if not os.path.exists(paths["val"]):
        write_geometry_parquet(paths["val"], n_val, seed=seed + 10_000)
    return paths


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
