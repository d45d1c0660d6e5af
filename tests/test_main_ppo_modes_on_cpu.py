"""verl's real trainer on CPU, continued: the ``tor_colocate_async`` trainer mode, and verl 0.9.1's equal-length
M-RoPE bug reproduced in stock ``sync`` without verl_tor's fix (``tests/loop_support.py``; marked ``loop``)."""

from __future__ import annotations

import pytest
from loop_support import assert_ok, run

pytestmark = pytest.mark.loop


def test_tor_colocate_async_through_main_ppo(cpu_dir):
    """``trainer.v1.trainer_mode=tor_colocate_async``: verl's colocate_async trainer (one mini-batch a step, its
    replay buffer) with the ToR stage, through the real loop."""
    result = run(cpu_dir, "grpo_tor", "colocate", "trainer.v1.trainer_mode=tor_colocate_async", LR="1e-3")
    assert_ok(result, 2)
    for step in result.steps:
        assert step["tor/reasoning_frac"] == pytest.approx(0.3, abs=0.02)
        assert step["tor/sensitivity_mean/selected"] > step["tor/sensitivity_mean/rest"]
    assert any(abs(s["actor/pg_loss"]) > 1e-6 for s in result.steps)


def test_mrope_bug_breaks_stock_sync_without_the_fix(cpu_dir):
    """verl 0.9.1 + equal-length trajectories: ``train_mini_batch`` fails in ``unbind`` unless verl_tor's fix is on
    (``VERL_TOR_SKIP_FIXES=mrope`` leaves the bug in place; ``stock_run`` in ``test_main_ppo_stock_on_cpu.py`` is the
    same run with the fix)."""
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
