"""``recipes/cpu_tiny/mini_repro.py`` keeps working without running its grid.

The summary maths (mean and min-max over seeds, the training reward of the last steps), the accuracy read back from
verl's dumped validation generations, the settings guard of an output folder and the PIL plot are checked on
hand-made inputs; ``run_one`` is checked for the recipe, overrides and variables it gives verl's trainer, and the
accuracy read-back on a real validation dump of verl's trainer in ``tests/test_main_ppo_on_cpu.py``
(``test_validation_dump_scores_as_verl_logged_it``: a run of its own here would cost CI another minute).
Issue 20's additions: each dumped response mapped to its problem and classified, the paired bootstrap, the grid's
order, resume and progress lines, and the summariser end to end on a stored published folder
(``tests/data/mini_repro_area_plus``, written by ``write_fixture`` below).
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
    config = {**mr.DEFAULTS, "n_train": 8, "n_val": 4, "model": "/m", "max_response_length": 64, "command": "test"}
    mr.prepare_out(str(tmp_path), config)
    assert (tmp_path / "data" / "train.parquet").exists() and (tmp_path / "data" / "val.parquet").exists()
    from verl_tor.figures.evaluate import load_parquet_problems

    assert {p.task for p in load_parquet_problems(str(tmp_path / "data" / "val.parquet"))} == {"area_plus"}
    mr.prepare_out(str(tmp_path), {**config, "arms": ["grpo"], "lrs": [1e-3]})  # more runs, same settings: fine
    assert json.loads((tmp_path / "config.json").read_text())["lrs"] == sorted({*mr.DEFAULTS["lrs"], 1e-3})
    with pytest.raises(mr.MiniReproError, match="--steps was 40 there, now 20"):
        mr.prepare_out(str(tmp_path), {**config, "steps": 20})
    with pytest.raises(mr.MiniReproError, match="--model was /m there, now /other"):
        mr.prepare_out(str(tmp_path), {**config, "model": "/other"})


def test_defaults_are_the_issue_20_grid(mr):
    assert mr.DEFAULTS["seeds"] == [1, 2, 3, 4, 5] and mr.DEFAULTS["task"] == "area_plus"
    assert (mr.DEFAULTS["steps"], mr.DEFAULTS["test_freq"], mr.DEFAULTS["n_val"]) == (40, 10, 256)
    assert (mr.DEFAULTS["n_train"], mr.DEFAULTS["prompts"], mr.DEFAULTS["responses"]) == (512, 8, 4)
    assert mr.DEFAULTS["arms"] == ["grpo", "tor", "reasoning_only", "perception_only", "random", "dapo", "dapo_tor"]
    assert "informative" in mr.ARMS and mr.ARMS["dapo"][0] == "dapo" and mr.ARMS["dapo_tor"][0] == "dapo_tor"


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
    from verl_tor.figures.evaluate import load_parquet_problems

    calls = []
    config = {
        **mr.DEFAULTS,
        "steps": 2,
        "test_freq": 1,
        "prompts": 4,
        "responses": 2,
        "n_train": 8,
        "n_val": 2,
        "model": "/a/reader",
        "max_response_length": 64,
    }
    mr.prepare_out(str(tmp_path), config)
    problems = load_parquet_problems(str(tmp_path / "data" / "val.parquet"))

    def fake_run(recipe, overrides, cpu_dir, experiment, env, on_step):
        calls.append((recipe, list(overrides), env))
        val_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("trainer.validation_data_dir="))
        os.makedirs(val_dir, exist_ok=True)
        for step in range(3):
            with open(os.path.join(val_dir, f"{step}.jsonl"), "w") as f:
                for i, p in reversed(list(enumerate(problems))):  # verl's uid order, not the dataset's
                    row = {"output": p.target, "gts": p.answer, "score": 1.0, "step": step, "problem_index": i}
                    f.write(json.dumps(row) + "\n")
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
    assert (env["MODEL_PATH"], env["MAX_RESPONSE_LENGTH"]) == ("/a/reader", "64")
    assert f"reward.custom_reward_function.path={mr.INDEXED_REWARD}" in overrides
    assert [v["step"] for v in record["val"]] == [0, 1, 2] and record["val"][0]["accuracy"] == 1.0
    scores = json.loads((tmp_path / "runs" / "perception_only-seed3-lr0.0002" / "scores.json").read_text())
    assert scores["steps"]["2"] == {"acc": "11", "class": "cc"} and scores["n"] == 2
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


# ---------------------------------------------------------------------------------------------- issue 20: per problem
FIXTURE = ROOT / "tests" / "data" / "mini_repro_area_plus"
"""A published folder (``--publish``): 2 arms x 2 seeds x 3 validation steps x 8 area_plus problems, written by
``write_fixture`` (``run_one`` with a stand-in for verl's trainer). Rewrite it with MINI_REPRO_WRITE_FIXTURE=1."""


def response(problem, kind: str) -> str:
    """A response to an area_plus ``problem`` of one error class."""
    from verl_tor.figures.task import build_task_target

    if kind == "correct":
        return problem.target
    if kind == "misread":  # the width read wrong, the arithmetic right: a wrong answer
        return build_task_target("area_plus", problem.width % 9 + 1, problem.height, problem.inside)[0]
    wrong = int(problem.answer) + 1
    if kind == "miscalculated":  # every value right, the boxed result wrong
        return problem.target.replace(f"\\boxed{{{problem.answer}}}", f"\\boxed{{{wrong}}}")
    return f"\\boxed{{{wrong}}}"  # malformed


def fixture_kind(arm: str, seed: int, step: int, i: int) -> str:
    """The stand-in trainer's response class: more problems right with each step, faster for ``tor``."""
    if i < 2 + step * (2 if arm == "tor" else 1) + seed % 2:
        return "correct"
    return ("misread", "miscalculated", "malformed")[(i + seed) % 3]


def write_fixture(mr, out: Path) -> None:
    """Run the fixture's grid through ``run_one`` with a stand-in for ``run_cpu_recipe`` that dumps what verl's
    validation dumps (rows in a shuffled order, scored by verl's Geometry3K reward, with ``problem_index``)."""
    import random

    from verl.utils.reward_score.geo3k import compute_score

    import verl_tor.local.launch as launch
    from verl_tor.figures.evaluate import load_parquet_problems

    config = {
        **mr.DEFAULTS,
        "arms": ["grpo", "tor"],
        "seeds": [1, 2],
        "steps": 2,
        "test_freq": 1,
        "n_val": 8,
        "n_train": 8,
        "prompts": 4,
        "model": "/fixture/figure_reader_plus",
        "max_response_length": 64,
        "command": "tests/test_mini_repro_on_cpu.py write_fixture",
    }
    mr.prepare_out(str(out), config)
    problems = load_parquet_problems(str(out / "data" / "val.parquet"))

    def fake_run(recipe, overrides, cpu_dir, experiment, env, on_step):
        arm, seed = experiment.split("-")[0], int(env["SEED"])
        val_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("trainer.validation_data_dir="))
        os.makedirs(val_dir, exist_ok=True)
        steps = []
        for step in range(3):
            order = list(range(len(problems)))
            random.Random(f"{experiment}:{step}").shuffle(order)
            scores = []
            with open(os.path.join(val_dir, f"{step}.jsonl"), "w") as f:
                for i in order:
                    output = response(problems[i], fixture_kind(arm, seed, step, i))
                    scores.append(compute_score(output, problems[i].answer))
                    row = {"output": output, "gts": problems[i].answer, "score": scores[-1], "step": step}
                    f.write(json.dumps(row | {"problem_index": i}) + "\n")
            metrics = {"step": step, mr.VAL_REWARD: statistics.fmean(scores)}
            if step:
                metrics |= {mr.TRAIN_SCORE: 0.1 * step, "timing_s/step": 1.0}
            steps.append(metrics)
        return launch.LoopRun(returncode=0, steps=steps, seconds=3.0)

    original = launch.run_cpu_recipe
    launch.run_cpu_recipe = fake_run
    try:
        for arm, seed, lr in mr.order_grid(config["arms"], config["seeds"], config["lrs"]):
            mr.run_one(str(out), config, arm, seed, lr, log=lambda line: None)
    finally:
        launch.run_cpu_recipe = original


