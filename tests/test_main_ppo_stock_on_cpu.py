"""verl's real trainer on CPU, continued: stock ``sync`` against ``tor_sync`` with ToR off (bit-identical), ToR-DAPO
with the loss wrapper on two-turn trajectories, and ``bench_loop.py``'s summary of a stock and a ToR run
(``tests/loop_support.py``; marked ``loop``)."""

from __future__ import annotations

import os

import pytest
from loop_support import ONE_ROW, ONE_ROW_OVERRIDES, TESTS, assert_ok, is_nan, run, training_metrics

pytestmark = pytest.mark.loop


@pytest.fixture(scope="session")
def stock_run(cpu_dir):
    """Stock verl (``grpo.sh``, ``trainer_mode=sync``), one trajectory a step, 2 steps."""
    return run(cpu_dir, "grpo", "stock_sync", *ONE_ROW_OVERRIDES, LR="1e-3", **ONE_ROW)


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
        different = {k: (ma[k], mb[k]) for k in ma if not (ma[k] == mb[k] or (is_nan(ma[k]) and is_nan(mb[k])))}
        assert not different, different
    assert all(s["actor/grad_norm"] > 0 for s in off.steps)


@pytest.fixture(scope="session")
def dapo_run(cpu_dir):
    """ToR-DAPO, 2 steps, ``tor.apply=loss``, on two-turn trajectories (``tests/loop_agents.py``)."""
    return run(
        cpu_dir,
        "dapo_tor",
        "dapo_loss_two_turn",
        "tor.apply=loss",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={TESTS / 'loop_agents.yaml'}",
        "actor_rollout_ref.rollout.agent.default_agent_loop=two_turn_agent",
        LR="1e-3",
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    )


def test_tor_loss_wrapper_with_dapo_settings_on_multi_turn_trajectories(dapo_run):
    """``tor.apply=loss`` (the loss wrapper on the actor) with DAPO's clip-higher, dynamic sampling (filter_groups
    on acc) and overlong shaping, on two-turn trajectories (``tests/loop_agents.py``: answer, an observation
    masked out of the loss, answer): the stage keeps ``tor_weights`` at verl's row length (issue 11)."""
    result = dapo_run
    assert_ok(result, 2)
    for step in result.steps:
        assert step["tor/reasoning_frac"] == pytest.approx(0.3, abs=0.02)
    assert any(abs(s["actor/pg_loss"]) > 1e-6 for s in result.steps)
    assert all(s["actor/grad_norm"] > 0 for s in result.steps)


def test_bench_loop_summarises_a_stock_and_a_tor_run(stock_run, dapo_run):
    """``benchmarks/bench_loop.py --stock-metrics --tor-metrics`` on this module's stock and ToR-DAPO runs (its own
    two runs would cost CI minutes): the phase table with ToR's stage timings, and the whole-step ratio of the
    medians it prints."""
    import subprocess
    import sys

    assert_ok(stock_run, 2)
    assert_ok(dapo_run, 2)
    proc = subprocess.run(
        [sys.executable, str(TESTS.parent / "benchmarks" / "bench_loop.py")]
        + ["--stock-metrics", os.path.join(stock_run.out_dir, "metrics.jsonl")]
        + ["--tor-metrics", os.path.join(dapo_run.out_dir, "metrics.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert "# steps measured: stock 1, ToR 1" in proc.stdout  # step 1 (warm-up) is left out
    stock_step, tor_step = stock_run.steps[1]["timing_s/step"], dapo_run.steps[1]["timing_s/step"]
    assert f"{stock_step:.3f}" in rows["step"] and f"{tor_step:.3f}" in rows["step"]
    assert rows["tor_noimg"].split("|")[2].strip() == ""  # stock has no ToR stage ...
    assert rows["tor_noimg"].rstrip(" |").endswith("%")  # ... and ToR's share of its step is printed
    ratio = float(proc.stdout.split("whole step, ToR / stock (medians):")[1].split()[0])
    assert ratio == pytest.approx(tor_step / stock_step, abs=1e-3)
