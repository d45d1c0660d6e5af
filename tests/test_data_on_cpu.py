"""recipes/data/geo3k.py on a synthetic dataset in geometry3k's schema: verl's own RLHFDataset loads the output
and the image reaches the multimodal inputs; verl's geo3k scorer rewards the recipe's answer format."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def geo3k():
    spec = importlib.util.spec_from_file_location("geo3k_recipe", ROOT / "recipes" / "data" / "geo3k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def converted(tmp_path_factory, geo3k, geometry_images):
    import datasets

    raw = tmp_path_factory.mktemp("raw")
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    splits = {
        split: datasets.Dataset.from_dict(
            {
                "images": [[img] for img in geometry_images[:n]],
                "problem": [f"<image>Find x in figure {i}." for i in range(n)],
                "answer": [str(10 + i) for i in range(n)],
            },
            features=features,
        )
        for split, n in (("train", 3), ("test", 2))
    }
    datasets.DatasetDict(splits).save_to_disk(str(raw))
    out = tmp_path_factory.mktemp("verl")
    geo3k.main(["--local_dataset_path", str(raw), "--local_save_dir", str(out)])
    return out


def test_schema(converted):
    frame = pd.read_parquet(converted / "train.parquet")
    assert len(frame) == 3 and len(pd.read_parquet(converted / "test.parquet")) == 2
    row = frame.iloc[1]
    assert row["data_source"] == "hiyouga/geometry3k"
    assert (
        row["prompt"][0]["content"].startswith("<image>Find x in figure 1.")
        and "\\boxed{}" in row["prompt"][0]["content"]
    )
    assert row["reward_model"]["ground_truth"] == "11" and len(row["images"]) == 1
    assert row["images"][0]["bytes"][:4] == b"\x89PNG"


def test_verl_rl_dataset_loads_it_with_the_image(converted, tiny_processor):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create(
        {
            "max_prompt_length": 1024,
            "image_key": "images",
            "filter_overlong_prompts": False,
            "cache_dir": str(converted / "cache"),
        }
    )
    ds = RLHFDataset(str(converted / "train.parquet"), tiny_processor.tokenizer, config, processor=tiny_processor)
    item = ds[0]
    content = item["raw_prompt"][0]["content"]
    assert [c["type"] for c in content][:1] == ["image"]
    images, videos = asyncio.run(RLHFDataset.process_vision_info(item["raw_prompt"], ds.image_patch_size, config))
    assert len(images) == 1 and not videos
    assert images[0].size[0] > 0


def test_verl_geo3k_scorer_rewards_the_format(geo3k):
    from verl.utils.reward_score import default_compute_score

    good = "<think> x is 11 </think> The answer is \\boxed{11}"
    assert default_compute_score(geo3k.DATA_SOURCE, good, "11") == pytest.approx(1.0)
    assert default_compute_score(geo3k.DATA_SOURCE, "\\boxed{12}", "11") == pytest.approx(0.0)


def raw_dataset(images, problems, answers):
    import datasets

    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict({"images": images, "problem": problems, "answer": answers}, features=features)


def test_rows_that_would_train_on_something_wrong_are_skipped_and_counted(tmp_path, geo3k, geometry_images, capsys):
    import datasets

    a, b = geometry_images[:2]
    rows = [
        ([a], "Find x.", "10"),  # good: <image> is prepended
        ([a], "<image>Find y.", "11"),  # good: placeholder already there
        ([a], "Find z.", ""),  # empty answer: verl's scorer would reward an empty \boxed{}
        ([a], "Find w.", None),  # no answer
        ([], "What is 2+2?", "4"),  # no image: must not get an <image> placeholder
        ([a, b], "<image>Compare.", "3"),  # 2 images, 1 placeholder
        ([a], "<image><image>Twice.", "5"),  # 1 image, 2 placeholders
        ([a, b], "<image> and <image>: both.", "6"),  # good: 2 and 2
    ]
    split = raw_dataset(*map(list, zip(*rows)))
    raw = tmp_path / "raw"
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(raw))
    out = tmp_path / "out"
    geo3k.main(["--local_dataset_path", str(raw), "--local_save_dir", str(out)])
    printed = capsys.readouterr().out
    assert (
        "train: skipped 5 of 8 rows (1 image(s) for 2 <image> placeholder(s): 1, 2 image(s) for 1 <image> "
        "placeholder(s): 1, empty or missing answer: 2, no image: 1)" in printed
    )
    frame = pd.read_parquet(out / "train.parquet")
    assert list(frame["reward_model"].map(lambda r: r["ground_truth"])) == ["10", "11", "6"]
    for prompt, images in zip(frame["prompt"], frame["images"]):
        assert prompt[0]["content"].count("<image>") == len(images)


def test_shards_are_read_once(tmp_path, geo3k, geometry_images):
    shard = raw_dataset([[geometry_images[0]]], ["<image>Find x."], ["1"])
    hub = tmp_path / "hub"
    for split in ("train", "test"):
        (hub / "data").mkdir(parents=True, exist_ok=True)
        shard.to_parquet(str(hub / "data" / f"{split}-00000-of-00001.parquet"))
    # a second copy further down (an old download, a cache) used to be read too by the recursive search
    (hub / "old" / "copy").mkdir(parents=True)
    shard.to_parquet(str(hub / "old" / "copy" / "train-00000-of-00001.parquet"))
    assert len(geo3k.load_splits(str(hub))["train"]) == 1
    shard.to_parquet(str(hub / "train-00000-of-00001.parquet"))  # the same shards at the top as well
    with pytest.raises(SystemExit, match="both in it and in its data/ folder"):
        geo3k.load_splits(str(hub))
