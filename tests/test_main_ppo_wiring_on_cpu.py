"""How ToR is wired into verl's real trainer, checked through ``main_ppo`` on CPU (``tests/loop_support.py``; marked
``loop``): four runs of the default CPU batch (4 prompts x 4 rollouts a step, 2 steps, the GRPO recipe with its KL
loss, so a reference policy exists), compared with each other.

- ``stock``: verl's ``sync`` trainer with the verl_tor plugin *not loaded* (``VERL_USE_EXTERNAL_PLUGINS=none``; only
  the CPU platform and the ``hf`` rollout, through ``tests/local_backend_only.py``: verl has no CPU platform or
  CPU rollout of its own, so this is as close to stock as a CPU run gets; nothing of ``verl_tor.integration`` is
  imported in any of its processes);
- ``tor_off``: ``tor_sync`` with ``tor.enable=false`` and the plugin loaded (every hook installed);
- ``loss_old`` / ``loss_ref``: ToR with ``tor.apply=loss`` and a uniform weight w_t = 2 (ρ_r = 1: every token is a
  reasoning token, γ_r = γ_p = 2), the image-free view scored by the old policy / by the reference policy.

With a uniform weight the loss wrapper must double verl's policy loss and its gradient (at step 1, where the model
weights are stock's), whatever S_t says, so the two ToR runs train identically and differ only in what the image-free
pass measured: at step 1 the reference policy is the old policy (same S_t); at step 2 the actor has moved and the
reference has not.

Rows enter TransferQueue in the order their generations finish (``test_main_ppo_stock_on_cpu.py`` explains), so runs
with several trajectories a step agree within float32 summation rounding, not bit for bit.
"""

from __future__ import annotations

import os

import pytest
from loop_support import TESTS, assert_ok, is_nan, run, training_metrics

pytestmark = pytest.mark.loop

WEIGHT = 2.0
UNIFORM_WEIGHT = (
    "tor.apply=loss",
    "tor.entropy=full",  # verl then logs the same actor/entropy as stock (the recipe's top-p would replace it)
    "tor.reasoning_ratio=1.0",
    f"tor.reasoning_weight={WEIGHT}",
    f"tor.perception_weight={WEIGHT}",
)
LR = "1e-3"  # one update moves the actor far enough from the reference that the image-free pass sees it
REL = 1e-4  # float32 sums in arrival order, through one Adam update
ROUNDING = ("rollout_corr/", "training/rollout_")
"""Metrics of the rollout-vs-actor mismatch: on CPU float rounding only (~1e-8 to 1e-5, e.g. a sequence-level chi2 of
4e-7 in one run and 4e-6 in the other), compared with an absolute tolerance of 5e-5 (a real mismatch is ~1e-2)."""


@pytest.fixture(scope="session")
def plugin_free_stock(cpu_dir):
    """Stock ``sync`` with no verl_tor plugin in any process: verl's own ``VERL_USE_EXTERNAL_PLUGINS=none``, and the
    CPU backend alone loaded by ``VERL_USE_EXTERNAL_MODULES`` (the driver's plugin would export ``VERL_TOR_ROLLOUT``
    for the workers; set here instead)."""
    import ast

    # read, not imported: importing local_backend_only would install its import hook in this test process
    source = (TESTS / "local_backend_only.py").read_text()
    marker = next(
        ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "MARKER"
    )

    result = run(
        cpu_dir,
        "grpo",
        "wiring_stock_plugin_free",
        LR=LR,
        VERL_USE_EXTERNAL_PLUGINS="none",
        VERL_USE_EXTERNAL_MODULES="local_backend_only",
        VERL_TOR_ROLLOUT="hf",
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    )
    with open(result.log_path, encoding="utf-8", errors="replace") as f:
        markers = [line.split(marker, 1)[1].strip() for line in f if marker in line]
    return result, markers


@pytest.fixture(scope="session")
def tor_off(cpu_dir):
    return run(cpu_dir, "grpo_tor", "wiring_tor_off", "tor.enable=False", LR=LR)


@pytest.fixture(scope="session")
def loss_old(cpu_dir):
    return run(cpu_dir, "grpo_tor", "wiring_loss_old", *UNIFORM_WEIGHT, "tor.scorer_policy=old", LR=LR)


@pytest.fixture(scope="session")
def loss_ref(cpu_dir):
    return run(cpu_dir, "grpo_tor", "wiring_loss_ref", *UNIFORM_WEIGHT, "tor.scorer_policy=ref", LR=LR)


