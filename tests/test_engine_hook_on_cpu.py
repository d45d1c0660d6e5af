"""tor.entropy=top_p: the hook on verl's real FSDPEngineWithLMHead.prepare_model_outputs, on its packed path and its
non-packed path (unit calls with hand-made logits, and end to end through forward_step on a tiny Qwen2.5-VL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

ROOT = Path(__file__).resolve().parents[1]


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


def call(engine, logits, lengths, temperature=1.0, responses=None, **flags):
    """verl's packed branch (use_remove_padding=true): (1, total, V) logits; verl divides them by ``temperature``
    before any entropy is computed."""
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(0)  # the same token ids on every call
    ids = [torch.randint(0, logits.shape[-1], (n,), generator=g) for n in lengths]
    input_ids = torch.nested.as_nested_tensor(ids, layout=torch.jagged)
    fields = {"input_ids": input_ids} if responses is None else {"input_ids": input_ids, "responses": responses}
    micro_batch = TensorDict(fields, batch_size=len(lengths))
    tu.assign_non_tensor(micro_batch, use_remove_padding=True, calculate_entropy=True, **flags)
    total = sum(lengths)
    output_args = {
        "input_ids_rmpad_rolled": torch.roll(input_ids.values(), -1),
        "temperature_rmpad": torch.full((total,), float(temperature)),
        "pad_size": 0,
        "temperature_is_one": temperature == 1.0,
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


@pytest.fixture
def top_p_calls(monkeypatch):
    """The hook reinstalled around a recording ``verl_tor.ops.compute_top_p_entropy_from_logits`` (it binds the op
    when installed); verl's hook as the plugin installed it again afterwards."""
    import verl_tor.ops
    from verl_tor.integration.engine import install_top_p_entropy_hook, uninstall_top_p_entropy_hook

    op, calls = verl_tor.ops.compute_top_p_entropy_from_logits, []

    def recording(logits, top_p, **kwargs):
        calls.append(kwargs)
        return op(logits, top_p, **kwargs)

    import verl_tor.integration.engine as engine_module

    uninstall_top_p_entropy_hook()
    monkeypatch.setattr(verl_tor.ops, "compute_top_p_entropy_from_logits", recording)
    monkeypatch.setattr(engine_module, "compute_top_p_entropy_from_logits", recording)  # the hook's module binding
    install_top_p_entropy_hook()
    try:
        yield calls
    finally:
        uninstall_top_p_entropy_hook()
        monkeypatch.undo()
        install_top_p_entropy_hook()


def test_chunked_entropy_branch_gets_the_top_p_entropy_at_the_rollout_temperature(engine, top_p_calls):
    """``entropy_from_logits_with_chunking=true``: verl calls ``compute_entropy_from_logits(logits, chunk_size=...)``
    on logits already divided by the temperature; the hook's stand-in passes the chunk size on to the op and returns
    the top-p entropy of those logits (T = 0.7 here: the entropy of logits / T, not of the raw logits)."""
    from verl.utils import torch_functional as verl_F

    from verl_tor.ops import compute_top_p_entropy_from_logits

    engine.engine_config = types.SimpleNamespace(
        entropy_checkpointing=False, entropy_from_logits_with_chunking=True, entropy_from_logits_chunk_size=3
    )
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits_with_chunking  # what verl's engine sets then
    torch.manual_seed(3)
    lengths, temperature = [5, 4], 0.7
    logits = torch.randn(1, 9, 50) * 3
    full, lp_full = call(engine, logits, lengths, temperature=temperature)
    top_p, lp_top_p = call(engine, logits, lengths, temperature=temperature, tor_entropy_top_p=0.8)
    assert top_p_calls == [{"chunk_size": 3}]  # verl's chunk size reached the op
    scaled = logits[0] / temperature
    torch.testing.assert_close(full, verl_F.entropy_from_logits(scaled))
    torch.testing.assert_close(top_p, compute_top_p_entropy_from_logits(scaled, 0.8))
    assert (top_p - compute_top_p_entropy_from_logits(logits[0], 0.8)).abs().max() > 1e-2  # T matters here
    assert (top_p < full - 1e-3).any()
    torch.testing.assert_close(lp_full, lp_top_p)
    assert engine.compute_entropy_from_logits is verl_F.entropy_from_logits_with_chunking  # restored


def test_hook_is_idempotent_and_revertible():
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from verl_tor.integration.engine import install_top_p_entropy_hook, uninstall_top_p_entropy_hook

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


