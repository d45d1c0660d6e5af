"""verl entry point (``verl.plugins`` group, name ``tor``): installs verl_tor's hooks in every verl process.

``import verl`` loads this module in the driver and in every Ray worker. Importing verl's trainer or engine
modules from here would be slow and circular (verl is half-imported at that moment), so each hook is attached
*after* its target module is imported, by a small import hook:

==================================================  =====================================================
target module (verl 0.9.1)                          what verl_tor does there
==================================================  =====================================================
``verl.trainer.ppo.v1``                             registers modes ``tor_sync``, ``tor_colocate_async``
``verl.utils.config``                               wraps ``validate_config`` to validate the ``tor`` block
``verl.models.transformers.qwen2_vl``               fixes the no-pixel forward bug, only when present
``verl.workers.engine.fsdp.transformer_impl``       top-p entropy in the old-policy pass (``tor.entropy=top_p``)
``verl.utils.tensordict_utils``                     fixes equal-length M-RoPE batches, only when the bug is present
(``verl_tor.local``, opt-in)                        CPU platform / ``hf`` rollout, only when the environment asks
==================================================  =====================================================

verl logs a plugin's import error only at DEBUG; this module logs its own WARNING, and the ToR trainer refuses to
start (``assert_ready``) when a hook is missing or the verl version is outside the supported range.
"""

from __future__ import annotations

import functools
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


# ---------------------------------------------------------------------- post-import hooks
class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs callbacks right after selected modules finish executing (once each)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
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


# ---------------------------------------------------------------------- the hooks
def register_trainer_mode() -> None:
    from verl_tor.integration.trainer import build_trainer_classes

    build_trainer_classes()


def wrap_validate_config() -> None:
    import verl.utils.config as verl_config

    original = verl_config.validate_config
    if getattr(original, "__verl_tor__", False):
        return

    @functools.wraps(original)
    def validate_config(config, use_reference_policy, use_critic, *args, **kwargs):
        result = original(config, use_reference_policy, use_critic, *args, **kwargs)
        from verl_tor.integration.trainer import validate_tor_config
        from verl_tor.local import validate_local_config

        validate_local_config(config)  # before Ray starts: exports what the local backend's workers need

        validate_tor_config(config, use_reference_policy=use_reference_policy)
        return result

    validate_config.__verl_tor__ = True
    validate_config.__wrapped_original__ = original
    verl_config.validate_config = validate_config


def fix_qwen2_vl() -> None:
    from verl_tor.integration.fixes.qwen2_vl import apply_qwen2_vl_fix

    apply_qwen2_vl_fix()


def fix_mrope_position_ids() -> None:
    from verl_tor.integration.fixes.mrope import apply_mrope_fix

    if "mrope" not in _skipped_fixes():
        apply_mrope_fix()


def _skipped_fixes() -> set[str]:
    """``VERL_TOR_SKIP_FIXES=mrope,...``: leave those verl bugs in place (to reproduce them; tests)."""
    import os

    return {name.strip() for name in os.environ.get("VERL_TOR_SKIP_FIXES", "").split(",") if name.strip()}


def install_top_p_entropy() -> None:
    from verl_tor.integration.engine import install_top_p_entropy_hook

    install_top_p_entropy_hook()


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


def register() -> None:
    """Install every hook (idempotent)."""
    global _VERSION_ERROR
    if _INSTALLED:
        return
    _VERSION_ERROR = check_verl_version()
    if _VERSION_ERROR is not None:
        logger.warning("verl_tor: %s; ToR runs will refuse to start", _VERSION_ERROR)
    when_imported("verl.trainer.ppo.v1", register_trainer_mode)
    when_imported("verl.utils.config", wrap_validate_config)
    when_imported("verl.models.transformers.qwen2_vl", fix_qwen2_vl)
    when_imported("verl.workers.engine.fsdp.transformer_impl", install_top_p_entropy)
    when_imported("verl.utils.tensordict_utils", fix_mrope_position_ids)
    from verl_tor import local

    local.install(when_imported)  # the CPU platform / HF rollout, only where the environment selects them


try:
    register()
except Exception as _exc:  # verl would swallow this at DEBUG level: say it loudly first
    logger.warning("verl_tor: plugin failed to load: %r", _exc)
    raise
