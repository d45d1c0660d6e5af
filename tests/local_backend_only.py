"""verl_tor's local backend (the CPU platform and the ``hf`` rollout) without the verl_tor plugin: the plugin-free arm
of the ToR-off-equals-stock check (``tests/test_main_ppo_wiring_on_cpu.py``).

The local backend is normally installed by the plugin (``verl_tor.integration.plugin`` calls
``verl_tor.local.install``), so a stock run on CPU loads the whole plugin: the trainer modes, the ``validate_config``
wrapper, the engine hook, the verl bug fixes. A run with ``VERL_USE_EXTERNAL_PLUGINS=none`` (verl 0.9.1's switch,
``verl/__init__.py``: no ``verl.plugins`` entry point is loaded) and ``VERL_USE_EXTERNAL_MODULES=local_backend_only``
(imported by ``import verl`` in every process, before the plugins) gets only what a CPU needs: this module hands
``verl_tor.local.install`` a post-import hook of its own, so nothing of ``verl_tor.integration`` is imported. The
driver's plugin would export ``VERL_TOR_ROLLOUT=hf`` for the Ray workers; here the caller's environment sets it.

Each process prints one line when verl's trainer or engine module is imported, saying whether the plugin is loaded
there, so the test can check that the arm really ran without it.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable

from verl_tor import local

MARKER = "[local_backend_only]"
PLUGIN_MODULE = "verl_tor.integration.plugin"

_HOOKS: dict[str, list[Callable[[], None]]] = {}


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for hook in _HOOKS.pop(module.__name__, []):
            hook()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS or fullname in _SEARCHING:  # no recursion with another delegating finder
            return None
        _SEARCHING.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _Loader(spec.loader)
                    return spec
            return None
        finally:
            _SEARCHING.discard(fullname)


_SEARCHING: set[str] = set()


def when_imported(module_name: str, hook: Callable[[], None]) -> None:
    """``hook()`` now if ``module_name`` is imported, else right after it is (the plugin's contract)."""
    if module_name in sys.modules:
        hook()
        return
    _HOOKS.setdefault(module_name, []).append(hook)


def _report(where: str) -> Callable[[], None]:
    def report() -> None:
        loaded = PLUGIN_MODULE in sys.modules or any(m.startswith("verl_tor.integration") for m in sys.modules)
        print(f"{MARKER} {where}: verl_tor plugin loaded: {loaded}", file=sys.stderr, flush=True)

    return report


sys.meta_path.insert(0, _Finder())
local.install(when_imported)
when_imported("verl.trainer.ppo.v1", _report("trainer"))
when_imported("verl.workers.engine.fsdp.transformer_impl", _report("engine"))
