"""In-process doubles of verl's distributed seams, for CPU tests and the CPU demo.

- ``InMemoryKV``: TransferQueue's ``kv_batch_get / kv_batch_put / kv_clear`` over a dict, returning the same
  layout verl's V1 trainer reads (tensors jagged along their first dimension, python objects as
  ``NonTensorStack``), so verl's own ``_compute_advantage`` and the ToR stage run on it unchanged.
- ``LocalLogProbScorer``: a worker group's ``compute_log_prob(meta)``: reads the meta's rows from the store, runs a
  real Hugging Face forward of the model in this process (no grad) and writes ``log_probs`` (and ``entropy``) back
  per sequence position, in verl's convention (position s holds the quantity of token s+1).

Neither is a mock of ToR's own logic: they replace Ray and TransferQueue only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDict

from verl_tor.integration.engine import TOP_P_FLAG
from verl_tor.ops import compute_entropy_from_logits, compute_top_p_entropy_from_logits
from verl_tor.stage import rows_to_tensordict, tensordict_to_rows

__all__ = [
    "InMemoryKV",
    "KVMeta",
    "LocalLogProbScorer",
    "EngineLogProbScorer",
    "build_actor_config",
    "build_cpu_engine",
    "setup_cpu_engine",
    "patch_engine_device_helpers",
    "build_verl_row",
    "compute_sequence_log_probs",
]


@dataclass
class KVMeta:
    """Stand-in for ``transfer_queue.KVBatchMeta`` with the attributes verl and the stage read."""

    keys: list[str]
    tags: list[dict] = field(default_factory=list)
    partition_id: str | None = None
    fields: list[str] | None = None
    extra_info: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.tags:
            self.tags = [{} for _ in self.keys]

    def __len__(self) -> int:
        return len(self.keys)


class InMemoryKV:
    """A TransferQueue double: ``partition -> key -> field -> value``."""

    def __init__(self):
        self.data: dict[str, dict[str, dict[str, Any]]] = {}
        self.gets: list[tuple[str, tuple[str, ...] | None]] = []
        """(partition_id, select_fields) of every ``kv_batch_get``, to check what a caller pulls."""

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        part = self.data.setdefault(partition_id, {})
        rows = tensordict_to_rows(fields) if fields is not None else [{} for _ in keys]
        if len(rows) != len(keys):
            raise ValueError(f"{len(rows)} rows for {len(keys)} keys")
        for key, row in zip(keys, rows):
            part.setdefault(key, {}).update(row)
        return KVMeta(keys=list(keys), tags=list(tags or [{} for _ in keys]), partition_id=partition_id)

    def kv_batch_get(self, keys, partition_id, select_fields=None) -> TensorDict:
        if isinstance(keys, str):
            keys = [keys]
        self.gets.append((partition_id, None if select_fields is None else tuple(select_fields)))
        part = self.data.get(partition_id, {})
        missing = [k for k in keys if k not in part]
        if missing:
            raise ValueError(f"keys not found in partition {partition_id!r}: {missing[:3]}")
        names = list(part[keys[0]].keys()) if select_fields is None else list(select_fields)
        # TransferQueue returns only the fields every requested sample has, silently (verl asks for optional
        # ones such as "values"); tests/test_stage_on_cpu.py checks this double against the real one.
        names = [n for n in names if all(n in part[k] for k in keys)]
        if not names:
            return TensorDict({}, batch_size=len(keys))
        return rows_to_tensordict([{n: part[k][n] for n in names} for k in keys])

    def kv_clear(self, keys, partition_id) -> None:
        part = self.data.get(partition_id, {})
        for key in [keys] if isinstance(keys, str) else keys:
            part.pop(key, None)
        if not part:
            self.data.pop(partition_id, None)


def compute_sequence_log_probs(
    model: torch.nn.Module,
    row: dict,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_top_p: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position log-prob of the next token of one trajectory, as verl's engine returns it.

    Args:
        row: ``input_ids`` (L,), ``position_ids`` (4, L) [text; t; h; w] or (L,), ``multi_modal_inputs`` dict.
        entropy_top_p: with ``with_entropy``, the entropy of the top-p truncated distribution instead of the full
            one (what the engine hook gives the old-policy pass for ``tor.entropy=top_p``).
    Returns:
        log_probs: (L,) float32 on the CPU; entry s = log π(input_ids[s+1] | input_ids[:s+1]) (last entry: the
            roll's wrap-around, ignored by verl's response slicing). entropy: (L,) or None.
    """
    device = next(model.parameters()).device  # rows live on the CPU (TransferQueue); the model may be on a GPU
    input_ids = row["input_ids"].long().unsqueeze(0).to(device)  # (1, L)
    position_ids = row["position_ids"].to(device)
    if position_ids.dim() == 2:
        position_ids = position_ids.unsqueeze(1)  # (4, 1, L), as verl's non-packed path feeds Qwen2.5-VL
    else:
        position_ids = position_ids.unsqueeze(0)
    mm = {k: v.to(device) for k, v in (row.get("multi_modal_inputs") or {}).items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids, **mm).logits[0].float()  # (L, V)
    logits = logits / temperature
    labels = torch.roll(input_ids[0], shifts=-1)  # verl: input_ids_rmpad_rolled
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        if entropy_top_p is None:
            entropy = compute_entropy_from_logits(logits)
        else:
            entropy = compute_top_p_entropy_from_logits(logits, float(entropy_top_p))
        entropy = entropy.cpu()
    return log_probs.cpu(), entropy


