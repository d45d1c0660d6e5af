"""Visual sensitivity S_t of each response token: how much the old policy's belief in it depends on the image.

ToR's perception tokens T_p are the top ρ_p by S_t (paper §3.2). The paper's S_t is the absolute log-ratio between
the policy with and without the image, |log π(o_t | I, q, o_<t) − log π(o_t | ∅, q, o_<t)|; ``tor.sensitivity``
also offers the variants of its ablation. ``SENSITIVITY_FNS`` is the registry, kept equal to
``config.CHOICES['sensitivity']`` by a test.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["SENSITIVITY_FNS", "compute_visual_sensitivity"]

_K3_LOG_RATIO_CLAMP = 20.0
"""|r| bound before exp in k3: verl's ``low_var_kl`` clamps the log-ratio to [-20, 20] (e^20 ≈ 5e8 stays finite)."""
_K3_CLAMP = 10.0
"""Upper bound on k3, as verl's ``low_var_kl`` (and PAPO/VPPO) clamp it: one token cannot dominate the ranking."""


def _score_abs_log_ratio(old_log_prob, noimg_log_prob, entropy, noimg_entropy):
    # Paper, S_t = |log π(o_t|I,q,o_<t) − log π(o_t|∅,q,o_<t)|: symmetric, so tokens the image makes less likely
    # count as image-dependent too.
    return (old_log_prob - noimg_log_prob).abs()


def _score_prob_diff(old_log_prob, noimg_log_prob, entropy, noimg_entropy):
    # |Δp| in probability space: damps the large log-ratios of tokens that are unlikely either way.
    return (old_log_prob.exp() - noimg_log_prob.exp()).abs()


def _score_entropy_diff(old_log_prob, noimg_log_prob, entropy, noimg_entropy):
    # |H_img − H_noimg|: how much the image changes the policy's uncertainty at t, whatever token was sampled.
    return (entropy - noimg_entropy).abs()


def _score_k3(old_log_prob, noimg_log_prob, entropy, noimg_entropy):
    # k3 estimator of KL(π_img ‖ π_noimg) from tokens sampled with the image: r = log π_noimg/π_img, k3 = e^r − r − 1
    # (>= 0, unbiased, low variance). Clamped like verl's low_var_kl: r to [-20, 20], k3 to [0, 10].
    r = (noimg_log_prob - old_log_prob).clamp(-_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
    return (r.exp() - r - 1.0).clamp(0.0, _K3_CLAMP)


SENSITIVITY_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "abs_log_ratio": _score_abs_log_ratio,
    "prob_diff": _score_prob_diff,
    "entropy_diff": _score_entropy_diff,
    "k3": _score_k3,
}
"""Registry: ``tor.sensitivity`` name -> ``fn(old_log_prob, noimg_log_prob, entropy, noimg_entropy) -> (B, T)`` on
float32 tensors (the entropies are None except for ``entropy_diff``)."""

_NEEDS_ENTROPY = frozenset({"entropy_diff"})


def compute_visual_sensitivity(
    old_log_prob: torch.Tensor,
    noimg_log_prob: torch.Tensor,
    method: str = "abs_log_ratio",
    entropy: torch.Tensor | None = None,
    noimg_entropy: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token visual sensitivity S_t >= 0.

    Args:
        old_log_prob: ``(B, T)`` log π_old(o_t | I, q, o_<t) of the sampled tokens with the image, nats.
        noimg_log_prob: ``(B, T)`` log π(o_t | ∅, q, o_<t), the same tokens scored on the image-free view, nats.
        method: a key of ``SENSITIVITY_FNS``: ``abs_log_ratio`` (paper, nats), ``prob_diff`` (probability),
            ``entropy_diff`` (nats) or ``k3`` (nats, clamped to [0, 10]).
        entropy: ``(B, T)`` entropy of the policy with the image, nats; required for ``entropy_diff`` only.
        noimg_entropy: ``(B, T)`` entropy on the image-free view, nats; required for ``entropy_diff`` only.
        response_mask: ``(B, T)`` bool or 0/1, valid response tokens; other positions return 0 (even if the
            inputs there are garbage). None treats every position as valid.

    Returns:
        ``(B, T)`` float32 S_t in the method's units, on ``old_log_prob.device``.
    """
    if method not in SENSITIVITY_FNS:
        raise ValueError(f"sensitivity method {method!r} is unknown. Fix: choose one of {', '.join(SENSITIVITY_FNS)}.")
    tensors = {"old_log_prob": old_log_prob, "noimg_log_prob": noimg_log_prob}
    if method in _NEEDS_ENTROPY:
        missing = [name for name, t in (("entropy", entropy), ("noimg_entropy", noimg_entropy)) if t is None]
        if missing:
            raise ValueError(
                f"sensitivity method {method!r} needs {' and '.join(missing)}. Fix: compute the entropy of both "
                "passes (the image-free pass runs with calculate_entropy=True when tor.sensitivity=entropy_diff), "
                "or choose another tor.sensitivity."
            )
        tensors.update(entropy=entropy, noimg_entropy=noimg_entropy)
    if response_mask is not None:
        tensors["response_mask"] = response_mask
    for name, tensor in tensors.items():
        if tensor.shape != old_log_prob.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(old_log_prob.shape)}.")
    as_float = {name: t.to(torch.float32) for name, t in tensors.items() if name != "response_mask"}
    score = SENSITIVITY_FNS[method](
        as_float["old_log_prob"], as_float["noimg_log_prob"], as_float.get("entropy"), as_float.get("noimg_entropy")
    )
    if response_mask is None:
        return score
    valid = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    return torch.where(valid, score, 0.0)  # `where`, not `*`: NaN/inf on padding must not leak through
