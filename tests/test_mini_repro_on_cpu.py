"""``recipes/cpu_tiny/mini_repro.py`` keeps working without running its grid.

The summary maths (mean and min-max over seeds, the training reward of the last steps), the accuracy read back from
verl's dumped validation generations, the settings guard of an output folder and the PIL plot are checked on
hand-made inputs; one real ``main_ppo`` run (``informative`` arm, one step, 4 validation problems, marked ``loop``)
checks the whole path from verl's trainer to ``summary.json``, ``table.md`` and the PNG, and that ``--summarize``
rebuilds them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mr():
    spec = importlib.util.spec_from_file_location("mini_repro", ROOT / "recipes" / "cpu_tiny" / "mini_repro.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mini_repro"] = module  # dataclasses / pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def record(arm: str, seed: int, accs: list[float], rewards: list[float], **tor: list[float]) -> dict:
    """A run's ``run.json`` as ``run_one`` writes it, validated at steps 0, 2, 4, ... and trained len(rewards) steps."""
    train = []
    for i, r in enumerate(rewards):
        step = {"step": i + 1, "critic/score/mean": r, "timing_s/step": 2.0}
        step.update({k: v[i] for k, v in tor.items()})
        train.append(step)
    return {
        "arm": arm,
        "seed": seed,
        "lr": 1e-3,
        "returncode": 0,
        "seconds": 100.0 + seed,
        "val": [
            {"step": 2 * i, "accuracy": a, "format": 1.0, "reward": 0.9 * a + 0.1, "n": 10} for i, a in enumerate(accs)
        ],
        "train": train,
    }


def hand_records() -> list[dict]:
    return [
        record("grpo", 1, [0.5, 0.6, 0.7], [0.1] * 6 + [0.2, 0.3, 0.4, 0.5, 0.6]),
        record("grpo", 2, [0.5, 0.4, 0.9], [0.0] * 6 + [0.6, 0.6, 0.6, 0.6, 0.6]),
        record("informative", 1, [0.5, 0.5, 0.5], [0.3] * 11, **{"tor/informative_frac": [0.5] * 10 + [1.0]}),
        record("informative", 2, [0.6, 0.7, 0.8], [0.4] * 11, **{"tor/informative_frac": [0.25] * 11}),
    ]