class _OldLogProbPass:
    """verl's ``PPOTrainer._compute_old_log_prob`` around a scorer's ``compute_log_prob`` (``self(meta)``)."""

    store: Any

    def compute_old_log_prob(
        self,
        keys: list[str],
        partition_id: str = "train",
        temperature: float = 1.0,
        entropy_top_p: float | None = None,
    ) -> None:
        """verl's ``_compute_old_log_prob`` in-process: score with entropy, store ``old_log_probs`` and ``entropy``
        per response token (verl's ``response_from_nested``). ``entropy_top_p`` sets the ToR trainer's flag
        (``tor.entropy=top_p``), so ``entropy`` is the top-p truncated one."""
        from verl.workers.utils.padding import response_from_nested

        meta = KVMeta(keys=list(keys), partition_id=partition_id, extra_info={"calculate_entropy": True})
        meta.extra_info.update(compute_loss=False, temperature=temperature)
        if entropy_top_p is not None:
            meta.extra_info[TOP_P_FLAG] = float(entropy_top_p)
        self(meta)
        got = self.store.kv_batch_get(keys, partition_id, ["log_probs", "entropy", "response_mask"])
        fields = {
            "old_log_probs": response_from_nested(got["log_probs"], got["response_mask"]),
            "entropy": response_from_nested(got["entropy"], got["response_mask"]),
        }
        self.store.kv_batch_put(keys, partition_id, fields=TensorDict(fields, batch_size=len(keys)))


@dataclass
class LocalLogProbScorer(_OldLogProbPass):
    """``actor_rollout_wg.compute_log_prob`` in-process: the meta's rows -> model forward -> store."""

    store: InMemoryKV
    forward: Callable[[dict, float, bool, float | None], tuple[torch.Tensor, torch.Tensor | None]]
    """``(row, temperature, with_entropy, entropy_top_p) -> (log_probs, entropy)``."""
    calls: list[dict] = field(default_factory=list)

    @classmethod
    def for_model(cls, store: InMemoryKV, model: torch.nn.Module) -> LocalLogProbScorer:
        model.eval()
        return cls(store=store, forward=lambda row, t, e, p: compute_sequence_log_probs(model, row, t, e, p))

    def compute_log_prob(self, meta: Any) -> KVMeta:
        info = dict(meta.extra_info or {})
        data = self.store.kv_batch_get(meta.keys, meta.partition_id)
        self.calls.append({"n": len(meta.keys), "partition_id": meta.partition_id, "fields": set(data.keys()), **info})
        rows = tensordict_to_rows(data)
        temperature = float(info.get("temperature", 1.0))
        want_entropy = bool(info.get("calculate_entropy", False))
        top_p = info.get(TOP_P_FLAG)  # the ToR trainer's flag for the old-policy pass (verl_tor.integration.engine)
        out: dict[str, list] = {"log_probs": []}
        if want_entropy:
            out["entropy"] = []
        for row in rows:
            log_probs, entropy = self.forward(row, temperature, want_entropy, top_p)
            out["log_probs"].append(log_probs)
            if want_entropy:
                out["entropy"].append(entropy)
        td = TensorDict(
            {k: torch.nested.as_nested_tensor(v, layout=torch.jagged) for k, v in out.items()},
            batch_size=len(rows),
        )
        return self.store.kv_batch_put(meta.keys, meta.partition_id, fields=td, tags=meta.tags)

    __call__ = compute_log_prob


