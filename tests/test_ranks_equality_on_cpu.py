"""The users' configuration gives ToR the same weights: one stored rollout batch, one ToR step, two engine set-ups.

(a) every loop test's set-up: one FSDP rank, padded sequences, fixed micro-batches of 2;
(b) the GPU recipes' batching: two FSDP2 ranks on gloo, packed sequences (``use_remove_padding=true``), gradient
    checkpointing, dynamic micro-batches under a 170-token budget (each rank runs micro-batches of 1, 2 and 3 rows).

Both run verl's real ``ActorRolloutRefWorker`` (``init_model``, ``compute_log_prob``, ``update_actor``) and verl's V1
trainer code with the ``tor_sync`` trainer and the production ``ToRStage`` (``tests/tor_ranks.py`` says what stands
in for Ray and TransferQueue). Compared on the same 8 trajectories: the old-policy log-probs, the full and the top-p
entropy, S_t, T_r, T_p, the weights and the weighted advantages, every ``tor/*`` metric, the policy loss and grad
norm of the update, and the updated policy's log-probs.

Tolerances (float32 on CPU; the two set-ups sum in different orders): log-probs, entropies and S_t within 1e-4;
T_r, T_p and the weights identical (counts exact); ``tor/*`` within 1e-6; the policy loss within 1e-6 and the grad
norm within 1e-5 relative; the updated log-probs within 1e-4 while the update moved them by more than 1e-2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("tor_ranks.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import tor_ranks
    finally:
        sys.path.remove(str(SCRIPT.parent))
    out = tmp_path_factory.mktemp("ranks")
    batch = str(out / "batch.pt")
    tor_ranks.build_batch(tiny_checkpoint, batch)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, world, shape in (("simple", 1, "simple"), ("gpu", 2, "gpu")):
        cmd = [sys.executable, str(SCRIPT), "--world-size", str(world), "--shape", shape]
        cmd += ["--checkpoint", tiny_checkpoint, "--batch", batch, "--out", str(out / f"{name}.pt")]
        log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed below
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (proc, log) in procs.items():
        rc = proc.wait(timeout=600)
        log.close()
        assert rc == 0, (name, (out / f"{name}.log").read_text()[-3000:])
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in procs}


def masked_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask).max())


@pytest.mark.slow
def test_two_packed_dynamic_ranks_give_the_same_tor_step(runs):
    a, b = runs["simple"], runs["gpu"]
    mask = a["response_mask"].bool()
    assert torch.equal(mask, b["response_mask"].bool())
    # (b) really ran the other shape: two ranks, micro-batches of unequal row counts within a pass
    assert len(a["micro_batches_per_rank"]) == 1 and len(b["micro_batches_per_rank"]) == 2
    assert {rows for rows, _ in a["micro_batches_per_rank"][0]} == {2}
    for rank_batches in b["micro_batches_per_rank"]:
        assert all(tokens <= 170 for _, tokens in rank_batches)
        assert len({rows for rows, _ in rank_batches}) > 1, rank_batches

    for name in ("old_log_probs", "full_entropy", "top_p_entropy"):
        assert masked_err(a[name], b[name], mask) < 1e-4, name
    assert (b["top_p_entropy"][mask] < b["full_entropy"][mask] - 1e-3).any()  # top-p really differs from full
    sa, sb = a["stage"], b["stage"]
    assert masked_err(sa["entropy"], sb["entropy"], mask) < 1e-4
    assert masked_err(sa["sensitivity"], sb["sensitivity"], mask) < 1e-4
    for name in ("reasoning", "perception"):  # T_r, T_p: the same tokens
        assert torch.equal(sa[name], sb[name]), name
        assert 0 < int(sa[name].sum()) < int(mask.sum()), name
    assert torch.equal(sa["weights"], sb["weights"])
    assert masked_err(a["advantages"], b["advantages"], mask) < 1e-6  # w_t * A_t (tor.apply=advantage)

    tor = {k for k in a["metrics"] if k.startswith("tor/")}
    assert tor == {k for k in b["metrics"] if k.startswith("tor/")} and "tor/reasoning_frac" in tor
    for key in sorted(tor):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=1e-6), key

    # the update: the same policy loss and gradient, hence the same updated policy
    assert a["metrics"]["actor/pg_loss"] == pytest.approx(b["metrics"]["actor/pg_loss"], abs=1e-6)
    assert a["metrics"]["actor/pg_loss"] != 0.0
    assert a["metrics"]["actor/grad_norm"] == pytest.approx(b["metrics"]["actor/grad_norm"], rel=1e-5)
    assert masked_err(a["new_log_probs"], b["new_log_probs"], mask) < 1e-4
    assert masked_err(a["new_log_probs"], a["old_log_probs"], mask) > 1e-2  # the update moved the policy
