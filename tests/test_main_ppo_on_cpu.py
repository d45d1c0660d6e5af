"""verl's real trainer loop on CPU: ``python -m verl.trainer.main_ppo`` through ``recipes/cpu_tiny/`` (Ray,
TransferQueue, the agent loop, the FSDP2 actor, weight sync, reward workers), with verl_tor's local backend.

Each test runs the recipe in its own process and reads verl's per-step metrics (its ``file`` logger). The model is
the shipped figure reader (a tiny Qwen2.5-VL that solves about half of its task when sampling), rewarded by verl's
own Geometry3K scorer, so GRPO groups have mixed rewards and the policy loss is real. Marked ``loop``: ~30-60 s a run
on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loop_support import TESTS, assert_ok, run, training_metrics

pytestmark = pytest.mark.loop


@pytest.fixture(scope="session")
def demo(cpu_dir):
    """``verl-tor demo``'s run (``verl_tor.tools.loop_demo``: ToR-GRPO, a token map every step), here 3 steps with
    validation (its generations dumped) and a checkpoint at step 2, and a learning rate large enough that one update
    visibly moves the policy. Returns (the demo's result, the progress lines it printed)."""
    from verl_tor.tools.loop_demo import run_loop_demo

    lines: list[str] = []
    result = run_loop_demo(
        cpu_dir,
        steps=3,
        overrides=("tor.log_token_maps_rollouts=16", f"trainer.validation_data_dir={cpu_dir}/demo_val"),
        env={"SAVE_FREQ": "2", "TEST_FREQ": "2", "LR": "1e-3"},
        print_fn=lines.append,
    )
    return result, lines


@pytest.fixture(scope="session")
def tor_run(demo):
    return demo[0].run


def test_demo_reports_every_step_of_verls_trainer(demo):
    result, lines = demo
    assert_ok(result.run, 3)
    progress = [line for line in lines if line.startswith("[demo] step ")]
    assert [line.split()[2] for line in progress] == ["1/3", "2/3", "3/3"], lines
    for line in progress:
        for label in ("reward", "pg_loss", "T_r 0.30", "T_p 0.30", "noimg", "select", "step"):
            assert label in line, line
    assert [os.path.basename(m) for m in result.token_maps] == [f"step_{i:06d}.html" for i in (1, 2, 3)]


def test_tor_metrics_every_step_and_a_real_policy_loss(tor_run):
    from verl_tor import metrics as M

    assert_ok(tor_run, 3)
    for step in tor_run.steps:
        for key in (M.REASONING_FRAC, M.PERCEPTION_FRAC, M.OVERLAP_FRAC, M.WEIGHT_MEAN, M.SENSITIVITY_THRESHOLD):
            assert key in step, f"step {step['step']}: {key} missing"
        assert step[M.REASONING_FRAC] == pytest.approx(0.3, abs=0.02)
        assert step[M.PERCEPTION_FRAC] == pytest.approx(0.3, abs=0.02)
        assert step[M.SENSITIVITY_MEAN_SELECTED] > step[M.SENSITIVITY_MEAN_REST] > 0  # the image-free pass ran
        assert "timing_s/tor_noimg" in step and "timing_s/tor_select" in step
    assert any(abs(s["actor/pg_loss"]) > 1e-6 for s in tor_run.steps), [s["actor/pg_loss"] for s in tor_run.steps]
    assert all(s["actor/grad_norm"] > 0 for s in tor_run.steps)


def test_training_token_maps_show_each_rollout_with_its_question_and_figure(tor_run):
    assert_ok(tor_run, 3)
    page = (Path(tor_run.out_dir) / "tor_token_maps" / "step_000001.html").read_text()
    assert page.count("data:image/png;base64,") >= 16  # the figure rebuilt from verl's pixel values, per rollout
    assert "Find its area." in page  # the question's text, read from verl's raw_prompt
    # cards by prompt and rollout (4 prompts x 4 rollouts), each with the outcome verl stored for the row: the reward
    # (rm_scores), the ground truth (reward_model) and the reward's extra info (Geometry3K's score as ``acc``)
    import re

    titles = re.findall(r"<h2>([^<]*)</h2>", page)
    assert titles == [f"prompt {p} · rollout {r}/4" for p in range(1, 5) for r in range(1, 5)], titles
    for name in ("reward", "ground truth", "acc"):
        assert len(re.findall(rf"<span class='fact'><b>{name}</b> [^<]+</span>", page)) == 16, name


def test_rollout_follows_the_actor_and_drifts_without_the_weight_push(cpu_dir, tor_run):
    """verl logs |p_rollout - p_actor| of the sampled tokens: ~0 while the hf server gets the weights after every
    update; without the push (``rollout.custom.sync_weights=false``) step 2 samples from step 1's policy."""
    assert_ok(tor_run, 3)
    stale = run(
        cpu_dir,
        "grpo_tor",
        "tor_no_push",
        "+actor_rollout_ref.rollout.custom.sync_weights=False",
        LR="1e-3",
    )
    assert_ok(stale, 2)
    key = "training/rollout_probs_diff_mean"
    synced, unsynced = tor_run.metric(key), stale.metric(key)
    assert synced[0] == pytest.approx(unsynced[0], rel=1e-6)  # same initial weights, same samples
    assert max(synced) < 1e-3, synced
    assert unsynced[1] > 10 * synced[1] and unsynced[1] > 1e-3, (synced, unsynced)


def map_cards(path: Path) -> list[tuple]:
    """A token map's rollouts as (figure, [(token hover text, token)]) -- each token's entropy, |Δ log p| and weight
    -- sorted: the cards' titles hold verl's random uids, and rows reach TransferQueue in the order their
    generations finish."""
    import re

    cards = path.read_text().split("<h2>")[1:]
    assert cards, path
    return sorted(
        (re.findall(r"src='(data:image/png;base64,[^']*)'", card)[:1], re.findall(r"title='([^']*)'>([^<]*)<", card))
        for card in cards
    )


def test_validation_checkpoint_and_resume_reproduce_the_tor_weights(cpu_dir, tor_run):
    """The 3-step run validated and saved a checkpoint at step 2; a run resumed from it continues at step 3, and its
    step-3 token map (ToR's weights, entropies and sensitivities of that step) equals the uninterrupted run's."""
    assert_ok(tor_run, 3)
    assert any(k.startswith("val-core/") or k.startswith("val/") for k in tor_run.steps[1]), sorted(tor_run.steps[1])
    checkpoint = Path(tor_run.out_dir) / "global_step_2"
    assert checkpoint.is_dir(), os.listdir(tor_run.out_dir)

    resumed = run(
        cpu_dir,
        "grpo_tor",
        "resumed",
        "tor.log_token_maps=1",
        "tor.log_token_maps_rollouts=16",
        "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={checkpoint}",
        steps=3,
        LR="1e-3",
    )
    assert resumed.returncode == 0, resumed.tail(60)
    assert [s["step"] for s in resumed.steps] == [3]
    page = "tor_token_maps/step_000003.html"
    assert map_cards(Path(resumed.out_dir) / page) == map_cards(Path(tor_run.out_dir) / page)
    a, b = training_metrics(tor_run.steps[2]), training_metrics(resumed.steps[0])
    a, b = ({k: v for k, v in m.items() if k.startswith("tor/")} for m in (a, b))
    assert a.keys() == b.keys()
    # Counts (fractions, weight means) are exact. Means of float32 scores over the selected tokens are summed in the
    # order rows reached TransferQueue, which differs between the runs: equal within float32 summation rounding.
    means = {k for k in a if "_mean/" in k and not k.startswith("tor/weight")}
    assert {k: a[k] for k in a.keys() - means} == {k: b[k] for k in b.keys() - means}
    assert {k: b[k] for k in means} == pytest.approx({k: a[k] for k in means}, rel=1e-6, abs=1e-9)


def test_validation_dump_scores_as_verl_logged_it(cpu_dir, tor_run):
    """``recipes/cpu_tiny/mini_repro.py`` reads its accuracies from verl's validation dumps: on the demo run's dumps
    (steps 2 and 3) its reward is the one verl logged, and its accuracy is the share of correct boxed answers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mini_repro", TESTS.parent / "recipes" / "cpu_tiny" / "mini_repro.py")
    mr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mr)
    assert_ok(tor_run, 3)
    scored = mr.score_validations(os.path.join(cpu_dir, "demo_val"))
    assert [v["step"] for v in scored] == [2, 3]
    for v in scored:
        assert v["n"] == 8  # the module's 8 validation problems, greedy
        assert v["reward"] == pytest.approx(tor_run.steps[v["step"] - 1][mr.VAL_REWARD], abs=1e-6)
        assert 0 < v["format"] and v["reward"] == pytest.approx(0.9 * v["accuracy"] + 0.1 * v["format"])