def call_non_packed(engine, logits, lengths, responses=None, **flags):
    """verl's non-packed branch (use_remove_padding=false): padded (B, T, V) logits, as forward_step passes them."""
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, logits.shape[-1], (n,), generator=g) for n in lengths]
    input_ids = torch.nested.as_nested_tensor(ids, layout=torch.jagged)
    fields = {"input_ids": input_ids} if responses is None else {"input_ids": input_ids, "responses": responses}
    micro_batch = TensorDict(fields, batch_size=len(lengths))
    tu.assign_non_tensor(micro_batch, use_remove_padding=False, calculate_entropy=True, **flags)
    output_args = {
        "input_ids_rmpad_rolled": torch.roll(input_ids.values(), -1),
        "temperature": torch.ones(len(lengths)),
        "temperature_is_one": True,
    }
    out = engine.prepare_model_outputs(types.SimpleNamespace(logits=logits), output_args, micro_batch, None)
    return out["entropy"].values(), out["log_probs"].values()


def test_flag_switches_the_non_packed_path_too_and_nothing_else(engine):
    import verl.utils.torch_functional as torch_functional
    import verl.workers.engine.fsdp.transformer_impl as impl
    from verl.utils import torch_functional as verl_F

    from verl_tor.ops import compute_entropy_from_logits, compute_top_p_entropy_from_logits

    torch.manual_seed(2)
    lengths = [5, 3]
    logits = torch.randn(2, 5, 50) * 4  # (B, T, V), row 1 padded after 3 tokens
    full, lp_full = call_non_packed(engine, logits, lengths)
    top_p, lp_top_p = call_non_packed(engine, logits, lengths, tor_entropy_top_p=0.8)
    rows = torch.cat([logits[0, :5], logits[1, :3]])  # the valid positions, in verl's packed order
    torch.testing.assert_close(full, compute_entropy_from_logits(rows))
    torch.testing.assert_close(top_p, compute_top_p_entropy_from_logits(rows, 0.8))
    assert (top_p < full - 1e-3).any()  # the flag really changed what verl computed
    torch.testing.assert_close(lp_full, lp_top_p)  # log-probs untouched
    # restored: transformer_impl's alias is the module again, the module's own function was never replaced
    assert impl.verl_F is torch_functional and torch_functional.entropy_from_logits is verl_F.entropy_from_logits
    assert engine.compute_entropy_from_logits is verl_F.entropy_from_logits
    torch.testing.assert_close(call_non_packed(engine, logits, lengths)[0], full)


def test_hook_restores_verl_after_an_error_and_refuses_fused_kernels(engine):
    import verl.utils.torch_functional as torch_functional
    import verl.workers.engine.fsdp.transformer_impl as impl

    logits = torch.randn(1, 4, 30)
    with pytest.raises(NotImplementedError, match="pad_mode"):  # verl raises after computing the entropy
        call_non_packed(engine, logits, [4], tor_entropy_top_p=0.9, pad_mode="left_right")
    assert impl.verl_F is torch_functional
    assert engine.compute_entropy_from_logits is torch_functional.entropy_from_logits
    with pytest.raises(ValueError, match=r"use_fused_kernels=true.*Fix: set actor_rollout_ref.model.use_fused"):
        call_non_packed(engine, logits, [4], tor_entropy_top_p=0.9, use_fused_kernels=True)
    assert impl.verl_F is torch_functional


# ---------------------------------------------------------------------------------------------- response rows only
def with_responses(lengths, response_lengths, vocab):
    """The fields verl's old-log-prob micro-batch carries for the response-only path: nested responses."""
    g = torch.Generator().manual_seed(1)
    return torch.nested.as_nested_tensor(
        [torch.randint(0, vocab, (r,), generator=g) for r in response_lengths], layout=torch.jagged
    )


def response_positions(lengths, response_lengths, stride=None):
    """verl's no_padding_2_padding: sequence b's logits at L_b - R_b - 1 .. L_b - 2 predict its response."""
    rows, start = [], 0
    for b, (n, r) in enumerate(zip(lengths, response_lengths)):
        base = b * stride if stride else start
        rows += list(range(base + n - r - 1, base + n - 1))
        start += n
    return torch.tensor(rows)


