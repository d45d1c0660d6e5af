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
import logging

from verl_tor.integration.hooks import (  # noqa: F401 - re-exported: the plugin's public state lives in hooks
    assert_ready,
    check_verl_version,
    is_registered,
    record_version_check,
    verl_version,
    when_imported,
)

logger = logging.getLogger("verl_tor")


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


def register() -> None:
    """Install every hook (idempotent)."""
    if is_registered():
        return
    record_version_check()
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
