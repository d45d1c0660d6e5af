"""The verl-facing trainers: V1 trainer modes ``tor_sync`` and ``tor_colocate_async`` = verl's ``sync`` /
``colocate_async`` trainer + the ToR stage, built by one function (``build_trainer_class``) from one mixin.

Only this module and ``verl_tor.integration.plugin`` touch verl's trainer. What it relies on in verl (fingerprinted
per verl version by ``tests/test_verl_contract_on_cpu.py``, listed in ``verl_tor/integration/contract.py``):

- ``verl.trainer.ppo.v1.trainer_base``: ``PPOTrainer.__init__`` (sets ``self.trainer_mode``), ``_compute_old_log_prob``
  (calls ``actor_rollout_wg.compute_log_prob`` with ``calculate_entropy=True``, stores ``old_log_probs``, ``entropy``),
  ``_compute_advantage`` (stores ``advantages``), ``register_trainer`` and ``TRAINER_REGISTRY``;
- the trainer classes verl registers as ``sync`` and ``colocate_async``;
- ``transfer_queue``'s ``kv_batch_get / kv_batch_put / kv_clear`` and ``KVBatchMeta``;
- ``verl.workers.utils.losses.ppo_loss`` and the worker's ``set_loss_fn`` (``tor.apply=loss``).

The mode trap: verl switches its replay buffer, refill, prompt persistence and checkpoint logic on
``self.trainer_mode`` (``!= "sync"``) and reads ``trainer.v1.<trainer_mode>`` for its settings, so each ToR trainer
presents the name of the verl mode it extends (``tor_sync`` reads ``"sync"``, ``tor_colocate_async`` reads
``"colocate_async"``); the configured name stays in ``_configured_trainer_mode``.
"""

from __future__ import annotations

import logging
from typing import Any

from verl_tor import SUPPORTED_MODELS
from verl_tor.config import ToRConfig, ToRConfigError
from verl_tor.loss import ADVANTAGE_EXACT_LOSS_MODES, LOSS_WRAPPABLE_LOSS_MODES

logger = logging.getLogger("verl_tor")

TOR_TRAINER_MODES: dict[str, str] = {"tor_sync": "sync", "tor_colocate_async": "colocate_async"}
"""``trainer.v1.trainer_mode`` values that select a ToR trainer -> the verl trainer mode each one extends (and
presents itself as to verl's mode-keyed logic)."""

TOR_TRAINER_MODE = "tor_sync"
"""The default ToR trainer mode (the recipes' and ``verl_tor/recipes/config/tor_trainer.yaml``'s)."""

SEPARATE_ASYNC_REASON = (
    "verl's separate_async trainer computes the old-policy log-probs of the 2nd..Nth mini-batch of a parameter-sync "
    "cycle by swapping the π_old weights in and out inside PPOTrainerSeparateAsync._compute_old_log_prob; ToR's "
    "image-free pass runs later, in _compute_advantage, with the current weights, so S_t would compare two different "
    "policies. ToR would have to score the image-free view inside that π_old window (the stage split into scoring and "
    "selection), which verl_tor does not do"
)
"""Why ``separate_async`` is refused (``validate_tor_config``)."""

_NO_SUM_PI_SQUARED = (
    "verl's V1 _compute_advantage never reads sum_pi_squared from TransferQueue (even with "
    "actor.calculate_sum_pi_squared=true), so the estimator raises AssertionError at step 1, with or without ToR"
)
REFUSED_ESTIMATORS: dict[str, str] = {
    "remax": "verl's V1 _compute_advantage never passes reward_baselines (the V1 trainer has no ReMax greedy-baseline "
    "rollout), so compute_remax_outcome_advantage raises TypeError at step 1, with or without ToR",
    "gdpo": "verl's V1 _compute_advantage hands the estimator only what it reads from TransferQueue (uid, "
    "response_mask, rm_scores, log-probs, values): with algorithm.gdpo_reward_keys set, compute_gdpo_outcome_advantage "
    "raises KeyError on the missing batch['prompts'] (and the per-component rewards it normalises never reach it), "
    "without them AssertionError, at step 1, with or without ToR",
    "optimal_token_baseline": _NO_SUM_PI_SQUARED,
    "tir_optimal_token_baseline": _NO_SUM_PI_SQUARED,
}
"""Advantage estimators registered in verl that its own V1 trainer cannot run (checked on CPU by
``tests/test_estimator_matrix_on_cpu.py``, ToR off): ToR refuses them before the first rollout instead."""