def test_response_only_top_p_entropy_packed_and_padded_shapes():
    from verl_tor.integration.engine import compute_response_top_p_entropy
    from verl_tor.ops import compute_top_p_entropy_from_logits

    lengths, response_lengths = [7, 4, 9], [3, 1, 5]
    g = torch.Generator().manual_seed(3)
    packed = torch.randn(sum(lengths) + 2, 60, generator=g) * 3  # + 2 rows of packing pad
    full = compute_top_p_entropy_from_logits(packed, 0.9)
    got = compute_response_top_p_entropy(packed, 0.9, torch.tensor(lengths), torch.tensor(response_lengths))
    rows = response_positions(lengths, response_lengths)
    assert got.shape == full.shape and torch.equal(got[rows], full[rows])  # identical, bit for bit
    rest = torch.ones(len(full), dtype=torch.bool)
    rest[rows] = False
    assert (got[rest] == 0).all() and int(rest.sum()) == len(full) - sum(response_lengths)
    padded = torch.randn(3, 9, 60, generator=g) * 3  # (B, T, V), sequence b in [b, :L_b]
    full = compute_top_p_entropy_from_logits(padded, 0.9).reshape(-1)
    got = compute_response_top_p_entropy(padded, 0.9, torch.tensor(lengths), torch.tensor(response_lengths))
    rows = response_positions(lengths, response_lengths, stride=9)
    assert got.shape == (3, 9) and torch.equal(got.reshape(-1)[rows], full[rows])
    assert int((got.reshape(-1) != 0).sum()) <= sum(response_lengths)


