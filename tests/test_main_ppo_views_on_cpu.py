"""verl's real trainer on CPU with the other image views, and ToR-DAPO run twice (``tests/loop_support.py``; marked
``loop``): ``tor.image_view=blank`` in ToR-GRPO, ``tor.image_view=noise`` in two ToR-DAPO runs with the same seed.

The two DAPO runs check three things at the price of two 1-step runs: the noise view runs on verl's real rows (it
once crashed on a field only the test doubles had, issue 17.1), its draws follow each trajectory and not the order
generations finish in (issue 21.5), and dynamic sampling keeps the same groups in both runs (issue 17.8:
``verl_tor.local.sampling``). Each DAPO run filters some groups, refills and discards surplus ones; the batch it
trains on must not depend on which generation finished first.
"""

from __future__ import annotations

import pytest
from loop_support import assert_ok, run

from verl_tor import metrics as M

pytestmark = pytest.mark.loop


def assert_tor_step(step: dict) -> None:
    """A ToR step whose image-free pass scored rows and whose selection used it."""
    assert step[M.NOIMG_SCORED_FRAC] > 0, step
    assert step[M.VIEW_FALLBACK_FRAC] == 0
    assert step[M.REASONING_FRAC] == pytest.approx(0.3, abs=0.02)
    assert step[M.PERCEPTION_FRAC] == pytest.approx(0.3, abs=0.02)
    assert step["tor/sensitivity_mean/selected"] > step["tor/sensitivity_mean/rest"] > 0


def test_blank_view_through_main_ppo(cpu_dir):
    result = run(cpu_dir, "grpo_tor", "view_blank", "tor.image_view=blank", steps=1)
    assert_ok(result, 1)
    assert_tor_step(result.steps[0])


@pytest.fixture(scope="module")
def dapo_noise_runs(cpu_dir):
    return [run(cpu_dir, "dapo_tor", f"dapo_noise_{i}", "tor.image_view=noise", steps=1) for i in (1, 2)]


def test_noise_view_through_main_ppo(dapo_noise_runs):
    for result in dapo_noise_runs:
        assert_ok(result, 1)
        assert_tor_step(result.steps[0])


def test_tor_dapo_repeats(dapo_noise_runs):
    """Same seed, same step: the same groups kept, the same noise, the same loss. Each run must have discarded
    surplus groups (else this checks nothing DAPO-specific). Float tolerance: the rows reach the batch in the order
    their generations finish, and float sums over them may differ in the last bits. Without
    ``verl_tor.local.sampling``'s wrapper two such runs kept different groups (rewards 0.525 / 0.469)."""
    first, second = (result.steps[0] for result in dapo_noise_runs)
    for step in (first, second):
        assert step.get("training/filter_groups/discarded_surplus_samples", 0) > 0, step
    for key in ("critic/rewards/mean", "critic/score/mean", "actor/pg_loss", M.SENSITIVITY_THRESHOLD, M.WEIGHT_MEAN):
        assert second[key] == pytest.approx(first[key], rel=1e-5, abs=1e-7), key
