"""The figure reader's SFT is deterministic (two runs, identical weights and tokenizer), and the shipped checkpoint
is what it claims: loaded by the real path, every digit its own token, reads the figure (verl_tor/figures)."""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vision_steps=2, sft_steps=3, batch_size=6, pool_size=8, warmup_steps=1)


def _train(**overrides):
    from verl_tor.figures.model import _tokenizer_file
    from verl_tor.figures.sft import SFTConfig, train_figure_reader

    _tokenizer_file.cache_clear()  # retrain the BPE too: it is part of what must be deterministic
    result = train_figure_reader(SFTConfig(**{**TINY, **overrides}), progress=False)
    return result.model.state_dict(), result.processor.tokenizer.backend_tokenizer.to_str(), result.log


def test_sft_is_deterministic():
    first, tok1, log1 = _train()
    second, tok2, log2 = _train()
    assert tok1 == tok2
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert log1["stage2"] == log2["stage2"]
    # ... and the steps did something, seeded: another seed gives other weights
    other, _, _ = _train(seed=1)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    untrained = _train(vision_steps=0, sft_steps=0)[0]
    assert not torch.equal(
        first["model.visual.patch_embed.proj.weight"], untrained["model.visual.patch_embed.proj.weight"]
    )
    assert not torch.equal(first["lm_head.weight"], untrained["lm_head.weight"])


@pytest.fixture(scope="module")
def reader():
    from verl_tor.figures import FIGURE_READER_CHECKPOINT, load_figure_reader

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1M-parameter model: one thread is as fast, and robust to a busy machine
    try:
        yield load_figure_reader(FIGURE_READER_CHECKPOINT)
    finally:
        torch.set_num_threads(threads)


def test_shipped_checkpoint_loads_through_verl_and_splits_digits(reader):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, processor = reader
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration) and hasattr(processor, "get_rope_index")
    tok = processor.tokenizer
    pieces = tok.convert_ids_to_tokens(tok("3*5=15 and 270", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["3", "5", "1", "5", "2", "7", "0"]
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 2e6, n_params


def test_shipped_checkpoint_is_package_data():
    from verl_tor.figures import FIGURE_READER_CHECKPOINT

    files = sorted(os.listdir(FIGURE_READER_CHECKPOINT))
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= set(files)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["options"]["packages"].strip() == "find_namespace:"  # a data folder without __init__.py is a package
    package = os.path.relpath(FIGURE_READER_CHECKPOINT, ROOT).replace(os.sep, ".")
    patterns = cfg["options.package_data"][package].split()
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in files)
    assert "recursive-include verl_tor/assets *" in (ROOT / "MANIFEST.in").read_text()
    size = sum(os.path.getsize(os.path.join(FIGURE_READER_CHECKPOINT, f)) for f in files)
    assert size < 8 * 2**20, f"the shipped checkpoint is {size / 2**20:.1f} MB"
    info = json.loads((Path(FIGURE_READER_CHECKPOINT) / "training.json").read_text())
    assert info["command"].startswith("python -m verl_tor.figures.sft") and info["config"]["seed"] == 0


def test_shipped_checkpoint_reads_the_figure(reader):
    """Greedy on 32 held-out problems: mostly right with the figure, ~never without it."""
    from verl_tor.figures import evaluate_figure_reader, make_problem, split_seeds

    model, processor = reader
    problems = [make_problem(s) for s in split_seeds("val", 32)]
    with_image = evaluate_figure_reader(model, processor, problems, temperature=0.0)
    removed = evaluate_figure_reader(model, processor, problems, temperature=0.0, image_view="none")
    blank = evaluate_figure_reader(model, processor, problems, temperature=0.0, image_view="blank")
    assert with_image["sides_read"] >= 0.6 and with_image["accuracy"] >= 0.5, with_image
    assert removed["accuracy"] <= 0.1 and blank["accuracy"] <= 0.1, (removed, blank)
    assert with_image["format"] == 1.0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"sft_steps": -1}, "sft_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"blind_frac": 1.5}, "blind_frac"),
        ({"aux_weight": -0.1}, "aux_weight"),
        ({"batch_size": 4, "text_only_frac": 0.5, "blind_frac": 0.5}, "batch_size"),
    ],
)
def test_sft_config_errors_name_the_field(overrides, field):
    from verl_tor.figures.sft import SFTConfig

    with pytest.raises(ValueError, match=rf"SFTConfig\.{field}=.*Fix: "):
        SFTConfig(**overrides)


def test_early_stop_rule_stops_at_the_first_check_at_target(monkeypatch):
    """``select_target``: stage 2 measures dev accuracy every ``select_every`` steps and stops at the first check at
    or above the target (the rule that made the area_plus reader), logging every check."""
    from verl_tor.figures import sft

    seen = []

    def fake_check(model, processor, problems):  # the dev set is the SFT split's, outside the pool
        seen.append(len(problems))
        return {"accuracy": [0.1, 0.4, 0.9][len(seen) - 1]}

    monkeypatch.setattr(sft, "_greedy_check", fake_check)
    _, _, log = _train(task="area_plus", sft_steps=20, select_target=0.35, select_every=2, select_n=4)
    assert seen == [4, 4] and log["stage2"]["stopped_at"] == 4
    assert [c["step"] for c in log["stage2"]["checks"]] == [2, 4]
    with pytest.raises(ValueError, match=r"SFTConfig\.task='volume'.*Fix: "):
        sft.SFTConfig(task="volume")


def test_shipped_area_plus_reader_starts_in_band_with_both_error_kinds():
    """The starting reader of issue 20: package data, < 8 MB, made by the rule its README states, and on held-out
    problems (64 of the 256) greedy accuracy inside 0.25-0.5 with misreads and miscalculations both present."""
    from verl_tor.figures import evaluate_figure_reader, load_figure_reader, make_problem, split_seeds
    from verl_tor.figures.model import FIGURE_READER_PLUS_CHECKPOINT

    files = os.listdir(FIGURE_READER_PLUS_CHECKPOINT)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    package = os.path.relpath(FIGURE_READER_PLUS_CHECKPOINT, ROOT).replace(os.sep, ".")
    assert all(fnmatch.fnmatch(f, cfg["options.package_data"][package]) for f in files)
    assert sum(os.path.getsize(os.path.join(FIGURE_READER_PLUS_CHECKPOINT, f)) for f in files) < 8 * 2**20
    info = json.loads((Path(FIGURE_READER_PLUS_CHECKPOINT) / "training.json").read_text())
    assert info["config"]["task"] == "area_plus" and info["config"]["select_target"] == 0.35
    checks = info["stage2"]["checks"]
    assert checks[-1]["accuracy"] >= 0.35 > max(c["accuracy"] for c in checks[:-1])
    model, processor = load_figure_reader(FIGURE_READER_PLUS_CHECKPOINT)
    problems = [make_problem(s, "area_plus") for s in split_seeds("val", 64)]
    result = evaluate_figure_reader(model, processor, problems, temperature=0.0, max_new_tokens=64)
    assert 0.25 <= result["accuracy"] <= 0.5, result
    assert result["misread"] >= 0.05 and result["miscalculated"] >= 0.05, result
    assert abs(sum(result[k] for k in ("correct", "misread", "miscalculated", "malformed")) - 1) < 1e-9