CRITIC_ESTIMATORS = frozenset({"gae"})
"""Estimators whose per-token advantages come from a critic: refused unless ``tor.allow_gae=true``."""

TOP_P_STRATEGIES = ("fsdp", "fsdp2")
"""Actor strategies whose engine (``FSDPEngineWithLMHead``) carries the top-p entropy hook
(``verl_tor.integration.engine``)."""


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
    if mode in ("separate_async", "tor_separate_async"):
        raise ToRConfigError(
            f"tor.enable=true with trainer.v1.trainer_mode={mode!r}: {SEPARATE_ASYNC_REASON}. "
            f"Fix: use trainer.v1.trainer_mode=tor_colocate_async (or tor_sync)."
        )
    if mode not in TOR_TRAINER_MODES:
        tor_mode = f"tor_{mode}" if f"tor_{mode}" in TOR_TRAINER_MODES else TOR_TRAINER_MODE
        raise ToRConfigError(
            f"tor.enable=true but trainer.v1.trainer_mode={mode!r}: that trainer never runs the ToR stage and "
            f"would train plain GRPO/DAPO. Fix: set trainer.v1.trainer_mode={tor_mode}."
        )
    check_adv_estimator(str(config.algorithm.adv_estimator), tor)
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


def check_adv_estimator(adv_estimator: str, tor: ToRConfig) -> None:
    """Raise ``ToRConfigError`` when ToR cannot (or, for a critic, should not by default) reweight this estimator.

    Every other estimator in verl's registry, and any a user registers, is accepted: its advantages are per-token
    tensors the stage multiplies by w_t (``apply=advantage``) or leaves for the loss wrapper (``apply=loss``).
    """
    if adv_estimator in REFUSED_ESTIMATORS:
        raise ToRConfigError(
            f"tor.enable=true with algorithm.adv_estimator={adv_estimator!r}: {REFUSED_ESTIMATORS[adv_estimator]}. "
            "ToR refuses it here so the run does not die after its first rollout. Fix: use an estimator verl's V1 "
            "trainer runs (grpo, rloo, reinforce_plus_plus, opo, gpg, ...)."
        )
    if adv_estimator in CRITIC_ESTIMATORS and not tor.allow_gae:
        raise ToRConfigError(
            f"tor.enable=true with algorithm.adv_estimator={adv_estimator!r}: a critic's per-token advantages "
            "multiplied by ToR's 0/γ weights lose most of their per-token signal and no longer have the whitened "
            "mean 0 / std 1, while the critic still trains on every token; the paper studies outcome rewards "
            "(GRPO/DAPO). Fix: use an outcome estimator (e.g. grpo), or set tor.allow_gae=true to do it anyway."
        )


def _distillation_enabled(config: Any) -> bool:
    distill = config.get("distillation", None)
    return bool(distill is not None and distill.get("enabled", distill.get("enable", False)))


def _uses_fused_kernels(config: Any) -> bool:
    model = config.actor_rollout_ref.model
    return bool(model.get("use_fused_kernels", False))