def test_scores_map_each_response_to_its_problem_and_class(mr, tmp_path):
    """verl dumps a validation in uid order: rows are given their problem by ``problem_index`` and graded and
    classified against it; a row whose ground truth is not its problem's answer, a row without an index, a problem
    answered twice or not at all is an error that says so."""
    from verl_tor.figures import make_problem

    problems = [make_problem(s, "area_plus") for s in range(4)]
    kinds = ["correct", "misread", "miscalculated", "malformed"]
    val_dir = tmp_path / "val_generations"
    val_dir.mkdir()

    def dump(step, rows):
        with open(val_dir / f"{step}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    rows = [
        {"output": response(problems[i], kinds[(i + 1) % 4]), "gts": problems[i].answer, "problem_index": i}
        for i in (2, 0, 3, 1)
    ]
    dump(0, rows)
    scores = mr.score_problems(str(val_dir), problems)
    # problem i answered with class kinds[(i + 1) % 4]: misread, miscalculated, malformed, correct
    assert scores["steps"] == {"0": {"acc": "0001", "class": "rmfc"}}
    assert (scores["n"], scores["task"], scores["classes"]) == (4, "area_plus", "crmf")

    dump(0, [rows[0] | {"gts": "999"}, *rows[1:]])
    with pytest.raises(mr.MiniReproError, match=r"row 0: ground truth '999' but problem 2 .* has answer"):
        mr.score_problems(str(val_dir), problems)
    dump(0, [{k: v for k, v in rows[0].items() if k != "problem_index"}, *rows[1:]])
    with pytest.raises(mr.MiniReproError, match="no problem_index"):
        mr.score_problems(str(val_dir), problems)
    dump(0, [*rows, rows[0]])
    with pytest.raises(mr.MiniReproError, match="problem 2 answered twice"):
        mr.score_problems(str(val_dir), problems)
    dump(0, rows[:3])
    with pytest.raises(mr.MiniReproError, match="1 of 4 problems not answered"):
        mr.score_problems(str(val_dir), problems)


