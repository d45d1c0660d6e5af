"""verl's real trainer on a laptop: a CPU platform and a Hugging Face rollout, through verl's extension points.

``python -m verl.trainer.main_ppo`` (Ray, TransferQueue, the agent loop, the FSDP2 actor, weight sync, reward
workers) runs unchanged on a machine without GPUs or vLLM once verl finds:

- a ``cpu`` platform and its FSDP engines (``verl_tor.local.platform``), selected by verl's own switch
  ``VERL_PLATFORM=cpu`` (exported before Python starts: verl resolves its platform once per process);
- a rollout backend ``actor_rollout_ref.rollout.name=hf`` (``verl_tor.local.rollout``), which also runs on a CUDA
  GPU when one is present.

Opt-in and inert otherwise: the plugin calls ``install`` on every ``import verl``; it registers nothing unless the
environment selects it (``VERL_PLATFORM=cpu``; ``VERL_TOR_ROLLOUT=hf``, which ``validate_local_config`` exports in
the driver when the config asks for ``rollout.name=hf``, before Ray starts, so every Ray worker inherits it).
``recipes/cpu_tiny/`` runs it; ``tests/test_main_ppo*_on_cpu.py`` test through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from verl_tor.local.errors import LocalBackendError

__all__ = [
    "PLATFORM_ENV",
    "ROLLOUT_ENV",
    "cpu_platform_selected",
    "hf_rollout_selected",
    "install",
    "validate_local_config",
    "LocalBackendError",
]

PLATFORM_ENV = "VERL_PLATFORM"
"""verl's platform switch; ``cpu`` selects ``verl_tor.local.platform``."""

ROLLOUT_ENV = "VERL_TOR_ROLLOUT"
"""``hf`` registers the HF rollout backend in this process (exported by the driver for its Ray workers)."""


def cpu_platform_selected() -> bool:
    return os.environ.get(PLATFORM_ENV, "").strip().lower() == "cpu"


def hf_rollout_selected() -> bool:
    from verl_tor.local.rollout import ROLLOUT_NAME

    return os.environ.get(ROLLOUT_ENV, "").strip().lower() == ROLLOUT_NAME


def install(when_imported: Callable[[str, Callable[[], None]], None]) -> list[str]:
    """Register what the environment selects (called by ``verl_tor.integration.plugin`` in every verl process).

    Args:
        when_imported: the plugin's post-import hook, ``(module name, callback)``.
    Returns:
        the names of the parts selected (empty: nothing registered, verl untouched).
    """
    selected = []
    if cpu_platform_selected():
        when_imported("verl.plugin.platform", register_cpu_platform)
        when_imported("verl.utils.distributed", fix_cpu_process_group)
        when_imported("verl.workers.engine.fsdp.transformer_impl", register_cpu_engines)
        when_imported("verl.models.transformers.qwen2_vl", route_qwen2_vl_attention)
        selected.append("cpu platform")
    if hf_rollout_selected():
        when_imported("verl.workers.rollout.replica", register_hf_rollout)
        # repeatable DAPO batches: surplus groups discarded in dispatch order, not in a random set order
        when_imported("verl.trainer.ppo.v1.replay_buffer", order_selection_by_dispatch)
        selected.append("hf rollout")
    return selected


# Named hooks (the plugin records each by its function name).
def register_cpu_platform() -> None:
    from verl_tor.local.platform import register_cpu_platform as register

    register()


def fix_cpu_process_group() -> None:
    from verl_tor.local.platform import fix_cpu_process_group as fix

    fix()


def register_cpu_engines() -> None:
    from verl_tor.local.platform import register_cpu_engines as register

    register()


def route_qwen2_vl_attention() -> None:
    from verl_tor.local.packed import route_qwen2_vl_attention_to_transformers

    route_qwen2_vl_attention_to_transformers()


def register_hf_rollout() -> None:
    from verl_tor.local.rollout import register_hf_rollout as register

    register()


def order_selection_by_dispatch() -> None:
    from verl_tor.local.sampling import order_selection_by_dispatch as order

    order()


def validate_local_config(config: Any) -> None:
    """Check a verl config that selects the local backend, before Ray starts; export ``VERL_TOR_ROLLOUT``.

    Raises ``LocalBackendError`` naming the setting, its value and the fix. A config that selects nothing local
    (no ``VERL_PLATFORM=cpu``, no ``trainer.device=cpu``, rollout not ``hf``) passes untouched.
    """
    from omegaconf import OmegaConf

    from verl_tor.local.rollout import ROLLOUT_NAME

    # a stock ppo_trainer config leaves rollout.name MISSING (???) until a recipe sets it
    name = OmegaConf.select(config, "actor_rollout_ref.rollout.name", default=None, throw_on_missing=False)
    device = str(OmegaConf.select(config, "trainer.device", default="cuda"))
    on_cpu = cpu_platform_selected()
    uses_hf = name == ROLLOUT_NAME
    if not (on_cpu or uses_hf or device == "cpu"):
        return
    if device == "cpu" and not on_cpu:
        raise LocalBackendError(
            "trainer.device=cpu needs verl_tor's CPU platform, which verl selects with its own switch. "
            f"Fix: export {PLATFORM_ENV}=cpu before starting Python (e.g. `{PLATFORM_ENV}=cpu python3 -m "
            "verl.trainer.main_ppo ...`), or use recipes/cpu_tiny/."
        )
    if on_cpu:
        _check_cpu_run(config, device, uses_hf)
    if uses_hf:
        _check_hf_rollout(config)
        os.environ[ROLLOUT_ENV] = ROLLOUT_NAME  # Ray workers started after this inherit it
        register_hf_rollout()