@pytest.mark.parametrize("packed", [True, False])
def test_hook_computes_top_p_only_at_response_positions(engine, monkeypatch, packed):
    """Through verl's prepare_model_outputs on both branches: with ``responses`` in the micro-batch the hook computes
    the top-p entropy for the response-predicting rows only, with the same values there as without them."""
    import verl_tor.integration.engine as hook_module

    lengths, response_lengths = [6, 4], [2, 3]
    torch.manual_seed(4)
    logits = torch.randn(1, 10, 50) * 4 if packed else torch.randn(2, 6, 50) * 4
    caller = call if packed else call_non_packed
    seen = []
    real = hook_module.compute_top_p_entropy_from_logits

    def counting(rows, *args, **kwargs):
        seen.append(rows.numel() // rows.shape[-1])
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(hook_module, "compute_top_p_entropy_from_logits", counting)
    every, lp_every = caller(engine, logits, lengths, tor_entropy_top_p=0.8)
    assert seen == [10 if packed else 12]  # no responses in the micro-batch: every position (and pad), as before
    seen.clear()
    responses = with_responses(lengths, response_lengths, 50)
    only, lp_only = caller(engine, logits, lengths, tor_entropy_top_p=0.8, responses=responses)
    assert seen == [sum(response_lengths)]  # 5 of 10 rows
    rows = response_positions(lengths, response_lengths)  # in verl's packed order on both branches
    assert torch.equal(only[rows], every[rows]) and (every[rows] > 0).any()
    torch.testing.assert_close(lp_only, lp_every)


FORWARD_STEP = textwrap.dedent(
    """
    import json, tempfile, torch
    import verl
    import verl.utils.torch_functional as torch_functional
    import verl.workers.engine.fsdp.transformer_impl as impl
    from transformers import AutoModelForImageTextToText
    from verl.utils import hf_processor
    from verl_tor import tiny
    from verl_tor.stage import rows_to_tensordict
    from verl_tor.tools.in_process import (EngineLogProbScorer, InMemoryKV, build_verl_row, compute_sequence_log_probs,
                                  setup_cpu_engine)

    ckpt = tempfile.mkdtemp()
    tiny.save_tiny_checkpoint(ckpt)
    proc = hf_processor(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()

    from verl_tor.tools.demo import encode_prompt

    def prompt(question, image):
        return encode_prompt(proc, {"question": question, "image": image})["input_ids"][0]

    problem = tiny.make_geometry_problem(0)
    rows = [build_verl_row(proc, prompt(problem["question"], problem["image"]), torch.arange(6) + 40,
                           [problem["image"]]),
            build_verl_row(proc, prompt("What is two plus two?", None), torch.tensor([40, 41, 42]), None)]
    keys = ["a", "b"]
    # independent reference first: the model's own forward (before verl patches the classes), response positions
    cases = [(None, 1.0), (0.7, 1.0), (None, 0.7), (0.7, 0.7)]  # (entropy top-p, rollout temperature)
    want = {}
    for top_p, t in cases:
        parts = [compute_sequence_log_probs(model, r, temperature=t, with_entropy=True, entropy_top_p=top_p)
                 for r in rows]
        want[top_p, t] = [torch.cat([p[k][-len(r["responses"]) - 1:-1] for p, r in zip(parts, rows)]) for k in (0, 1)]

    store = InMemoryKV()
    store.kv_batch_put(keys, "train", fields=rows_to_tensordict(rows))
    engine = setup_cpu_engine(model)
    scorer = EngineLogProbScorer(store, engine)
    got = {}
    for top_p, t in cases:
        scorer.compute_old_log_prob(keys, temperature=t, entropy_top_p=top_p)
        out = store.kv_batch_get(keys, "train", ["old_log_probs", "entropy"])
        got[top_p, t] = [out["old_log_probs"].values(), out["entropy"].values()]
    err = lambda a, b: float((a - b).abs().max())
    print(json.dumps({
        "log_prob_err": max(err(got[c][0], want[c][0]) for c in got),
        "entropy_err": {f"{p}@{t}": err(got[p, t][1], want[p, t][1]) for p, t in got},
        "temperature_moves_top_p_entropy": err(got[0.7, 0.7][1], got[0.7, 1.0][1]),
        "top_p_below_full": int((got[0.7, 1.0][1] < got[None, 1.0][1] - 1e-3).sum()),
        "tokens": int(got[0.7, 1.0][1].numel()),
        "flag_reached_verl": [c.get("tor_entropy_top_p") for c in scorer.calls],
        "temperatures": [c.get("temperature") for c in scorer.calls],
        "restored": impl.verl_F is torch_functional
        and engine.compute_entropy_from_logits is torch_functional.entropy_from_logits,
    }))
    """
)


def test_top_p_entropy_through_verl_forward_step_non_packed():
    """The old-policy pass through verl's real forward_step (use_remove_padding=false, as on CPU): with the trainer's
    flag the entropy verl writes back is the top-p one, equal to an independent computation from the model's own
    forward; without it, verl's full entropy; at the rollout temperature 1.0 and 0.7 (logits / T). verl's model
    patch is process-wide: a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", FORWARD_STEP],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["log_prob_err"] < 1e-4, result
    assert max(result["entropy_err"].values()) < 1e-4 and len(result["entropy_err"]) == 4, result
    assert result["temperature_moves_top_p_entropy"] > 1e-2, result  # T = 0.7 is not T = 1 here
    assert result["top_p_below_full"] > result["tokens"] // 2, result  # top-p, not the full entropy
    assert result["flag_reached_verl"] == [None, 0.7, None, 0.7] and result["restored"], result
    assert result["temperatures"] == [1.0, 1.0, 0.7, 0.7], result


def test_config_accepts_top_p_with_either_padding_path():
    """Both engine paths compute the top-p entropy now, so the config check no longer refuses remove padding off."""
    from hydra import compose, initialize_config_dir

    from verl_tor.config import ToRConfigError
    from verl_tor.integration.trainer import validate_tor_config

    with initialize_config_dir(config_dir=str(ROOT / "verl_tor" / "recipes" / "config"), version_base=None):
        for remove_padding in ("true", "false"):
            cfg = compose(
                "tor_trainer",
                overrides=[
                    "algorithm.adv_estimator=grpo",
                    "tor.enable=true",
                    "tor.entropy=top_p",
                    f"actor_rollout_ref.model.use_remove_padding={remove_padding}",
                ],
            )
            assert validate_tor_config(cfg, use_reference_policy=True).entropy == "top_p"
        cfg = compose(
            "tor_trainer",
            overrides=[
                "algorithm.adv_estimator=grpo",
                "tor.enable=true",
                "tor.entropy=top_p",
                "actor_rollout_ref.model.use_fused_kernels=true",
            ],
        )
        with pytest.raises(ToRConfigError, match="use_fused_kernels"):
            validate_tor_config(cfg, use_reference_policy=True)


def test_trainer_sets_the_flag_only_around_the_old_log_prob_pass(monkeypatch):
    """ToRTrainerSync._compute_old_log_prob adds tor_entropy_top_p for verl's call and removes it afterwards."""
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from verl_tor.integration.trainer import build_trainer_class
    from verl_tor.tools.in_process import KVMeta

    seen = {}

    def fake_super(self, batch, metrics):
        seen.update(batch.extra_info)
        return batch

    monkeypatch.setattr(PPOTrainerSync, "_compute_old_log_prob", fake_super)
    cls = build_trainer_class()
    trainer = cls.__new__(cls)
    from verl_tor.config import ToRConfig

    trainer.tor_config = ToRConfig(enable=True, entropy="top_p", entropy_top_p=0.9)
    meta = KVMeta(keys=["a"], extra_info={"temperature": 0.7})
    trainer._compute_old_log_prob(meta, {})
    assert seen["tor_entropy_top_p"] == 0.9 and seen["temperature"] == 0.7  # verl's rollout temperature untouched
    assert "tor_entropy_top_p" not in meta.extra_info
    trainer.tor_config = ToRConfig(enable=True)
    seen.clear()
    trainer._compute_old_log_prob(meta, {})
    assert "tor_entropy_top_p" not in seen
