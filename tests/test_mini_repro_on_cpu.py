"""``recipes/cpu_tiny/mini_repro.py`` keeps working without running its grid.

The summary maths (mean and min-max over seeds, the training reward of the last steps), the accuracy read back from
verl's dumped validation generations, the settings guard of an output folder and the PIL plot are checked on
hand-made inputs; ``run_one`` is checked for the recipe, overrides and variables it gives verl's trainer, and the
accuracy read-back on a real validation dump of verl's trainer in ``tests/test_main_ppo_on_cpu.py``
(``test_validation_dump_scores_as_verl_logged_it``: a run of its own here would cost CI another minute).
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
    assert "| `informative` |" in table and "0.40 [0.25, 0.55] · —" in table


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
        ("<think>3*5</think>", "15", 0.0),  # no box: neither right nor in format
    ]
    val_dir = tmp_path / "val_generations"
    val_dir.mkdir()
    for step in (10, 0):
        with open(val_dir / f"{step}.jsonl", "w") as f:
            for output, gt, score in rows[: 4 if step == 0 else 2]:
                f.write(json.dumps({"output": output, "gts": gt, "score": score, "step": step}) + "\n")
    scored = mr.score_validations(str(val_dir))
    assert [s["step"] for s in scored] == [0, 10]
    assert (scored[0]["accuracy"], scored[0]["format"], scored[0]["n"]) == (0.5, 0.5, 4)
    assert scored[0]["reward"] == pytest.approx((1.0 + 0.1 + 0.9 + 0.0) / 4)
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
    colours = set(image.get_flattened_data())
    for arm in ("grpo", "informative"):
        assert mr.COLORS[arm] in colours, arm
    assert mr.COLORS["tor"] not in colours  # an arm without runs is not drawn
    # the min-max band: grpo's seeds differ, so its colour at 40/255 over white appears
    band = tuple(round(255 + (c - 255) * 40 / 255) for c in mr.COLORS["informative"])
    assert any(all(abs(a - b) <= 1 for a, b in zip(px, band)) for px in colours)


def test_summarize_refuses_a_folder_without_runs(mr, tmp_path):
    with pytest.raises(mr.MiniReproError, match="no config.json"):
        mr.summarize(str(tmp_path))


def test_run_one_runs_the_arm_and_keeps_what_verl_logged(mr, tmp_path, monkeypatch):
    """``run_one`` gives ``run_cpu_recipe`` the arm's recipe and overrides, the seed, LR and batch as the recipe's
    variables, and records verl's per-step metrics and the scored validation dumps in ``run.json``; a run verl
    logged at other steps, or a dump whose reward is not the one verl logged, is an error."""
    import verl_tor.local.launch as launch

    calls = []
    config = {"steps": 2, "test_freq": 1, "prompts": 4, "responses": 2}
    output = "<think>The sides are 3 and 5. 3*5=15</think> \\boxed{15}"

    def fake_run(recipe, overrides, cpu_dir, experiment, env, on_step):
        calls.append((recipe, list(overrides), env))
        val_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("trainer.validation_data_dir="))
        os.makedirs(val_dir, exist_ok=True)
        for step in range(3):
            with open(os.path.join(val_dir, f"{step}.jsonl"), "w") as f:
                f.write(json.dumps({"output": output, "gts": "15", "score": 1.0, "step": step}) + "\n")
        steps = [{"step": 0, mr.VAL_REWARD: 1.0}]
        steps += [{"step": i, mr.VAL_REWARD: 1.0, mr.TRAIN_SCORE: 0.5, "timing_s/step": 1.0} for i in (1, 2)]
        for step in steps:
            on_step(step)
        return launch.LoopRun(returncode=0, steps=steps, seconds=3.0)

    monkeypatch.setattr(launch, "run_cpu_recipe", fake_run)
    record = mr.run_one(str(tmp_path), config, "perception_only", 3, 2e-4, log=lambda line: None)
    ((recipe, overrides, env),) = calls
    assert recipe == "grpo_tor" and "tor.mode=perception_only" in overrides and "tor.seed=3" in overrides
    assert "trainer.val_before_train=True" in overrides
    assert env["SEED"] == "3" and env["LR"] == "0.0002" and env["TOTAL_STEPS"] == "2" and env["TEST_FREQ"] == "1"
    assert (env["ROLLOUT_BATCH_SIZE"], env["UPDATE_BATCH_SIZE"], env["N_RESPONSES"]) == ("4", "4", "2")
    assert [v["step"] for v in record["val"]] == [0, 1, 2] and record["val"][0]["accuracy"] == 1.0
    assert [t["step"] for t in record["train"]] == [1, 2]
    saved = json.loads((tmp_path / "runs" / "perception_only-seed3-lr0.0002" / "run.json").read_text())
    assert saved == record
    # a finished run is kept, not run again
    assert mr.run_one(str(tmp_path), config, "perception_only", 3, 2e-4, log=lambda line: None) == record
    assert len(calls) == 1

    calls.clear()
    monkeypatch.setattr(
        launch, "run_cpu_recipe", lambda *a, **k: launch.LoopRun(returncode=0, steps=[{"step": 0}, {"step": 2}])
    )
    with pytest.raises(mr.MiniReproError, match=r"logged steps \[0, 2\], not \[0, 1, 2\]"):
        mr.run_one(str(tmp_path), config, "grpo", 1, 2e-4, log=lambda line: None)