def _check_cpu_run(config: Any, device: str, uses_hf: bool) -> None:
    from verl_tor.local.rollout import ROLLOUT_NAME

    if device != "cpu":
        raise LocalBackendError(
            f"{PLATFORM_ENV}=cpu but trainer.device={device!r}: verl's workers would build {device} device meshes "
            "on the CPU platform. Fix: set trainer.device=cpu."
        )
    if not uses_hf:
        raise LocalBackendError(
            f"{PLATFORM_ENV}=cpu but actor_rollout_ref.rollout.name={config.actor_rollout_ref.rollout.name!r}: "
            f"that server needs a GPU. Fix: set actor_rollout_ref.rollout.name={ROLLOUT_NAME}."
        )
    model = config.actor_rollout_ref.model
    # use_remove_padding=true (packed sequences) runs: verl_tor.local.packed routes Qwen2-VL's attention to
    # transformers' own, which builds the block-causal mask flash-attn's varlen call would apply. Sequence
    # parallelism cannot: it lives inside verl's flash-attn attention.
    for role in ("actor", "ref"):
        sp = int(config.actor_rollout_ref[role].get("ulysses_sequence_parallel_size", 1) or 1)
        if sp > 1:
            raise LocalBackendError(
                f"actor_rollout_ref.{role}.ulysses_sequence_parallel_size={sp}: verl's sequence parallelism runs "
                f"inside its flash-attn attention, which has no CPU build. Fix: set "
                f"actor_rollout_ref.{role}.ulysses_sequence_parallel_size=1 on the CPU platform."
            )
    if model.get("use_fused_kernels", False):
        raise LocalBackendError(
            "actor_rollout_ref.model.use_fused_kernels=true needs Triton on a GPU. Fix: set it to false on the CPU "
            "platform."
        )
    ray_init = config.get("ray_kwargs", {}).get("ray_init", {})
    slots = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    num_gpus = ray_init.get("num_gpus", None)
    if num_gpus is None or int(num_gpus) < slots:
        raise LocalBackendError(
            f"the CPU platform places verl's workers on logical Ray GPU slots, and "
            f"ray_kwargs.ray_init.num_gpus={num_gpus!r} gives fewer than trainer.n_gpus_per_node x trainer.nnodes "
            f"= {slots}: Ray would wait forever for them. Fix: +ray_kwargs.ray_init.num_gpus={slots}."
        )
    num_cpus = ray_init.get("num_cpus", None)
    if num_cpus is not None and int(num_cpus) < 8:
        raise LocalBackendError(
            f"ray_kwargs.ray_init.num_cpus={num_cpus}: TransferQueue's controller and storage units, the agent loop "
            "and reward workers each reserve a logical CPU, so Ray never schedules all of them. Fix: give Ray more "
            "logical CPUs than cores, e.g. ray_kwargs.ray_init.num_cpus=32."
        )


def _check_hf_rollout(config: Any) -> None:
    from verl_tor.local.rollout import ROLLOUT_NAME, _sync_weights_enabled

    rollout = config.actor_rollout_ref.rollout
    for key in ("tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size"):
        value = int(rollout.get(key, 1))
        if value != 1:
            raise LocalBackendError(
                f"actor_rollout_ref.rollout.{key}={value} with rollout.name={ROLLOUT_NAME}: the hf rollout holds "
                f"one whole model per replica. Fix: set actor_rollout_ref.rollout.{key}=1 (or use vllm)."
            )
    if rollout.get("mode", "async") != "async":
        raise LocalBackendError(
            f"actor_rollout_ref.rollout.mode={rollout.mode!r}: verl 0.9.1's rollouts are servers. Fix: mode=async."
        )
    if not config.actor_rollout_ref.get("hybrid_engine", True):
        raise LocalBackendError(
            f"actor_rollout_ref.hybrid_engine=false with rollout.name={ROLLOUT_NAME}: the hf rollout takes its "
            "weights from the actor in the same placement (hybrid mode). Fix: actor_rollout_ref.hybrid_engine=true."
        )
    _sync_weights_enabled(rollout)  # a bad custom.sync_weights value fails here, not in a worker
