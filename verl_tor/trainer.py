"""The verl-facing trainer: V1 trainer mode ``tor_sync`` = verl's ``PPOTrainerSync`` + the ToR stage.

Only this module and ``verl_tor.plugin`` touch verl internals. What it relies on in verl 0.9.1 (checked by
``tests/test_trainer_on_cpu.py`` against the installed source):

- ``verl.trainer.ppo.v1.trainer_base``: ``PPOTrainer.__init__`` (sets ``self.trainer_mode``), ``_compute_old_log_prob``
  (calls ``actor_rollout_wg.compute_log_prob`` with ``calculate_entropy=True``, stores ``old_log_probs``, ``entropy``),
  ``_compute_advantage`` (stores ``advantages``), ``register_trainer``;
- ``verl.trainer.ppo.v1.trainer_sync.PPOTrainerSync``;
- ``transfer_queue``'s ``kv_batch_get / kv_batch_put / kv_clear`` and ``KVBatchMeta``;
- ``verl.workers.utils.losses.ppo_loss`` and the worker's ``set_loss_fn`` (``tor.apply=loss``).

The async trap: verl switches its replay buffer, refill and checkpoint logic on ``trainer_mode != "sync"``; a
``tor_sync`` trainer is a sync trainer, so ``self.trainer_mode`` reads ``"sync"`` for all of that logic.
"""

from __future__ import annotations

import logging
from typing import Any

from verl_tor.config import ToRConfig, ToRConfigError
from verl_tor.loss import ADVANTAGE_EXACT_LOSS_MODES, LOSS_WRAPPABLE_LOSS_MODES

logger = logging.getLogger("verl_tor")

TOR_TRAINER_MODE = "tor_sync"
"""``trainer.v1.trainer_mode`` value that selects the ToR trainer."""

TOP_P_STRATEGIES = ("fsdp", "fsdp2")
"""Actor strategies whose engine (``FSDPEngineWithLMHead``) carries the top-p entropy hook (``verl_tor.engine``)."""


def read_tor_config(config: Any) -> ToRConfig:
    """The ``tor`` block of a verl config (absent -> defaults, i.e. disabled)."""
    block = config.get("tor", None) if hasattr(config, "get") else None
    return ToRConfig.from_mapping(block)


def validate_tor_config(config: Any, use_reference_policy: bool | None = None) -> ToRConfig:
    """Check a whole verl config for ToR: the ``tor`` block itself and how it fits the rest of the run.

    Raises ``ToRConfigError`` naming the field, the value and the fix. Called from verl's ``validate_config``
    (wrapped by the plugin, so a bad flag fails before Ray starts) and again at trainer start.
    """
    tor = read_tor_config(config)
    if not tor.enable:
        return tor
    trainer = config.trainer
    if not trainer.get("use_v1", True):
        raise ToRConfigError(
            "tor.enable=true needs verl's V1 trainer, but trainer.use_v1=false. Fix: set trainer.use_v1=true."
        )
    mode = trainer.v1.trainer_mode
    if mode != TOR_TRAINER_MODE:
        raise ToRConfigError(
            f"tor.enable=true but trainer.v1.trainer_mode={mode!r}: that trainer never runs the ToR stage and "
            f"would train plain GRPO/DAPO. Fix: set trainer.v1.trainer_mode={TOR_TRAINER_MODE}."
        )
    actor = config.actor_rollout_ref.actor
    loss_mode = actor.policy_loss.get("loss_mode", "vanilla")
    if tor.apply == "advantage" and tor.mode != "all_tokens" and loss_mode not in ADVANTAGE_EXACT_LOSS_MODES:
        raise ToRConfigError(
            f"tor.apply='advantage' with actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode!r}: scaling "
            f"advantages equals scaling the surrogate only for {sorted(ADVANTAGE_EXACT_LOSS_MODES)}. "
            "Fix: set tor.apply=loss."
        )
    if tor.apply == "loss" and loss_mode not in LOSS_WRAPPABLE_LOSS_MODES:
        raise ToRConfigError(
            f"tor.apply='loss' with actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode!r}: that loss turns "
            "rollout_is_weights into sequence-level weights (geo_mean) or recomputes them (bypass_mode), so a "
            f"per-token weight cannot reach it. Fix: use one of {sorted(LOSS_WRAPPABLE_LOSS_MODES)}."
        )
    if tor.apply == "loss" and _distillation_enabled(config):
        raise ToRConfigError(
            "tor.apply='loss' with distillation enabled: the actor's loss is verl's distillation loss, which the "
            "ToR wrapper would replace. Fix: set tor.apply=advantage."
        )
    rollout_corr = config.algorithm.get("rollout_correction", None)
    if rollout_corr is not None and rollout_corr.get("bypass_mode", False):
        raise ToRConfigError(
            "tor.enable=true with algorithm.rollout_correction.bypass_mode=true: verl then skips the old-policy "
            "pass, so there is no old-policy entropy to rank reasoning tokens by. "
            "Fix: set algorithm.rollout_correction.bypass_mode=false."
        )
    if tor.entropy == "top_p" and _uses_fused_kernels(config):
        raise ToRConfigError(
            "tor.entropy='top_p' needs the logits, but actor_rollout_ref.model.use_fused_kernels=true never "
            "materialises them. Fix: set actor_rollout_ref.model.use_fused_kernels=false, or tor.entropy=full."
        )
    strategy = actor.get("strategy", "fsdp")
    if tor.entropy == "top_p" and strategy not in TOP_P_STRATEGIES:
        raise ToRConfigError(
            f"tor.entropy='top_p' is computed by a hook on verl's FSDP engine, but "
            f"actor_rollout_ref.actor.strategy={strategy!r}: the old-policy pass would return the full entropy and "
            f"ToR would silently rank by it. Fix: use strategy {' or '.join(TOP_P_STRATEGIES)}, or tor.entropy=full."
        )
    if tor.scorer_policy == "ref" and tor.needs_image_free_pass:
        if use_reference_policy is None:
            from verl.trainer.ppo.utils import need_reference_policy

            use_reference_policy = need_reference_policy(config)
        if not use_reference_policy:
            raise ToRConfigError(
                "tor.scorer_policy='ref' but this run has no reference policy (no KL loss/penalty). "
                "Fix: set tor.scorer_policy=old, or enable actor_rollout_ref.actor.use_kl_loss."
            )
    return tor


