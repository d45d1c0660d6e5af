"""verl's real trainer loop on CPU: ``python -m verl.trainer.main_ppo`` through ``recipes/cpu_tiny/`` (Ray,
TransferQueue, the agent loop, the FSDP2 actor, weight sync, reward workers), with verl_tor's local backend.

Each test runs the recipe in its own process and reads verl's per-step metrics (its ``file`` logger). The model is
the shipped figure reader (a tiny Qwen2.5-VL that solves about half of its task when sampling), rewarded by verl's
own Geometry3K scorer, so GRPO groups have mixed rewards and the policy loss is real. Marked ``loop``: ~30-60 s a run
on 2 cores.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from verl_tor.local.launch import LoopRun, run_cpu_recipe

pytestmark = pytest.mark.loop

TESTS = Path(__file__).resolve().parent
SHARED_RUNS = pytest.mark.xdist_group("main_ppo_shared_runs")
"""Tests that read this module's shared runs (``demo``, ``stock_run``): one pytest-xdist worker runs them all, so each
run happens once; the other loop tests go to whichever worker is free."""
TIMEOUT = 600


@pytest.fixture(scope="session")
def cpu_dir(tmp_path_factory):
    from verl_tor.local.prepare import prepare

    out = str(tmp_path_factory.mktemp("cpu"))
    prepare(out, seed=0, n_train=32, n_val=8)
    return out


def run(cpu_dir: str, recipe: str, experiment: str, *overrides: str, steps: int = 2, **env: str) -> LoopRun:
    result = run_cpu_recipe(
        recipe,
        list(overrides),
        cpu_dir=cpu_dir,
        experiment=experiment,
        env={"TOTAL_STEPS": str(steps), **env},
        timeout=TIMEOUT,
    )
    return result


def assert_ok(result: LoopRun, steps: int) -> None:
    assert result.returncode == 0, f"main_ppo failed (rc {result.returncode}):\n{result.tail(60)}"
    assert [s["step"] for s in result.steps] == list(range(1, steps + 1)), result.tail(20)


# Metrics that measure the machine, not the training: left out of run-to-run comparisons.
VOLATILE = ("timing_s/", "timing_per_token_ms/", "perf/", "actor/perf/", "global_seqlen/", "throughput")


def training_metrics(step: dict) -> dict:
    return {k: v for k, v in step.items() if not any(part in k for part in VOLATILE)}


@pytest.fixture(scope="session")
def demo(cpu_dir):
    """``verl-tor demo``'s run (``verl_tor.loop_demo``: ToR-GRPO, a token map every step), here 3 steps with
    validation (its generations dumped) and a checkpoint at step 2, and a learning rate large enough that one update
    visibly moves the policy. Returns (the demo's result, the progress lines it printed)."""
    from verl_tor.loop_demo import run_loop_demo

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


@SHARED_RUNS
def test_demo_reports_every_step_of_verls_trainer(demo):
    result, lines = demo
    assert_ok(result.run, 3)
    progress = [line for line in lines if line.startswith("[demo] step ")]
    assert [line.split()[2] for line in progress] == ["1/3", "2/3", "3/3"], lines
    for line in progress:
        for label in ("reward", "pg_loss", "T_r 0.30", "T_p 0.30", "noimg", "select", "step"):
            assert label in line, line
    assert [os.path.basename(m) for m in result.token_maps] == [f"step_{i:06d}.html" for i in (1, 2, 3)]


@SHARED_RUNS
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


@SHARED_RUNS
def test_training_token_maps_show_each_rollout_with_its_question_and_figure(tor_run):
    assert_ok(tor_run, 3)
    page = (Path(tor_run.out_dir) / "tor_token_maps" / "step_000001.html").read_text()
    assert page.count("data:image/png;base64,") >= 16  # the figure rebuilt from verl's pixel values, per rollout
    assert "Find its area." in page  # the question's text, read from verl's raw_prompt


@SHARED_RUNS
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


ONE_ROW = {"ROLLOUT_BATCH_SIZE": "1", "UPDATE_BATCH_SIZE": "1", "N_RESPONSES": "1", "MICRO_BATCH_SIZE": "1"}
# an entropy bonus gives the single trajectory a gradient whatever its advantage, so step 2 runs a moved policy
ONE_ROW_OVERRIDES = ("algorithm.adv_estimator=reinforce_plus_plus", "actor_rollout_ref.actor.entropy_coeff=0.01")


@pytest.fixture(scope="session")
def stock_run(cpu_dir):
    """Stock verl (``grpo.sh``, ``trainer_mode=sync``), one trajectory a step, 2 steps."""
    return run(cpu_dir, "grpo", "stock_sync", *ONE_ROW_OVERRIDES, LR="1e-3", **ONE_ROW)


@SHARED_RUNS
def test_tor_disabled_is_bit_identical_to_stock_sync(cpu_dir, stock_run):
    """``tor_sync`` with ``tor.enable=false`` and stock ``sync``, same seeds: the same metrics, bit for bit.

    One trajectory a step (one prompt, one rollout). With more,
    trajectories enter TransferQueue in the order their generations finish, which verl's agent loop does not fix
    (its tasks interleave with tokenisation in a thread pool), and the n identical requests of a prompt are told
    apart only by arrival: the batch's row order, hence the order of float sums, changes from run to run, stock or
    not, and metrics then agree to ~1e-7 relative, not bitwise. A single row also hits verl 0.9.1's M-RoPE
    equal-length bug, so both runs go through verl_tor's fix (``test_mrope_bug_...``)."""
    stock = stock_run
    off = run(cpu_dir, "grpo_tor", "tor_off", *ONE_ROW_OVERRIDES, "tor.enable=False", LR="1e-3", **ONE_ROW)
    assert_ok(stock, 2)
    assert_ok(off, 2)
    for a, b in zip(stock.steps, off.steps):
        ma, mb = training_metrics(a), training_metrics(b)
        assert not any(k.startswith("tor/") for k in mb)
        assert ma.keys() == mb.keys()
        different = {k: (ma[k], mb[k]) for k in ma if not (ma[k] == mb[k] or (_nan(ma[k]) and _nan(mb[k])))}
        assert not different, different
    assert all(s["actor/grad_norm"] > 0 for s in off.steps)


def _nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


@SHARED_RUNS
def test_bench_loop_summarises_a_stock_and_a_tor_run(stock_run, tor_run):
    """``benchmarks/bench_loop.py --stock-metrics --tor-metrics`` on this module's runs (its own two runs would cost
    CI minutes): the phase table with ToR's stage timings, and the whole-step ratio of the medians it prints."""
    import subprocess
    import sys

    assert_ok(stock_run, 2)
    assert_ok(tor_run, 3)
    proc = subprocess.run(
        [sys.executable, str(TESTS.parent / "benchmarks" / "bench_loop.py")]
        + ["--stock-metrics", os.path.join(stock_run.out_dir, "metrics.jsonl")]
        + ["--tor-metrics", os.path.join(tor_run.out_dir, "metrics.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert "# steps measured: stock 1, ToR 2" in proc.stdout
    stock_step = stock_run.steps[1]["timing_s/step"]
    tor_step = sorted(s["timing_s/step"] for s in tor_run.steps[1:])
    assert f"{stock_step:.3f}" in rows["step"]
    assert f"{(tor_step[0] + tor_step[1]) / 2:.3f}" in rows["step"]  # the median of ToR's two measured steps
    assert rows["tor_noimg"].split("|")[2].strip() == ""  # stock has no ToR stage ...
    assert rows["tor_noimg"].rstrip(" |").endswith("%")  # ... and ToR's share of its step is printed
    ratio = float(proc.stdout.split("whole step, ToR / stock (medians):")[1].split()[0])
    assert ratio == pytest.approx((tor_step[0] + tor_step[1]) / 2 / stock_step, abs=1e-3)


def test_mrope_bug_breaks_stock_sync_without_the_fix(cpu_dir):
    """verl 0.9.1 + equal-length trajectories: ``train_mini_batch`` fails in ``unbind`` unless verl_tor's fix is on
    (``VERL_TOR_SKIP_FIXES=mrope`` leaves the bug in place; the run above is the same with the fix)."""
    broken = run(
        cpu_dir,
        "grpo",
        "stock_sync_unfixed",
        steps=1,
        ROLLOUT_BATCH_SIZE="1",
        UPDATE_BATCH_SIZE="1",
        N_RESPONSES="1",
        MICRO_BATCH_SIZE="1",
        VERL_TOR_SKIP_FIXES="mrope",
    )
    assert broken.returncode != 0
    assert "split_with_sizes" in broken.tail(400), broken.tail(60)


def test_tor_loss_wrapper_with_dapo_settings_on_multi_turn_trajectories(cpu_dir):
    """``tor.apply=loss`` (the loss wrapper on the actor) with DAPO's clip-higher, dynamic sampling (filter_groups
    on acc) and overlong shaping, on two-turn trajectories (``tests/loop_agents.py``: answer, an observation
    masked out of the loss, answer): the stage keeps ``tor_weights`` at verl's row length (issue 11)."""
    result = run(
        cpu_dir,
        "dapo_tor",
        "dapo_loss_two_turn",
        "tor.apply=loss",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={TESTS / 'loop_agents.yaml'}",
        "actor_rollout_ref.rollout.agent.default_agent_loop=two_turn_agent",
        LR="1e-3",
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    )
    assert_ok(result, 2)
    for step in result.steps:
        assert step["tor/reasoning_frac"] == pytest.approx(0.3, abs=0.02)
    assert any(abs(s["actor/pg_loss"]) > 1e-6 for s in result.steps)
    assert all(s["actor/grad_norm"] > 0 for s in result.steps)


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


@SHARED_RUNS
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


@SHARED_RUNS
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


def test_tor_colocate_async_through_main_ppo(cpu_dir):
    """``trainer.v1.trainer_mode=tor_colocate_async``: verl's colocate_async trainer (one mini-batch a step, its
    replay buffer) with the ToR stage, through the real loop."""
    result = run(cpu_dir, "grpo_tor", "colocate", "trainer.v1.trainer_mode=tor_colocate_async", LR="1e-3")
    assert_ok(result, 2)
    for step in result.steps:
        assert step["tor/reasoning_frac"] == pytest.approx(0.3, abs=0.02)
        assert step["tor/sensitivity_mean/selected"] > step["tor/sensitivity_mean/rest"]
    assert any(abs(s["actor/pg_loss"]) > 1e-6 for s in result.steps)