def assert_metrics_close(a: dict, b: dict, rel: float = REL, skip=lambda key: False) -> None:
    """Every metric of ``a`` equal to ``b``'s within ``rel`` (NaN = NaN), same keys; ``skip`` leaves keys out."""
    a = {k: v for k, v in training_metrics(a).items() if not skip(k)}
    b = {k: v for k, v in training_metrics(b).items() if not skip(k)}
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    different = {
        k: (a[k], b[k])
        for k in a
        if not (is_nan(a[k]) and is_nan(b[k]))
        and a[k] != pytest.approx(b[k], rel=rel, abs=5e-5 if k.startswith(ROUNDING) else 1e-6)
    }
    assert not different, different


def test_tor_disabled_equals_stock_without_the_plugin_several_trajectories_a_step(plugin_free_stock, tor_off):
    """``tor_sync`` + ``tor.enable=false`` with every verl_tor hook installed = stock verl with none of them, over 16
    trajectories a step: a hook that misbehaves while ToR is off (the validate_config wrapper, the engine hook, the
    trainer's overrides, the fixes) shows here."""
    stock, markers = plugin_free_stock
    assert_ok(stock, 2)
    assert_ok(tor_off, 2)
    # the stock arm really ran without the plugin: the driver's trainer and the actor worker's engine said so
    assert any(m.startswith("trainer:") for m in markers) and any(m.startswith("engine:") for m in markers), markers
    assert all("verl_tor plugin loaded: False" in m for m in markers), markers  # Ray may append "[repeated ...]"
    for a, b in zip(stock.steps, tor_off.steps):
        assert not any(k.startswith("tor/") for k in b)
        assert_metrics_close(a, b)
    assert all(s["actor/grad_norm"] > 0 for s in tor_off.steps)
    assert stock.steps[1]["actor/kl_loss"] > 1e-3  # step 2 trained a moved policy: the update is compared too


def test_apply_loss_weights_reach_the_actors_policy_loss(plugin_free_stock, loss_old):
    """``tor.apply=loss`` installs the loss wrapper on the actor workers (``_install_tor_loss`` -> ``set_loss_fn``):
    with w_t = 2 on every token, step 1's policy loss and its gradient norm are twice stock verl's on the same
    samples (before any update both runs hold the same weights), and everything else of the step is stock's (the
    advantages stay unweighted, the KL term unweighted and 0 at step 1). Without the wrapper they would be equal."""
    stock, _ = plugin_free_stock
    assert_ok(stock, 2)
    assert_ok(loss_old, 2)
    a, b = stock.steps[0], loss_old.steps[0]
    assert abs(a["actor/pg_loss"]) > 1e-3 and a["actor/grad_norm"] > 1e-3, a  # a real policy gradient to scale
    assert b["actor/pg_loss"] == pytest.approx(WEIGHT * a["actor/pg_loss"], rel=REL)
    assert b["actor/grad_norm"] == pytest.approx(WEIGHT * a["actor/grad_norm"], rel=REL)
    assert b["tor/weight_mean"] == pytest.approx(WEIGHT)
    scaled = {"actor/pg_loss", "actor/grad_norm", "actor/loss"}
    assert_metrics_close(a, b, skip=lambda k: k in scaled or k.startswith("tor/"))


def test_scorer_policy_ref_scores_the_image_free_view_with_the_reference(loss_old, loss_ref):
    """``tor.scorer_policy=ref`` through ``main_ppo``: the image-free pass is scored by the frozen reference policy.
    Both runs train identically (uniform weights: S_t cannot change a weight). At step 1 the reference is the old
    policy, so S_t and its statistics agree; at step 2 the actor has taken one update and the reference has not, so
    they differ, and everything that does not depend on the image-free pass still agrees."""
    assert_ok(loss_old, 2)
    assert_ok(loss_ref, 2)
    sensitivity = ("tor/sensitivity_threshold", "tor/sensitivity_mean/selected", "tor/sensitivity_mean/rest")
    for step in loss_old.steps + loss_ref.steps:
        assert step["tor/noimg_scored_frac"] == 1.0  # every row's image-free view was scored
    assert_metrics_close(loss_old.steps[0], loss_ref.steps[0])
    assert loss_ref.steps[1]["actor/kl_loss"] > 1e-3  # the actor has moved away from the reference
    old, ref = loss_old.steps[1], loss_ref.steps[1]
    assert_metrics_close(old, ref, skip=lambda k: k in sensitivity or k.startswith("tor/perception"))
    moved = {k: (old[k], ref[k]) for k in sensitivity if old[k] != pytest.approx(ref[k], rel=100 * REL)}
    assert "tor/sensitivity_mean/rest" in moved or "tor/sensitivity_mean/selected" in moved, moved