def _distillation_enabled(config: Any) -> bool:
    distill = config.get("distillation", None)
    return bool(distill is not None and distill.get("enabled", distill.get("enable", False)))


def _uses_fused_kernels(config: Any) -> bool:
    model = config.actor_rollout_ref.model
    return bool(model.get("use_fused_kernels", False))


def build_trainer_class():
    """Define and register the ``tor_sync`` trainer (idempotent). Imports verl's V1 trainer."""
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    existing = TRAINER_REGISTRY.get(TOR_TRAINER_MODE)
    if existing is not None:
        if getattr(existing, "__verl_tor__", False):
            return existing
        raise RuntimeError(
            f"verl trainer mode {TOR_TRAINER_MODE!r} is already registered to {existing.__module__}."
            f"{existing.__name__}; verl_tor cannot register its ToR trainer. Uninstall the other plugin."
        )

    class ToRTrainerSync(PPOTrainerSync):
        """verl's synchronous PPO trainer with the ToR stage after the advantage computation.

        With ``tor.enable=false`` every override delegates unchanged, so the run is bit-identical to
        ``trainer_mode=sync``.
        """

        __verl_tor__ = True

        def __init__(self, config):
            from verl_tor import plugin

            self.tor_config = validate_tor_config(config)
            if self.tor_config.enable:
                plugin.assert_ready()
            self.tor_stage = None
            super().__init__(config)

        # verl keys its async machinery on `trainer_mode != "sync"`: present ourselves as sync.
        @property
        def trainer_mode(self) -> str:
            return "sync"

        @trainer_mode.setter
        def trainer_mode(self, value: str) -> None:
            self._configured_trainer_mode = value

        def init(self):
            super().init()
            if self.tor_config.enable:
                self.tor_stage = self._build_tor_stage()
                if self.tor_config.apply == "loss":
                    self._install_tor_loss()

        def _build_tor_stage(self):
            return build_stage(self)

        def _install_tor_loss(self):
            from verl.utils.config import omega_conf_to_dataclass

            from verl_tor.loss import build_tor_loss_fn

            actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            self.actor_rollout_wg.set_loss_fn(build_tor_loss_fn(actor_config))

        def _compute_old_log_prob(self, batch, metrics):
            if not (self.tor_config.enable and self.tor_config.entropy == "top_p"):
                return super()._compute_old_log_prob(batch, metrics)
            # Ask the engine hook (verl_tor.plugin) for the paper's top-p entropy in this pass only; the update
            # pass must keep verl's differentiable full entropy for its entropy bonus.
            batch.extra_info["tor_entropy_top_p"] = self.tor_config.entropy_top_p
            try:
                return super()._compute_old_log_prob(batch, metrics)
            finally:
                batch.extra_info.pop("tor_entropy_top_p", None)

        def _compute_advantage(self, batch, metrics):
            batch = super()._compute_advantage(batch, metrics)
            if self.tor_stage is None:
                return batch
            return self.tor_stage.run(batch, metrics, self.timing_raw, step=self.global_steps)

    ToRTrainerSync.__module__ = __name__
    ToRTrainerSync.__qualname__ = "ToRTrainerSync"
    register_trainer(TOR_TRAINER_MODE)(ToRTrainerSync)
    globals()["ToRTrainerSync"] = ToRTrainerSync
    return ToRTrainerSync


def build_stage(trainer: Any):
    """The ``ToRStage`` of a running trainer: its scorer, its processor's vision ids, TransferQueue."""
    import transfer_queue as tq
    from transfer_queue import KVBatchMeta

    from verl_tor.stage import ToRStage, make_view_builder

    cfg: ToRConfig = trainer.tor_config
    extra_meta: dict = {}
    if cfg.scorer_policy == "ref":
        if trainer.ref_in_actor:
            score, extra_meta = trainer.actor_rollout_wg.compute_log_prob, {"no_lora_adapter": True}
        else:
            score = trainer.ref_policy_wg.compute_ref_log_prob
    else:
        score = trainer.actor_rollout_wg.compute_log_prob
    processor = getattr(trainer, "processor", None)
    if processor is None and cfg.needs_image_free_pass:
        raise ToRConfigError(
            "tor.enable=true but this run has no multimodal processor (a text-only model?): there is no image to "
            "remove. Fix: train a vision-language model (e.g. Qwen2.5-VL), or set tor.mode=reasoning_only."
        )
    return ToRStage(
        config=cfg,
        score=score,
        make_meta=KVBatchMeta,
        build_view=make_view_builder(cfg, processor) if cfg.needs_image_free_pass else None,
        store=tq,
        temperature=float(trainer.config.actor_rollout_ref.rollout.temperature),
        extra_meta=extra_meta,
        on_weights=_maybe_token_map_writer(trainer),
    )


def _maybe_token_map_writer(trainer: Any):
    if trainer.tor_config.log_token_maps <= 0:
        return None
    from verl_tor.viz import TrainingTokenMapWriter

    return TrainingTokenMapWriter.from_trainer(trainer)
