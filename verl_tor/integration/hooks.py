"""The plugin's bookkeeping: post-import hooks, which of them ran or failed, the verl version check, and
``assert_ready``, the check the ToR trainer runs at start.

Apart from ``verl_tor.integration.plugin`` (verl's entry point, which registers the hooks) so that the trainer can
check the plugin's state without importing the entry point: imports point one way, plugin -> trainer -> hooks.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable

from verl_tor import SUPPORTED_VERL

logger = logging.getLogger("verl_tor")

_HOOKS: dict[str, list[Callable]] = {}
_INSTALLED: dict[str, bool] = {}
"""hook name -> whether it ran (False: registered, target module not imported yet)."""
_ERRORS: dict[str, BaseException] = {}
_VERSION_ERROR: str | None = None
"""Why this verl is refused (set once by ``record_version_check``), or None."""


# ---------------------------------------------------------------------- post-import hooks
class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs callbacks right after selected modules finish executing (once each)."""

    def find_spec(self, fullname, path, target=None):
        # Re-entrancy guard: another finder that delegates to sys.meta_path the same way (a second post-import hook,
        # e.g. another plugin's) would call back into this one for the same module, and the two would recurse.
        if fullname not in _HOOKS or fullname in _SEARCHING:
            return None
        _SEARCHING.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PostImportLoader(spec.loader)
                    return spec
                if spec is not None:
                    return spec
            return None
        finally:
            _SEARCHING.discard(fullname)


_SEARCHING: set[str] = set()
"""Module names this finder is looking up right now (imports hold the import lock per module)."""


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run_hooks(module.__name__)

    def __getattr__(self, name):  # get_source, is_package, ... used by inspect/linecache
        return getattr(self._loader, name)


_FINDER = _PostImportFinder()


def when_imported(module_name: str, hook: Callable[[], None]) -> None:
    """Call ``hook()`` now if ``module_name`` is imported, else right after it is."""
    _HOOKS.setdefault(module_name, []).append(hook)
    _INSTALLED.setdefault(hook.__name__, False)
    if module_name in sys.modules and getattr(sys.modules[module_name], "__spec__", None) is not None:
        _run_hooks(module_name)
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def _run_hooks(module_name: str) -> None:
    for hook in _HOOKS.pop(module_name, []):
        try:
            hook()
            _INSTALLED[hook.__name__] = True
        except Exception as exc:  # noqa: BLE001 - logged loudly, re-raised by assert_ready
            _ERRORS[hook.__name__] = exc
            logger.warning("verl_tor: hook %s on %s failed: %r", hook.__name__, module_name, exc)


# ---------------------------------------------------------------------- state
def verl_version() -> str | None:
    """The version of the verl this process imports: ``verl.__version__`` when verl is imported (set before verl
    loads its plugins; right for a source checkout on ``PYTHONPATH`` too), else the installed distribution's."""
    from importlib.metadata import PackageNotFoundError, version

    module = sys.modules.get("verl")
    if getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return version("verl")
    except PackageNotFoundError:
        return None


def check_verl_version() -> str | None:
    """``None`` when the verl in use is in ``SUPPORTED_VERL``, else the reason."""
    from packaging.specifiers import SpecifierSet

    installed = verl_version()
    if installed is None:
        return "verl is not installed"
    if installed not in SpecifierSet(SUPPORTED_VERL):
        return f"verl {installed} is outside verl_tor's supported range verl{SUPPORTED_VERL}"
    return None


def assert_ready() -> None:
    """Raise unless every hook that a ToR run needs is in place (called by the ToR trainer when enabled)."""
    if _VERSION_ERROR is not None:
        raise RuntimeError(
            f"tor.enable=true but {_VERSION_ERROR}; its internals were not checked. "
            f"Fix: pip install 'verl{SUPPORTED_VERL}' (or upgrade verl_tor)."
        )
    if not _INSTALLED:
        raise RuntimeError(
            "tor.enable=true but the verl_tor plugin is not loaded in this process. Fix: pip install verl_tor "
            "in the environment of every Ray worker, and do not set VERL_USE_EXTERNAL_PLUGINS=none."
        )
    if _ERRORS:
        detail = "; ".join(f"{name}: {exc!r}" for name, exc in _ERRORS.items())
        raise RuntimeError(f"tor.enable=true but verl_tor's hooks failed to install: {detail}")
    missing = [name for name in ("register_trainer_mode",) if not _INSTALLED.get(name)]
    if missing:
        raise RuntimeError(f"tor.enable=true but verl_tor hooks did not run: {missing}")


def record_version_check() -> str | None:
    """Check the verl in use once, remember the verdict for ``assert_ready`` and warn now when it is refused."""
    global _VERSION_ERROR
    _VERSION_ERROR = check_verl_version()
    if _VERSION_ERROR is not None:
        logger.warning("verl_tor: %s; ToR runs will refuse to start", _VERSION_ERROR)
    return _VERSION_ERROR


def is_registered() -> bool:
    """Whether the plugin has registered its hooks in this process."""
    return bool(_INSTALLED)