def test_summary_is_mean_and_min_max_over_seeds(mr):
    rows = mr.summarize_runs(hand_records(), last_steps=5)
    assert [(r["arm"], r["seeds"]) for r in rows] == [("grpo", [1, 2]), ("informative", [1, 2])]
    grpo, informative = rows
    assert grpo["val_steps"] == [0, 2, 4]
    last = grpo["accuracy"][-1]
    assert (last["step"], last["mean"], last["min"], last["max"]) == (4, pytest.approx(0.8), 0.7, 0.9)
    # the training reward of a seed: mean critic/score/mean of its last 5 steps; then over seeds
    per_seed = [statistics.fmean([0.2, 0.3, 0.4, 0.5, 0.6]), 0.6]
    assert grpo["train_reward_last"]["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert (grpo["train_reward_last"]["min"], grpo["train_reward_last"]["max"]) == pytest.approx((0.4, 0.6))
    assert "tor/informative_frac" not in grpo["tor"]
    frac = informative["tor"]["tor/informative_frac"]  # per seed the mean over steps, then over seeds
    assert frac["mean"] == pytest.approx(statistics.fmean([(0.5 * 10 + 1.0) / 11, 0.25]))
    table = mr.format_table(rows, {"steps": 10})
    assert "| `grpo` | 0.001 | 2 | 0.500 [0.500, 0.500] | 0.800 [0.700, 0.900] | 0.300 [0.200, 0.400] |" in table
    assert "| `informative` |" in table and "0.39 [0.25, 0.55] ·" in table


def test_seeds_validated_at_different_steps_are_refused(mr):
    records = hand_records()[:2]
    records[1]["val"] = records[1]["val"][:2]
    with pytest.raises(mr.MiniReproError, match="different steps"):
        mr.summarize_runs(records)


def test_accuracy_is_verls_geo3k_accuracy_of_the_dumped_generations(mr, tmp_path):
    rows = [
        ("<think>The sides are 3 and 5. 3*5=15</think> \\boxed{15}", "15", 1.0),  # right
        ("<think>The sides are 3 and 6. 3*6=18</think> \\boxed{18}", "15", 0.1),  # wrong, in format
        ("The sides are 3 and 5. \\boxed{15}", "15", 0.9),  # right, no <think>
        ("<think>3*5</think>", "15", 0.1),  # no box
    ]
    val_dir = tmp_path / "val_generations"
    val_dir.mkdir()
    for step in (10, 0):
        with open(val_dir / f"{step}.jsonl", "w") as f:
            for output, gt, score in rows[: 4 if step == 0 else 2]:
                f.write(json.dumps({"output": output, "gts": gt, "score": score, "step": step}) + "\n")
    scored = mr.score_validations(str(val_dir))
    assert [s["step"] for s in scored] == [0, 10]
    assert (scored[0]["accuracy"], scored[0]["format"], scored[0]["n"]) == (0.5, 0.75, 4)
    assert scored[0]["reward"] == pytest.approx((1.0 + 0.1 + 0.9 + 0.1) / 4)
    assert (scored[1]["accuracy"], scored[1]["n"]) == (0.5, 2)

    with open(val_dir / "12.jsonl", "w") as f:  # a score the Geometry3K reward would not give
        f.write(json.dumps({"output": rows[0][0], "gts": "15", "score": 0.5, "step": 12}) + "\n")
    with pytest.raises(mr.MiniReproError, match="not 0.9·1.0 \\+ 0.1·1.0"):
        mr.score_validations(str(val_dir))


def test_an_output_folder_keeps_its_settings(mr, tmp_path):
    config = {**mr.DEFAULTS, "n_train": 8, "n_val": 4, "command": "test"}
    mr.prepare_out(str(tmp_path), config)
    assert (tmp_path / "data" / "train.parquet").exists() and (tmp_path / "data" / "val.parquet").exists()
    mr.prepare_out(str(tmp_path), {**config, "arms": ["grpo"], "lrs": [1e-3]})  # more runs, same settings: fine
    assert json.loads((tmp_path / "config.json").read_text())["lrs"] == sorted({*mr.DEFAULTS["lrs"], 1e-3})
    with pytest.raises(mr.MiniReproError, match="--steps was 15 there, now 20"):
        mr.prepare_out(str(tmp_path), {**config, "steps": 20})


def test_plot_draws_each_arm_in_its_colour(mr, tmp_path):
    from PIL import Image

    path = tmp_path / "accuracy.png"
    mr.draw_accuracy_plot(mr.summarize_runs(hand_records()), str(path), "a title")
    image = Image.open(path).convert("RGB")
    assert image.size[0] == 640 and image.size[1] > 420
    colours = set(image.getdata())
    for arm in ("grpo", "informative"):
        assert mr.COLORS[arm] in colours, arm
    assert mr.COLORS["tor"] not in colours  # an arm without runs is not drawn
    # the min-max band: grpo's seeds differ, so its colour at 40/255 over white appears
    band = tuple(round(255 + (c - 255) * 40 / 255) for c in mr.COLORS["informative"])
    assert any(all(abs(a - b) <= 1 for a, b in zip(px, band)) for px in colours)


def test_summarize_refuses_a_folder_without_runs(mr, tmp_path):
    with pytest.raises(mr.MiniReproError, match="no config.json"):
        mr.summarize(str(tmp_path))


@pytest.mark.loop
def test_one_real_run_to_table_and_plot(mr, tmp_path):
    """One main_ppo run (ToR, rank_tokens=informative) through the script: run.json, summary, table, plot."""
    out = tmp_path / "out"
    lines: list[str] = []
    args = ["--out", str(out), "--arms", "informative", "--seeds", "1", "--steps", "1", "--test-freq", "1"]
    args += ["--val", "4", "--train", "8", "--prompts", "4", "--lrs", "1e-3"]
    assert mr.main(args, log=lines.append) == 0
    run = json.loads((out / "runs" / "informative-seed1-lr0.001" / "run.json").read_text())
    assert run["returncode"] == 0
    assert "tor.rank_tokens=informative" in run["overrides"] and "tor.seed=1" in run["overrides"]
    assert [v["step"] for v in run["val"]] == [0, 1] and all(v["n"] == 4 for v in run["val"])
    assert [t["step"] for t in run["train"]] == [1]
    assert 0 < run["train"][0]["tor/informative_frac"] <= 1
    assert 0 < run["train"][0]["tor/reasoning_frac"] <= 0.31

    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["arms"]
    assert row["accuracy"][0]["mean"] == run["val"][0]["accuracy"]
    table = (out / "table.md").read_text()
    assert f"| `informative` | 0.001 | 1 | {run['val'][0]['accuracy']:.3f} | {run['val'][1]['accuracy']:.3f} |" in table
    assert (out / "accuracy.png").stat().st_size > 1000

    os.remove(out / "table.md")
    os.remove(out / "accuracy.png")
    assert mr.main(["--summarize", str(out)], log=lines.append) == 0
    assert (out / "table.md").read_text() == table and (out / "accuracy.png").exists()
    # a second call keeps the finished run instead of running it again
    assert mr.main(args, log=lines.append) == 0
    assert any("done before, kept" in line for line in lines)
