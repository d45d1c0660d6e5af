"""A ``cpu`` platform for verl, and verl's FSDP engines registered for it.

verl 0.9.1 resolves its device through ``verl.plugin.platform`` (``PlatformRegistry``: nvidia, npu, rocm) and its
training engines through ``EngineRegistry`` (FSDP for cuda/npu). Nothing else in verl's trainer is CUDA-only for a
tiny model: FSDP2's ``fully_shard`` runs on CPU with gloo. This module adds the missing registrations, from
outside verl:

- ``CPUPlatform``: device ``cpu``, backend ``gloo``, Ray resource ``"GPU"`` used as a *logical* slot (``ray.init(
  num_gpus=N)``; verl's placement groups and resource checks then work unchanged) and a device module that is
  ``torch.cpu`` plus stand-ins for the CUDA calls verl makes (memory statistics read 0, caches are no-ops, the RNG
  state is the CPU generator's);
- ``FSDPEngineWithLMHead`` / ``FSDPEngineWithValueHead`` for device ``cpu``;
- the process group: verl's ``initialize_global_process_group_ray`` builds ``cpu:gloo,<device>:<backend>``, i.e.
  ``cpu:gloo,cpu:gloo`` here, which torch refuses ("Duplicate device type cpu"): on this platform it gets ``gloo``.

All of it is selected by verl's own switch ``VERL_PLATFORM=cpu`` (``verl_tor.local.install``) and inert otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from typing import Any

import torch

__all__ = [
    "cpu_platform_class",
    "CPU_PLATFORM",
    "register_cpu_platform",
    "register_cpu_engines",
    "fix_cpu_process_group",
]

CPU_PLATFORM = "cpu"
"""The ``VERL_PLATFORM`` value (and ``PlatformRegistry`` key) of the CPU platform."""


class _CPUDeviceModule(types.ModuleType):
    """``torch.cpu`` plus what verl asks of ``torch.cuda`` (``get_torch_device()``), answered for a CPU.

    Memory statistics read 0 (verl logs them), ``mem_get_info`` reports the host's memory, caches and IPC are
    no-ops, the RNG state is the CPU generator's. Anything else raises ``AttributeError`` naming the call, so a new
    verl call site fails loudly instead of silently doing nothing.
    """

    def __init__(self):
        super().__init__("verl_tor.local.cpu_device")

    # -- torch.cpu's own
    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 1)
    synchronize = staticmethod(torch.cpu.synchronize)
    current_stream = staticmethod(torch.cpu.current_stream)
    stream = staticmethod(torch.cpu.stream)
    Stream = torch.cpu.Stream
    Event = torch.cpu.Event

    current_device = staticmethod(torch.cpu.current_device)  # "cpu": verl does tensor.to(get_device_id())

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:  # verl's flops counter parses it
        return "cpu"

    # -- memory: a CPU has no device allocator to report on
    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        page, pages, avail = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
        return avail * page, pages * page

    # -- RNG: the CPU generator
    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    def __getattr__(self, name: str):
        raise AttributeError(
            f"verl called get_torch_device().{name}, which verl_tor's CPU platform does not provide "
            "(verl_tor/local/platform.py). Fix: add a CPU stand-in for it there."
        )


@functools.cache
def _device_module() -> _CPUDeviceModule:
    return _CPUDeviceModule()


def _make_platform_class():
    from verl.plugin.platform.platform_base import PlatformBase

    class CPUPlatform(PlatformBase):
        """verl platform ``cpu``: FSDP on CPU with gloo, one logical Ray ``GPU`` slot per worker."""

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> types.ModuleType:
            return _device_module()

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check=False) -> bool:
            # Never auto-detected: only VERL_PLATFORM=cpu selects it.
            return False

        def current_device(self) -> str:
            # torch.cpu's answer; verl moves tensors with .to(get_device_id()), which must mean the CPU
            return torch.cpu.current_device()

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: int | None = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            # Ray sets it for actors that hold logical GPU slots; torch ignores it on a CPU build or CPU run.
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            # A logical slot: ray.init(num_gpus=N) on a machine without GPUs; verl's placement groups need it.
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    CPUPlatform.__module__ = __name__
    return CPUPlatform


@functools.cache
def cpu_platform_class() -> type:
    """The ``CPUPlatform`` class (built on first use: defining it imports verl's ``PlatformBase``)."""
    return _make_platform_class()


def __getattr__(name: str):  # ``from verl_tor.local.platform import CPUPlatform``
    if name == "CPUPlatform":
        return cpu_platform_class()
    raise AttributeError(name)


def register_cpu_platform() -> bool:
    """Register ``CPUPlatform`` as verl platform ``cpu`` (idempotent). Returns whether it registered now.

    Raises ``RuntimeError`` when verl already resolved another platform in this process: every verl call would
    then keep using it.
    """
    from verl.plugin.platform import platform_manager
    from verl.plugin.platform.platform_manager import PlatformRegistry

    cls = cpu_platform_class()
    if PlatformRegistry.get(CPU_PLATFORM) is cls:
        return False
    current = platform_manager._current_platform
    if current is not None and current.device_name != "cpu":
        raise RuntimeError(
            f"VERL_PLATFORM=cpu, but verl already resolved the {current.device_name!r} platform in this process "
            "before verl_tor could register the CPU one. Fix: export VERL_PLATFORM=cpu before Python starts "
            "(not from inside the program)."
        )
    PlatformRegistry.register(platform=CPU_PLATFORM)(cls)
    return True


def register_cpu_engines() -> bool:
    """Register verl's FSDP engines (LM head and value head) for device ``cpu`` (idempotent).

    Also: verl gives forward-only FSDP2 engines (the reference policy) ``CPUOffloadPolicy(pin_memory=True)``; pinned
    memory needs a CUDA driver, and "offloading" to the CPU is a no-op on a CPU, so on this platform the engine
    module's policy never pins.
    """
    import verl.workers.engine.fsdp.transformer_impl as impl
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    policy = impl.CPUOffloadPolicy
    if policy is not None and not getattr(policy, "__verl_tor__", False):

        class UnpinnedCPUOffloadPolicy(policy):
            __verl_tor__ = True

            def __init__(self, pin_memory: bool = True):
                super().__init__(pin_memory=False)

        impl.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy

    registered = False
    for model_type, engine in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        backends = EngineRegistry._engines.get(model_type, {})
        missing = [b for b in ("fsdp", "fsdp2") if "cpu" not in backends.get(b, {})]
        if missing:
            EngineRegistry.register(model_type=model_type, backend=missing, device="cpu")(engine)
            registered = True
    return registered


def fix_cpu_process_group() -> bool:
    """Make verl's ``initialize_global_process_group_ray`` use plain ``gloo`` on this platform (idempotent).

    verl builds ``cpu:gloo,<device>:<backend>`` = ``cpu:gloo,cpu:gloo``, which torch refuses; an explicit backend
    passed by verl's caller (e.g. the checkpoint engine's ``cpu:gloo``) is kept.
    """
    import verl.utils.distributed as distributed

    original = distributed.initialize_global_process_group_ray
    if getattr(original, "__verl_tor__", False):
        return False

    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or "gloo")

    initialize_global_process_group_ray.__verl_tor__ = True
    initialize_global_process_group_ray.__wrapped_original__ = original
    distributed.initialize_global_process_group_ray = initialize_global_process_group_ray
    return True
