"""Visual sensitivity S_t of each response token: how much the old policy's belief in it depends on the image."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["SENSITIVITY_FNS", "compute_visual_sensitivity"]


def _abs_log_ratio(lp_img, lp_noimg, h_img, h_noimg):
    # Paper, Eq. for S_t: |log π(o_t | I, q, o_<t) − log π(o_t | ∅, q, o_<t)|
    return (lp_img - lp_noimg).abs()


def _prob_diff(lp_img, lp_noimg, h_img, h_noimg):
    return (lp_img.exp() - lp_noimg.exp()).abs()


def _entropy_diff(lp_img, lp_noimg, h_img, h_noimg):
    if h_img is None or h_noimg is None:
        raise ValueError(
            "sensitivity='entropy_diff' needs the entropy of both passes (entropy=..., noimg_entropy=...)"
        )
    return (h_img - h_noimg).abs()


def _k3(lp_img, lp_noimg, h_img, h_noimg):
    # k3 estimator of KL(π_img || π_noimg) from tokens sampled with the image: r = log π_noimg/π_img,
    # k3 = e^r − r − 1 >= 0. Clamped like verl's low_var_kl (and PAPO/VPPO): r to [-20, 20], k3 to [0, 10].
    r = (lp_noimg - lp_img).clamp(-20.0, 20.0)
    return (r.exp() - r - 1.0).clamp(0.0, 10.0)


SENSITIVITY_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "abs_log_ratio": _abs_log_ratio,
    "prob_diff": _prob_diff,
    "entropy_diff": _entropy_diff,
    "k3": _k3,
}
"""Registry: ``tor.sensitivity`` name -> score function (kept equal to ``config.CHOICES['sensitivity']``)."""


def compute_visual_sensitivity(
    old_log_prob: torch.Tensor,
    noimg_log_prob: torch.Tensor,
    method: str = "abs_log_ratio",
    entropy: torch.Tensor | None = None,
    noimg_entropy: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token visual sensitivity S_t.

    Args:
        old_log_prob: (B, T) log π_old(o_t | I, q, o_<t), nats.
        noimg_log_prob: (B, T) log π_old(o_t | ∅, q, o_<t), the same tokens scored without the image.
        method: one of ``SENSITIVITY_FNS``.
        entropy, noimg_entropy: (B, T) per-token entropies of both passes (only for ``entropy_diff``).
        response_mask: (B, T) 1 for valid response tokens; masked positions get 0.
    Returns:
        (B, T) float32, >= 0.
    """
    if method not in SENSITIVITY_FNS:
        raise ValueError(f"unknown sensitivity method {method!r}; choose one of {sorted(SENSITIVITY_FNS)}")
    if old_log_prob.shape != noimg_log_prob.shape:
        raise ValueError(f"shape mismatch: old_log_prob {tuple(old_log_prob.shape)} vs {tuple(noimg_log_prob.shape)}")
    h_img = entropy.float() if entropy is not None else None
    h_noimg = noimg_entropy.float() if noimg_entropy is not None else None
    score = SENSITIVITY_FNS[method](old_log_prob.float(), noimg_log_prob.float(), h_img, h_noimg)
    if response_mask is not None:
        score = torch.where(response_mask.bool(), score, torch.zeros((), dtype=score.dtype))
    return score