class ToRTrainerMixin:
    """The ToR overrides, mixed in front of a verl trainer class (``build_trainer_class``).

    ``__init__`` validates the ``tor`` block and checks the plugin; ``init`` builds the stage (and installs the loss
    wrapper for ``apply=loss``); ``_compute_old_log_prob`` asks the engine for the top-p entropy when configured;
    ``_compute_advantage`` runs verl's advantage, then the stage. With ``tor.enable=false`` every override delegates
    unchanged, so the run is bit-identical to verl's own trainer of the same mode.
    """

    __verl_tor__ = True
    verl_trainer_mode: str = "sync"
    """The verl trainer mode this class extends and presents itself as (set per class by the builder)."""

    def __init__(self, config):
        from verl_tor.integration.hooks import assert_ready

        self.tor_config = validate_tor_config(config)
        if self.tor_config.enable:
            assert_ready()
        self.tor_stage = None
        super().__init__(config)

    # verl keys its async machinery on `self.trainer_mode` and reads `trainer.v1.<trainer_mode>`: present the
    # verl mode this trainer extends; PPOTrainer.__init__'s assignment of the configured name lands in the setter.
    @property
    def trainer_mode(self) -> str:
        return self.verl_trainer_mode

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
        # Ask the engine hook (verl_tor.integration.plugin) for the paper's top-p entropy in this pass only; the update
        # pass must keep verl's differentiable full entropy for its entropy bonus.
        # (The stage sets the same flag on its image-free pass under tor.sensitivity=entropy_diff, so both entropies
        # S_t compares are top-p ones.)
        from verl_tor.stage import TOP_P_FLAG

        batch.extra_info[TOP_P_FLAG] = self.tor_config.entropy_top_p
        try:
            return super()._compute_old_log_prob(batch, metrics)
        finally:
            batch.extra_info.pop(TOP_P_FLAG, None)

    def _compute_advantage(self, batch, metrics):
        batch = super()._compute_advantage(batch, metrics)
        if self.tor_stage is None:
            return batch
        return self.tor_stage.run(batch, metrics, self.timing_raw, step=self.global_steps)


def build_trainer_class(mode: str = TOR_TRAINER_MODE):
    """Define and register the ToR trainer ``mode`` (a key of ``TOR_TRAINER_MODES``; idempotent).

    The class is ``ToRTrainerMixin`` in front of the class verl registers for the mode it extends
    (``PPOTrainerSync`` for ``tor_sync``, ``PPOTrainerColocateAsync`` for ``tor_colocate_async``), named
    ``ToRTrainer<Sync|ColocateAsync>``. Imports verl's V1 trainer.
    """
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, get_trainer_cls, register_trainer

    if mode not in TOR_TRAINER_MODES:
        raise ValueError(f"{mode!r} is not a ToR trainer mode. Fix: choose one of {', '.join(TOR_TRAINER_MODES)}.")
    existing = TRAINER_REGISTRY.get(mode)
    if existing is not None:
        if getattr(existing, "__verl_tor__", False):
            return existing
        raise RuntimeError(
            f"verl trainer mode {mode!r} is already registered to {existing.__module__}.{existing.__name__}; "
            "verl_tor cannot register its ToR trainer. Uninstall the other plugin."
        )
    verl_mode = TOR_TRAINER_MODES[mode]
    base = get_trainer_cls(verl_mode)
    name = "ToRTrainer" + base.__name__.removeprefix("PPOTrainer")
    cls = type(
        name,
        (ToRTrainerMixin, base),
        {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"verl's ``{verl_mode}`` trainer ({base.__name__}) with the ToR stage after the advantage.",
            "verl_trainer_mode": verl_mode,
        },
    )
    register_trainer(mode)(cls)
    globals()[name] = cls  # importable by name (pickling, tracebacks)
    return cls


def build_trainer_classes() -> dict[str, type]:
    """Register every ToR trainer mode (``TOR_TRAINER_MODES``); returns mode -> class."""
    return {mode: build_trainer_class(mode) for mode in TOR_TRAINER_MODES}


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
            f"remove. Fix: train a vision-language model ({SUPPORTED_MODELS}), or set tor.mode=reasoning_only."
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