def test_bootstrap_interval_brackets_a_known_difference_and_is_zero_for_identical_arms(mr):
    import numpy as np

    rng = np.random.default_rng(1)
    base = (rng.random((5, 256, 2)) < 0.4).astype(float)
    better = np.where(rng.random((5, 256, 2)) < 0.2, 1.0, base)  # 20 % of the problems flipped to right
    diff = better - base
    mean, low, high = mr.bootstrap_mean(diff, n_resamples=2000)
    assert mean == pytest.approx(diff.mean(axis=(0, 1)))
    assert np.all(low < mean) and np.all(mean < high) and np.all(low > 0)
    assert np.all(high - low < 0.1)
    # a fixed RNG seed: the same interval twice
    again = mr.bootstrap_mean(diff, n_resamples=2000)
    assert np.array_equal(again[1], low) and np.array_equal(again[2], high)
    mean, low, high = mr.bootstrap_mean(np.zeros((5, 256, 2)), n_resamples=500)
    assert np.all(mean == 0) and np.all(low == 0) and np.all(high == 0)


def test_area_under_curve_is_the_trapezoid_over_the_step_span(mr):
    import numpy as np

    acc = np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])  # [step, problem] at steps 0, 10, 30
    final, area = mr.curve_metrics([0, 10, 30], acc).T
    assert final.tolist() == [1.0, 0.0]
    assert area.tolist() == pytest.approx([(0.5 * 10 + 1.0 * 20) / 30, (1.0 * 10 + 0.5 * 20) / 30])


