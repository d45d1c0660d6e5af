"""tor.entropy=top_p: the hook on verl's real FSDPEngineWithLMHead.prepare_model_outputs (packed path)."""

from __future__ import annotations

import types

import pytest
import torch
from tensordict import TensorDict


@pytest.fixture
def engine():
    import verl  # noqa: F401  - loads the plugin, which installs the hook
    from verl.utils import torch_functional as verl_F
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    assert FSDPEngineWithLMHead.prepare_model_outputs.__verl_tor__
    # Only the attributes prepare_model_outputs reads on the packed path; the method itself is verl's.
    obj = FSDPEngineWithLMHead.__new__(FSDPEngineWithLMHead)
    obj.engine_config = types.SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    obj.use_ulysses_sp = False
    obj.compute_entropy_from_logits = verl_F.entropy_from_logits
    return obj


def call(engine, logits, lengths, **flags):
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(0)  # the same token ids on every call
    ids = [torch.randint(0, logits.shape[-1], (n,), generator=g) for n in lengths]
    input_ids = torch.nested.as_nested_tensor(ids, layout=torch.jagged)
    micro_batch = TensorDict({"input_ids": input_ids}, batch_size=len(lengths))
    tu.assign_non_tensor(micro_batch, use_remove_padding=True, calculate_entropy=True, **flags)
    total = sum(lengths)
    output_args = {
        "input_ids_rmpad_rolled": torch.roll(input_ids.values(), -1),
        "temperature_rmpad": torch.ones(total),
        "pad_size": 0,
        "temperature_is_one": True,
    }
    out = engine.prepare_model_outputs(types.SimpleNamespace(logits=logits), output_args, micro_batch, None)
    return out["entropy"].values(), out["log_probs"].values()


def test_flag_switches_entropy_to_top_p_for_that_call_only(engine):
    from verl.utils import torch_functional as verl_F

    from verl_tor.ops import compute_entropy_from_logits, compute_top_p_entropy_from_logits

    torch.manual_seed(0)
    lengths = [5, 3]
    logits = torch.randn(1, 8, 50) * 4
    full, lp_full = call(engine, logits, lengths)
    top_p, lp_top_p = call(engine, logits, lengths, tor_entropy_top_p=0.8)
    torch.testing.assert_close(full, compute_entropy_from_logits(logits[0]))
    torch.testing.assert_close(top_p, compute_top_p_entropy_from_logits(logits[0], 0.8))
    assert (top_p < full - 1e-3).any()  # the flag really changed what verl computed
    torch.testing.assert_close(lp_full, lp_top_p)  # log-probs untouched
    assert engine.compute_entropy_from_logits is verl_F.entropy_from_logits  # restored after the call
    again, _ = call(engine, logits, lengths)
    torch.testing.assert_close(again, full)


def test_hook_is_idempotent_and_revertible():
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from verl_tor.engine import install_top_p_entropy_hook, uninstall_top_p_entropy_hook

    wrapped = FSDPEngineWithLMHead.prepare_model_outputs
    assert install_top_p_entropy_hook() is False  # already installed by the plugin
    uninstall_top_p_entropy_hook()
    try:
        assert not getattr(FSDPEngineWithLMHead.prepare_model_outputs, "__verl_tor__", False)
    finally:
        assert install_top_p_entropy_hook() is True
    assert FSDPEngineWithLMHead.prepare_model_outputs.__wrapped_original__ is wrapped.__wrapped_original__


def test_top_p_one_equals_full(engine):
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 40)
    full, _ = call(engine, logits, [6])
    top1, _ = call(engine, logits, [6], tor_entropy_top_p=1.0)
    torch.testing.assert_close(full, top1, rtol=1e-5, atol=1e-5)


def test_trainer_sets_the_flag_only_around_the_old_log_prob_pass(monkeypatch):
    """ToRTrainerSync._compute_old_log_prob adds tor_entropy_top_p for verl's call and removes it afterwards."""
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from verl_tor.testing import KVMeta
    from verl_tor.trainer import build_trainer_class

    seen = {}

    def fake_super(self, batch, metrics):
        seen.update(batch.extra_info)
        return batch

    monkeypatch.setattr(PPOTrainerSync, "_compute_old_log_prob", fake_super)
    cls = build_trainer_class()
    trainer = cls.__new__(cls)
    from verl_tor.config import ToRConfig

    trainer.tor_config = ToRConfig(enable=True, entropy="top_p", entropy_top_p=0.9)
    meta = KVMeta(keys=["a"], extra_info={"temperature": 1.0})
    trainer._compute_old_log_prob(meta, {})
    assert seen["tor_entropy_top_p"] == 0.9
    assert "tor_entropy_top_p" not in meta.extra_info
    trainer.tor_config = ToRConfig(enable=True)
    seen.clear()
    trainer._compute_old_log_prob(meta, {})
    assert "tor_entropy_top_p" not in seen
