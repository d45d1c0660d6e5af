"""Geometry3K (hiyouga/geometry3k) -> verl's RL parquet format, images included.

The same schema as verl's ``examples/data_preprocess/geo3k.py`` (that script is not shipped in the verl wheel):
``data_source=hiyouga/geometry3k`` selects verl's geo3k scorer (``verl.utils.reward_score.geo3k``:
0.9·accuracy + 0.1·format, needs ``mathruler``), the prompt keeps the dataset's ``<image>`` placeholder, which
verl's ``RLHFDataset`` turns into an image item of the chat message, and ``images`` holds the figures.

    python recipes/data/geo3k.py --local_dataset_path /path/to/geometry3k --local_save_dir ~/data/geo3k

``--local_dataset_path`` is a ``datasets.save_to_disk`` directory or a directory of the hub's parquet shards
(``train-*.parquet`` in it or in its ``data/`` folder, not both). Without it the hub copy is downloaded (needs
network).

Rows that would train on something wrong are skipped, and counted per reason on the console: an empty or missing
answer (verl's Geometry3K scorer would then reward an empty ``\\boxed{}``), no image (a Geometry3K problem without
its figure; ``<image>`` is never added to such a row), and an image count that does not match the ``<image>``
placeholders (one image and no placeholder is the dataset's usual form: ``<image>`` is prepended).
"""

from __future__ import annotations

import argparse
import collections
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
        files = find_shards(local_dataset_path, split)
        splits[split] = datasets.load_dataset("parquet", data_files=files, split="train")
    return splits


def find_shards(root: str, split: str) -> list[str]:
    """The ``<split>-*.parquet`` shards in ``root`` or in ``root/data`` (the hub's layout), each file once.

    Not a recursive search: a copy of the shards anywhere below (a second download, a cache folder) would be read
    twice. Shards in both places are refused for the same reason.
    """
    found = {}
    for folder in (root, os.path.join(root, "data")):
        files = sorted(glob.glob(os.path.join(folder, f"{split}-*.parquet")))
        if files:
            found[folder] = files
    if not found:
        raise SystemExit(
            f"--local_dataset_path {root!r}: no {split}-*.parquet shards (in it or in its data/ folder) and no "
            "dataset_dict.json. Fix: point it at a save_to_disk directory or at the hub repo's folder."
        )
    if len(found) > 1:
        raise SystemExit(
            f"--local_dataset_path {root!r}: {split}-*.parquet shards both in it and in its data/ folder; reading "
            "both would train on every row twice. Fix: keep one copy."
        )
    (files,) = found.values()
    unique = sorted({os.path.realpath(f) for f in files})  # symlinks to the same shard count once
    return unique


def check_row(problem, answer, n_images: int) -> str | None:
    """Why a Geometry3K row must not be written (None: it is fine)."""
    if answer is None or not str(answer).strip():
        return "empty or missing answer"
    if n_images == 0:
        return "no image"
    placeholders = str(problem or "").count("<image>")
    if placeholders == 0 and n_images == 1:
        return None  # the dataset's usual form: to_verl prepends <image>
    if placeholders != n_images:
        return f"{n_images} image(s) for {placeholders} <image> placeholder(s)"
    return None


def drop_bad_rows(ds, split: str):
    """``ds`` without the rows ``check_row`` refuses; prints how many were skipped, and why."""
    import datasets

    undecoded = ds
    feature = ds.features.get("images")
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image):  # count images without decoding them
        undecoded = ds.cast_column("images", type(feature)(datasets.Image(decode=False)))
    reasons = [
        check_row(problem, answer, len(images or []))
        for problem, answer, images in zip(undecoded["problem"], undecoded["answer"], undecoded["images"])
    ]
    if not reasons:
        raise SystemExit(f"{split}: the split has no rows. Fix: check --local_dataset_path.")
    counts = collections.Counter(r for r in reasons if r is not None)
    if counts:
        detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
        print(f"{split}: skipped {sum(counts.values())} of {len(reasons)} rows ({detail})")
    keep = [i for i, r in enumerate(reasons) if r is None]
    if not keep:
        raise SystemExit(f"{split}: every row was skipped ({detail}). Fix: check the dataset's columns.")
    return ds.select(keep) if len(keep) < len(reasons) else ds


def to_verl(example: dict, idx: int, split: str) -> dict:
    """One checked row (``check_row``) in verl's format."""
    problem = example["problem"]
    if "<image>" not in problem:
        problem = "<image>" + problem  # one figure per problem in Geometry3K (check_row: exactly one image here)
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
        ds = drop_bad_rows(ds, split)
        converted = ds.map(
            lambda ex, idx, s=split: to_verl(ex, idx, s), with_indices=True, remove_columns=ds.column_names
        )
        path = os.path.join(out_dir, f"{split}.parquet")
        converted.to_parquet(path)
        print(f"{split}: {len(converted)} rows -> {path}")


if __name__ == "__main__":
    main()