def test_stored_fixture_is_what_the_code_writes(mr, tmp_path):
    """The committed folder is ``write_fixture``'s output (only machine paths in run.json's overrides differ)."""
    out = tmp_path / "grid"
    write_fixture(mr, out)
    if os.environ.get("MINI_REPRO_WRITE_FIXTURE"):
        import shutil

        shutil.rmtree(FIXTURE, ignore_errors=True)
        mr.summarize(str(out), publish=str(FIXTURE), log=lambda line: None)
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == sorted(p.name for p in (FIXTURE / "runs").iterdir())
    for name in names:
        for file in ("scores.json", "run.json"):
            made = json.loads((out / "runs" / name / file).read_text())
            stored = json.loads((FIXTURE / "runs" / name / file).read_text())
            made.pop("overrides", None), stored.pop("overrides", None)
            assert made == stored, (name, file)


def test_summarizer_pairs_are_the_protocols_comparisons(mr):
    """The paired rows are issue 20's comparisons (ToR-GRPO against GRPO, each single set and random; ToR-DAPO
    against DAPO), not every arm against GRPO; a pair missing an arm, or run at another LR, is left out."""

    def scores(right_at_last: int, n: int = 4) -> dict:  # step 0: nobody right; step 10: the first `right_at_last`
        return {
            "steps": {
                "0": {"acc": "0" * n, "class": "m" * n},
                "10": {
                    "acc": "1" * right_at_last + "0" * (n - right_at_last),
                    "class": "c" * right_at_last + "r" * (n - right_at_last),
                },
            }
        }

    right = {"grpo": 1, "tor": 3, "reasoning_only": 2, "perception_only": 4, "dapo": 0, "dapo_tor": 1}
    records, stored = [], {}
    for arm, k in right.items():
        for seed in (1, 2):
            records.append({"arm": arm, "seed": seed, "lr": 5e-5})
            stored[mr.experiment_name(arm, seed, 5e-5)] = scores(k)
    records.append({"arm": "random", "seed": 1, "lr": 1e-4})  # another LR: no pair with tor at 5e-5
    stored[mr.experiment_name("random", 1, 1e-4)] = scores(2)
    paired = mr.summarize_scores(records, stored)["paired"]
    assert [(p["arm"], p["baseline"]) for p in paired] == [
        ("tor", "grpo"),
        ("tor", "reasoning_only"),
        ("tor", "perception_only"),
        ("dapo_tor", "dapo"),
    ]
    want = {("tor", "grpo"): 2 / 4, ("tor", "reasoning_only"): 1 / 4, ("tor", "perception_only"): -1 / 4}
    want[("dapo_tor", "dapo")] = 1 / 4
    for p in paired:
        assert p["final"]["mean"] == pytest.approx(want[(p["arm"], p["baseline"])])
        assert p["area"]["mean"] == pytest.approx(want[(p["arm"], p["baseline"])] / 2)  # the trapezoid from 0
        assert p["seeds"] == [1, 2] and p["n_problems"] == 4


