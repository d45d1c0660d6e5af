"""Geometry3K (hiyouga/geometry3k) -> verl's RL parquet format, images included.

The same schema as verl's ``examples/data_preprocess/geo3k.py`` (that script is not shipped in the verl wheel):
``data_source=hiyouga/geometry3k`` selects verl's geo3k scorer (``verl.utils.reward_score.geo3k``:
0.9·accuracy + 0.1·format, needs ``mathruler``), the prompt keeps the dataset's ``<image>`` placeholder, which
verl's ``RLHFDataset`` turns into an image item of the chat message, and ``images`` holds the figures.

    python recipes/data/geo3k.py --local_dataset_path /path/to/geometry3k --local_save_dir ~/data/geo3k

``--local_dataset_path`` is a ``datasets.save_to_disk`` directory or a directory of the hub's parquet shards
(``data/train-*.parquet``, ...). Without it the hub copy is downloaded (needs network).
"""

from __future__ import annotations

import argparse
import glob
import os

DATA_SOURCE = "hiyouga/geometry3k"
INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)
"""The format verl's geo3k scorer rewards (``format_reward``: <think>...</think> then \\boxed{})."""


def load_splits(local_dataset_path: str | None):
    import datasets

    if local_dataset_path is None:
        ds = datasets.load_dataset(DATA_SOURCE)
        return {"train": ds["train"], "test": ds["test"]}
    if os.path.exists(os.path.join(local_dataset_path, "dataset_dict.json")):
        ds = datasets.load_from_disk(local_dataset_path)
        return {"train": ds["train"], "test": ds["test"]}
    splits = {}
    for split in ("train", "test"):
        files = sorted(glob.glob(os.path.join(local_dataset_path, "**", f"{split}-*.parquet"), recursive=True))
        if not files:
            raise SystemExit(
                f"--local_dataset_path {local_dataset_path!r}: no {split}-*.parquet shards and no dataset_dict.json. "
                "Fix: point it at a save_to_disk directory or at the hub repo's data/ folder."
            )
        splits[split] = datasets.load_dataset("parquet", data_files=files, split="train")
    return splits


def to_verl(example: dict, idx: int, split: str) -> dict:
    problem = example["problem"]
    if "<image>" not in problem:
        problem = "<image>" + problem  # one figure per problem in Geometry3K
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": problem + " " + INSTRUCTION}],
        "images": example["images"],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": example["answer"]},
        "extra_info": {"split": split, "index": idx, "answer": example["answer"], "question": example["problem"]},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_dataset_path", default=None)
    parser.add_argument("--local_save_dir", default="~/data/geo3k")
    args = parser.parse_args(argv)
    out_dir = os.path.expanduser(args.local_save_dir)
    os.makedirs(out_dir, exist_ok=True)
    for split, ds in load_splits(args.local_dataset_path).items():
        converted = ds.map(
            lambda ex, idx, s=split: to_verl(ex, idx, s), with_indices=True, remove_columns=ds.column_names
        )
        path = os.path.join(out_dir, f"{split}.parquet")
        converted.to_parquet(path)
        print(f"{split}: {len(converted)} rows -> {path}")


if __name__ == "__main__":
    main()
