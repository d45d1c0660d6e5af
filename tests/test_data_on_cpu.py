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