def build_verl_row(processor: Any, prompt_ids: torch.Tensor, response_ids: torch.Tensor, images: list | None) -> dict:
    """One trajectory exactly as verl 0.9.1's agent loop stores it in TransferQueue, built by verl's own code.

    Calls ``AgentLoopWorker._compute_multi_modal_inputs`` / ``_compute_position_ids`` (the methods verl's
    ``AgentLoopWorkerTQ._agent_loop_postprocess`` uses) on a stand-in worker holding only the processor.

    Args:
        processor: a Qwen2/2.5-VL processor loaded through ``verl.utils.hf_processor`` (``get_rope_index`` bound).
        prompt_ids: (Lp,) prompt token ids, vision placeholders already expanded (as vLLM sees them).
        response_ids: (Lr,) sampled response token ids.
        images: the PIL images of the prompt (None for a text-only prompt).
    Returns:
        dict with ``prompts``, ``responses``, ``input_ids``, ``position_ids`` (4, L), ``multi_modal_inputs``,
        ``response_mask``, ``loss_mask``: the token and model-input fields of verl's row, and no field verl's row
        lacks (no ``attention_mask``: verl stores none; ``tests/test_stage_on_cpu.py`` compares with verl's own put).
    """
    import types

    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    worker = types.SimpleNamespace(processor=processor, tokenizer=processor.tokenizer, mm_processor_kwargs=None)
    worker._get_mm_processor_kwargs = types.MethodType(AgentLoopWorker._get_mm_processor_kwargs, worker)
    output = types.SimpleNamespace(multi_modal_data={"images": images} if images else {}, mm_processor_kwargs=None)
    prompts, responses = prompt_ids.long(), response_ids.long()
    input_ids = torch.cat([prompts, responses])
    attention_mask = torch.ones_like(input_ids)
    multi_modal_inputs = AgentLoopWorker._compute_multi_modal_inputs(worker, output, input_ids.unsqueeze(0))
    position_ids = AgentLoopWorker._compute_position_ids(
        worker, input_ids.unsqueeze(0), attention_mask.unsqueeze(0), multi_modal_inputs
    ).squeeze(0)
    return {
        "prompts": prompts,
        "responses": responses,
        "input_ids": input_ids,
        "position_ids": position_ids,
        "multi_modal_inputs": multi_modal_inputs,
        "response_mask": torch.ones_like(responses),
        "loss_mask": torch.ones_like(responses),  # verl: field["loss_mask"] = field["response_mask"]
    }


