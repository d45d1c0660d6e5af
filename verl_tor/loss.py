"""``tor.apply=loss``: a loss wrapper for verl's actor that multiplies the ToR token weights into the policy loss.

verl's registered policy losses never see the batch; their only per-token channel is ``rollout_is_weights``
(each of them multiplies its per-token surrogate by it before aggregation). The wrapper therefore folds
``tor_weights`` into ``rollout_is_weights`` and delegates to verl's own ``ppo_loss``: the KL and entropy terms,
which ``ppo_loss`` adds outside the policy loss, stay unweighted (paper: only the clipped surrogate is reweighted),
and the aggregation still averages over all response tokens.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "TOR_WEIGHTS_KEY",
    "ADVANTAGE_EXACT_LOSS_MODES",
    "LOSS_WRAPPABLE_LOSS_MODES",
    "fold_tor_weights",
    "tor_ppo_loss",
    "build_tor_loss_fn",
]

TOR_WEIGHTS_KEY = "tor_weights"
"""Per-token weights w_t, stored per trajectory (nested, response length) by the ToR stage."""

ADVANTAGE_EXACT_LOSS_MODES = frozenset({"vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "cispo"})
"""Losses where ``A_t·w_t`` gives exactly ``w_t·surrogate_t`` for w_t >= 0: each is positively homogeneous in the
per-token advantage (the clip / dual-clip / soft gate / trust-region mask decisions depend only on the sign of A_t,
and w_t = 0 zeroes the term either way). Not ``clip_cov``/``kl_cov`` (they pick tokens by a covariance with A_t) nor
``dro``, ``geo_mean``, ``bypass_mode``: use ``tor.apply=loss`` (or nothing) for those."""

LOSS_WRAPPABLE_LOSS_MODES = frozenset(
    {"vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "dro", "cispo"}
)
"""Losses that multiply their per-token surrogate by ``rollout_is_weights``: ``tor.apply=loss`` reweights them.
``geo_mean`` turns the weights into a sequence-level geometric mean and ``bypass_mode`` recomputes its own, so a
token weight cannot be expressed through them."""


def fold_tor_weights(data: Any) -> Any:
    """Return ``data`` with ``rollout_is_weights <- rollout_is_weights · tor_weights`` (or ``tor_weights``).

    Args:
        data: a verl micro-batch ``TensorDict`` whose per-token fields are nested (jagged) tensors of response
            length, or plain ``(bsz, response_len)`` tensors. Not modified: a shallow copy is returned.
    """
    if TOR_WEIGHTS_KEY not in data.keys():
        return data
    weights = data[TOR_WEIGHTS_KEY]
    data = data.copy()  # shallow: the worker may reuse the micro-batch (ppo_epochs > 1)
    if "rollout_is_weights" in data.keys():
        data["rollout_is_weights"] = _multiply_like(data["rollout_is_weights"], weights)
    else:
        data["rollout_is_weights"] = weights
    del data[TOR_WEIGHTS_KEY]
    return data


def _multiply_like(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise ``a·b`` for two tensors of the same (possibly jagged) layout.

    Two jagged tensors built separately carry different ragged-dimension ids and refuse to broadcast, so multiply
    their values and re-wrap with ``a``'s offsets (after checking they agree).
    """
    if a.is_nested:
        if not torch.equal(a.offsets(), b.offsets()):
            raise ValueError("tor_weights and rollout_is_weights have different per-row lengths")
        lengths = a.offsets().diff()
        return torch.nested.nested_tensor_from_jagged(
            a.values() * b.values().to(a.dtype),
            a.offsets(),
            min_seqlen=int(lengths.min()) if len(lengths) else 0,
            max_seqlen=int(lengths.max()) if len(lengths) else 0,  # else to_padded_tensor pads to the total length
        )
    return a * b.to(a.dtype)


def tor_ppo_loss(config: Any, model_output: Any, data: Any, dp_group: Any = None):
    """verl's ``ppo_loss`` with the ToR weights folded into ``rollout_is_weights``; same signature and return."""
    from verl.workers.utils.losses import ppo_loss

    return ppo_loss(config, model_output, fold_tor_weights(data), dp_group=dp_group)


def build_tor_loss_fn(actor_config: Any):
    """The callable to hand to ``actor_rollout_wg.set_loss_fn`` (pickled to every actor worker).

    Args:
        actor_config: verl's ``ActorConfig`` dataclass (``omega_conf_to_dataclass(config.actor_rollout_ref.actor)``),
            built the same way verl's worker builds its own ``partial(ppo_loss, config=actor_config)``.
    """
    from functools import partial

    return partial(tor_ppo_loss, config=actor_config)