def test_summarize_rebuilds_the_paired_table_from_the_stored_compact_files(mr, tmp_path):
    """``--summarize`` of a published folder (run.json + scores.json, no dumps): the paired ToR-GRPO - GRPO
    differences are the per-(seed, problem) means, inside their interval, and the plots are drawn."""
    import shutil

    import numpy as np
    from PIL import Image

    folder = tmp_path / "published"
    shutil.copytree(FIXTURE, folder)
    for name in ("summary.json", "table.md", "accuracy.png", "error_classes.png"):
        (folder / name).unlink()
    summary = mr.summarize(str(folder), log=lambda line: None)
    (paired,) = summary["per_problem"]["paired"]
    assert (paired["arm"], paired["baseline"], paired["seeds"], paired["n_problems"]) == ("tor", "grpo", [1, 2], 8)
    # by hand from the fixture's rule: at the last step (2) tor has 2 + 4 + seed%2 right, grpo 2 + 2 + seed%2
    assert paired["final"]["mean"] == pytest.approx(2 / 8)
    # area: steps 0,1,2 -> trapezoid / 2; the difference per step is 0, 1, 2 problems of 8
    assert paired["area"]["mean"] == pytest.approx(((0 + 1) / 2 + (1 + 2) / 2) / 2 / 8)
    for metric in ("final", "area"):
        assert paired[metric]["low"] <= paired[metric]["mean"] <= paired[metric]["high"]
    grpo = next(a for a in summary["per_problem"]["arms"] if a["arm"] == "grpo")
    assert [p["step"] for p in grpo["accuracy"]] == [0, 1, 2]
    assert grpo["accuracy"][0]["mean"] == pytest.approx(np.mean([(2 + 1) / 8, (2 + 0) / 8]))
    shares = [grpo["classes"][k][0] for k in ("correct", "misread", "miscalculated", "malformed")]
    assert sum(shares) == pytest.approx(1.0) and all(s > 0 for s in shares)
    table = (folder / "table.md").read_text()
    assert "| `tor` − `grpo` | 5e-05 | 2 x 8 | +0.250 [" in table
    assert table == (FIXTURE / "table.md").read_text()  # the stored table is what the summariser makes
    for name, arms in (("accuracy.png", ("grpo", "tor")), ("error_classes.png", ("grpo", "tor"))):
        colours = set(Image.open(folder / name).convert("RGB").get_flattened_data())
        assert all(mr.COLORS[a] in colours for a in arms), name
    # --publish copies exactly the compact files
    dest = tmp_path / "dest"
    mr.summarize(str(folder), publish=str(dest), log=lambda line: None)
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    runs = sorted(
        f"runs/{r}/{f}"
        for r in ("grpo-seed1-lr5e-05", "grpo-seed2-lr5e-05", "tor-seed1-lr5e-05", "tor-seed2-lr5e-05")
        for f in ("run.json", "scores.json")
    )
    assert files == sorted(["config.json", "summary.json", "table.md", "accuracy.png", "error_classes.png", *runs])


def test_grid_is_seed_major_within_a_part(mr):
    grid = mr.order_grid(["dapo", "tor", "grpo", "random"], [1, 2], [1e-4])
    assert [(a, s) for a, s, _ in grid] == [
        ("grpo", 1), ("tor", 1), ("grpo", 2), ("tor", 2),
        ("random", 1), ("random", 2),
        ("dapo", 1), ("dapo", 2),
    ]  # fmt: skip


def test_progress_line_has_the_eta_of_this_invocations_runs(mr):
    progress = mr.Progress(total=5, jobs=2)
    assert progress.finished("grpo-seed1-lr5e-05", 1.0, ran=False) == (
        "[mini_repro] run 1/5 grpo-seed1-lr5e-05 kept (done before); ETA ?"
    )
    assert (
        progress.finished("tor-seed1-lr5e-05", 600.0)
        == "[mini_repro] run 2/5 tor-seed1-lr5e-05 done in 600 s; ETA 15 min"
    )
    assert progress.finished("grpo-seed2-lr5e-05", 1200.0).endswith("done in 1200 s; ETA 15 min")  # 900 s x 2 / 2
    progress.finished("a", 1.0), progress.finished("b", 1.0)
    assert progress.done == 5


