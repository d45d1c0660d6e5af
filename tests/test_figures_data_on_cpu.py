"""The figure task in verl's data format: verl's RLHFDataset loads the parquet with its image, the prompt it builds is
the one the figure reader was trained on, and verl's reward path (Geometry3K scorer) grades the answers."""

from __future__ import annotations

import asyncio

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    from verl_tor.figures import write_figure_parquet

    return write_figure_parquet(str(tmp_path_factory.mktemp("figures")), n_train=6, n_val=3, seed=0)


@pytest.fixture(scope="module")
def figure_processor():
    from verl.utils import hf_processor

    from verl_tor.figures import FIGURE_READER_CHECKPOINT

    return hf_processor(FIGURE_READER_CHECKPOINT)  # verl's loader, get_rope_index bound


def test_schema_and_ground_truth(parquet):
    from verl_tor.figures import DATA_SOURCE, make_problem, split_seeds

    train, val = pd.read_parquet(parquet["train"]), pd.read_parquet(parquet["val"])
    assert len(train) == 6 and len(val) == 3
    assert not set(train["extra_info"].map(lambda e: e["seed"])) & set(val["extra_info"].map(lambda e: e["seed"]))
    row = val.iloc[2]
    problem = make_problem(split_seeds("val", 3)[2])
    assert row["data_source"] == DATA_SOURCE == "hiyouga/geometry3k"
    assert list(row["prompt"]) == [{"role": "user", "content": "<image>" + problem.question}]
    assert row["reward_model"]["ground_truth"] == str(problem.width * problem.height)
    assert (row["extra_info"]["width"], row["extra_info"]["height"]) == (problem.width, problem.height)
    assert row["extra_info"]["target"] == problem.target
    assert row["images"][0]["bytes"][:4] == b"\x89PNG"


def test_area_plus_parquet_reads_back_as_its_problems(tmp_path):
    """``task`` reaches ``make_problem``: the rows are area_plus problems (three values, a distractor, w*h + inside)
    and ``load_parquet_problems`` rebuilds them, so a dump can be classified against its problem."""
    from verl_tor.figures import make_problem, split_seeds, write_figure_parquet
    from verl_tor.figures.data import main
    from verl_tor.figures.evaluate import load_parquet_problems

    paths = write_figure_parquet(str(tmp_path / "a"), n_train=2, n_val=3, seed=1, task="area_plus")
    back = load_parquet_problems(paths["val"])
    expected = [make_problem(s, "area_plus") for s in split_seeds("val", 3, 1)]
    assert [(p.task, p.width, p.height, p.inside, p.distractor, p.answer) for p in back] == [
        (p.task, p.width, p.height, p.inside, p.distractor, p.answer) for p in expected
    ]
    val = pd.read_parquet(paths["val"])
    assert list(val["reward_model"].map(lambda r: r["ground_truth"])) == [p.answer for p in expected]
    assert main(["--out-dir", str(tmp_path / "b"), "--train", "1", "--val", "1", "--task", "area_plus"]) == 0
    assert load_parquet_problems(str(tmp_path / "b" / "val.parquet"))[0].task == "area_plus"


def test_verl_rl_dataset_builds_the_training_prompt_with_the_image(parquet, figure_processor):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from verl_tor.figures.evaluate import encode_prompts, load_parquet_problems

    config = OmegaConf.create({"max_prompt_length": 256, "image_key": "images", "filter_overlong_prompts": False})
    ds = RLHFDataset(parquet["train"], figure_processor.tokenizer, config, processor=figure_processor)
    item = ds[1]
    images, _ = asyncio.run(RLHFDataset.process_vision_info(item["raw_prompt"], ds.image_patch_size, config))
    assert len(images) == 1 and images[0].size == (84, 84)
    # what verl's agent loop sends the model (chat template + processor) is what the figure reader trained on
    text = figure_processor.apply_chat_template(item["raw_prompt"], add_generation_prompt=True, tokenize=False)
    verl_ids = figure_processor(text=[text], images=images, return_tensors="pt")["input_ids"][0]
    problem = load_parquet_problems(parquet["train"])[1]
    ours = encode_prompts(figure_processor, [problem])
    assert verl_ids.tolist() == ours["input_ids"][0].tolist()
    assert (verl_ids == figure_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 9


def test_verl_reward_path_grades_the_task(parquet):
    from verl.utils.reward_score import default_compute_score

    from verl_tor.figures import DATA_SOURCE, build_target

    target, _ = build_target(6, 7)
    assert default_compute_score(DATA_SOURCE, target, "42") == pytest.approx(1.0)
    assert default_compute_score(DATA_SOURCE, target.replace("42", "48"), "42") == pytest.approx(0.1)  # format only
    assert default_compute_score(DATA_SOURCE, "42", "42") == pytest.approx(0.0)  # no \boxed{}: neither


def test_public_api_resolves_and_imports_without_torch():
    import subprocess
    import sys

    import verl_tor.figures as figures

    for name in figures.__all__:
        assert getattr(figures, name) is not None, name
    code = "import sys, verl_tor.figures; print(sorted({'torch', 'verl', 'PIL'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_evaluate_val_on_the_parquet(parquet):
    import torch

    from verl_tor.figures import evaluate_val, load_figure_reader

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor = load_figure_reader()
        result = evaluate_val(model, processor, parquet["val"], temperature=1.0, n=2, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert result["greedy"]["responses"] == 3 and result["sampled"]["responses"] == 6
    for r in result.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["format"] > 0.5
        assert r["score"] == pytest.approx(0.9 * r["accuracy"] + 0.1 * r["format"])