def build_actor_config(*overrides: str) -> Any:
    """verl's ``ActorConfig`` dataclass as a run builds it: hydra-composed ``ppo_trainer`` + ``overrides``."""
    from pathlib import Path

    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("ppo_trainer", overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1", *overrides])
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def build_cpu_engine(model: torch.nn.Module) -> Any:
    """verl's real ``FSDPEngineWithLMHead`` around ``model``, for its padded and packed paths on CPU.

    Only ``forward_step`` / ``prepare_model_inputs`` / ``prepare_model_outputs`` are meant to run: the instance
    carries the attributes those read (no FSDP wrapping, no process group, float32, no Ulysses). The caller must
    point verl's device helpers at the CPU (``patch_engine_device_helpers``) and apply verl's model patch
    (``setup_cpu_engine`` does both).
    """
    import types

    from verl.utils import torch_functional as verl_F
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = FSDPEngineWithLMHead.__new__(FSDPEngineWithLMHead)
    engine.module = model
    engine._autocast_dtype = torch.float32
    engine.use_ulysses_sp = False
    engine.pad_to_length = False
    engine.engine_config = types.SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    engine.ulysses_device_mesh = None  # get_data_parallel_group() -> the default group (none): forward_step with a loss
    return engine


def setup_cpu_engine(model: torch.nn.Module, use_remove_padding: bool = False) -> Any:
    """Set this process up the way verl's workers are, on CPU, and return the engine around ``model``.

    verl_tor's Qwen2-VL no-pixel fix (image-free rows need it), verl's device helpers pointed at the CPU, verl's
    model patch as a worker applies it for ``model.use_remove_padding`` (for the packed path, after the CPU
    platform's route of Qwen2-VL's attention to transformers': ``verl_tor.local.packed``), then
    ``build_cpu_engine``. The model patch is process-wide: call this in a process of its own. With
    ``use_remove_padding`` the engine runs both paths (the micro-batch's flag picks one).
    """
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    from verl_tor.integration.fixes.qwen2_vl import apply_qwen2_vl_fix
    from verl_tor.local.packed import route_qwen2_vl_attention_to_transformers

    apply_qwen2_vl_fix()
    patch_engine_device_helpers()
    if use_remove_padding:
        route_qwen2_vl_attention_to_transformers()
    apply_monkey_patch(model, use_remove_padding=use_remove_padding)
    return build_cpu_engine(model)


def patch_engine_device_helpers(monkeypatch: Any = None) -> None:
    """Point ``transformer_impl``'s ``get_device_name`` / ``get_device_id`` at the CPU (verl has no CPU platform)."""
    import verl.workers.engine.fsdp.transformer_impl as impl

    for name, value in (("get_device_name", lambda: "cpu"), ("get_device_id", lambda: "cpu")):
        if monkeypatch is not None:
            monkeypatch.setattr(impl, name, value)
        else:
            setattr(impl, name, value)


@dataclass
class EngineLogProbScorer(_OldLogProbPass):
    """``compute_log_prob`` through verl's real ``FSDPEngineWithLMHead.forward_step`` (one micro-batch per call)."""

    store: InMemoryKV
    engine: Any
    calls: list[dict] = field(default_factory=list)
    use_remove_padding: bool = False
    """verl's packed path (one ``(1, total)`` row per micro-batch) instead of the padded one."""

    def compute_log_prob(self, meta: Any) -> KVMeta:
        from verl.utils import tensordict_utils as tu

        info = dict(meta.extra_info or {})
        data = self.store.kv_batch_get(meta.keys, meta.partition_id)
        self.calls.append({"n": len(meta.keys), "partition_id": meta.partition_id, "fields": set(data.keys()), **info})
        # the ToR trainer's flag for the old-policy pass (tor.entropy=top_p): the engine hook reads it
        flags = {TOP_P_FLAG: float(info[TOP_P_FLAG])} if info.get(TOP_P_FLAG) is not None else {}
        tu.assign_non_tensor(
            data,
            use_remove_padding=self.use_remove_padding,
            calculate_entropy=bool(info.get("calculate_entropy", False)),
            temperature=float(info.get("temperature", 1.0)),
            **flags,
        )
        with torch.no_grad():
            _, output = self.engine.forward_step(data, loss_function=None, forward_only=True)
        out = {"log_probs": output["model_output"]["log_probs"]}
        if info.get("calculate_entropy", False):
            out["entropy"] = output["model_output"]["entropy"]
        return self.store.kv_batch_put(meta.keys, meta.partition_id, fields=TensorDict(out, batch_size=len(meta.keys)))

    __call__ = compute_log_prob