def test_a_resumed_grid_keeps_finished_runs_and_logs_progress(mr, tmp_path, monkeypatch):
    """``main`` runs the part's arms seed-major, skips runs finished before, and logs a progress line per run."""
    model = tmp_path / "reader"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ran = []

    def fake_run_one(out, config, arm, seed, lr, log):  # as run_one: a finished run is kept
        run_dir = os.path.join(out, "runs", mr.experiment_name(arm, seed, lr))
        if mr.is_finished(run_dir):
            return {}
        ran.append((arm, seed))
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "run.json"), "w") as f:
            json.dump({"returncode": 0}, f)
        return {}

    monkeypatch.setattr(mr, "run_one", fake_run_one)
    monkeypatch.setattr(mr, "summarize", lambda *a, **k: {})
    lines = []
    argv = ["--out", str(tmp_path / "grid"), "--model", str(model), "--part", "primary", "--seeds", "1", "2"]
    argv += ["--val", "2", "--train", "320"]
    assert mr.main(argv, log=lines.append) == 0
    assert ran == [("grpo", 1), ("tor", 1), ("grpo", 2), ("tor", 2)]
    assert [line.split(" done")[0] for line in lines if "run " in line] == [
        f"[mini_repro] run {k}/4 {e}-lr5e-05"
        for k, e in enumerate(["grpo-seed1", "tor-seed1", "grpo-seed2", "tor-seed2"], 1)
    ]
    config = json.loads((tmp_path / "grid" / "config.json").read_text())
    assert (config["task"], config["model"], config["max_response_length"]) == ("area_plus", str(model), 64)
    ran.clear(), lines.clear()
    assert mr.main([*argv, "--seeds", "1", "2", "3"], log=lines.append) == 0
    assert ran == [("grpo", 3), ("tor", 3)]
    progress = [line for line in lines if line.startswith("[mini_repro] run ")]
    assert sum("kept (done before)" in line for line in progress) == 4 and progress[-1].endswith("; ETA 0 min")


def test_published_area_plus_results_rebuild_from_their_stored_logs(mr, tmp_path):
    """recipes/RESULTS.md's issue-20 table and plots: ``--summarize`` of the published folder (the grid's compact
    per-run logs, no dumps) rebuilds exactly the stored table and the paired differences of the stored summary, and
    every stored run is the protocol's (area_plus, LR 5e-5, 40 steps, validation every 10 on 256 problems)."""
    import shutil

    published = ROOT / "recipes" / "cpu_tiny" / "results" / "area_plus"
    config = json.loads((published / "config.json").read_text())
    protocol = {"task": "area_plus", "steps": 40, "test_freq": 10, "n_val": 256, "n_train": 512, "prompts": 8}
    assert {k: config[k] for k in protocol} == protocol and config["lrs"] == [5e-5]
    runs = sorted(p.name for p in (published / "runs").iterdir())
    assert runs == sorted(
        f"{arm}-seed{seed}-lr5e-05" for part in mr.PARTS.values() for arm in part for seed in range(1, 6)
    )
    for run in runs:
        scores = json.loads((published / "runs" / run / "scores.json").read_text())
        assert json.loads((published / "runs" / run / "run.json").read_text())["returncode"] == 0
        assert len(json.dumps(scores)) > 256, run  # per-problem records, not an aggregate
    folder = tmp_path / "copy"
    shutil.copytree(published, folder)
    for name in ("summary.json", "table.md", "accuracy.png", "error_classes.png"):
        (folder / name).unlink()
    summary = mr.summarize(str(folder), log=lambda line: None)
    assert (folder / "table.md").read_text() == (published / "table.md").read_text()
    stored = json.loads((published / "summary.json").read_text())
    assert json.loads(json.dumps(summary["per_problem"]["paired"])) == stored["per_problem"]["paired"]
    paired = summary["per_problem"]["paired"]
    assert [(p["arm"], p["baseline"]) for p in paired] == [c for c in mr.COMPARISONS if "informative" not in c]
    for row in paired:
        assert row["seeds"] == [1, 2, 3, 4, 5] and row["n_problems"] == 256
        assert row["final"]["low"] <= row["final"]["mean"] <= row["final"]["high"]
