"""Per-token entropy of the policy: full vocabulary, and the paper's top-p truncated entropy (chunked, no grad)."""

from __future__ import annotations

import torch

__all__ = ["compute_entropy_from_logits", "compute_top_p_entropy_from_logits"]

DEFAULT_CHUNK_SIZE = 256
"""Rows of logits processed at once by the top-p entropy. 256 rows × 151,936 (Qwen's vocab) × 4 B ≈ 155 MB per
float32 temporary, so the sort's few temporaries stay well under the logits of a 4k-token micro-batch (2.5 GB)."""


def compute_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary entropy H = -Σ_v p_v log p_v.

    Args:
        logits: (..., V) unnormalised scores (any float dtype; computed in float32).
    Returns:
        (...) float32 entropy in nats.
    """
    logits = logits.float()
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def _top_p_entropy_chunk(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(n, V) -> (n,): entropy of the smallest top-probability set with cumulative mass >= top_p, renormalised."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
    del probs
    # token i is kept iff the mass strictly before it is < top_p (so the top token is always kept)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    kept = torch.where(mass_before < top_p, sorted_p, torch.zeros((), dtype=sorted_p.dtype))
    del mass_before, sorted_p
    z = kept.sum(dim=-1, keepdim=True)  # renormaliser (>= top_p, or the top token's mass)
    q = kept / z
    # H(q) = -Σ q log q, with 0 log 0 = 0
    return -(torch.where(q > 0, q * torch.log(q), torch.zeros((), dtype=q.dtype))).sum(dim=-1)


@torch.no_grad()
def compute_top_p_entropy_from_logits(
    logits: torch.Tensor, top_p: float, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """The paper's reasoning-token score: entropy of the top-p (nucleus) truncated, renormalised distribution.

    Sort the probabilities, keep the smallest prefix whose cumulative probability is >= ``top_p``, renormalise,
    take the entropy. Computed chunk by chunk over the flattened rows under ``no_grad``, so the extra memory is a
    few (chunk_size, V) float32 temporaries whatever the number of tokens.

    Args:
        logits: (..., V) unnormalised scores.
        top_p: p in (0, 1]; 1.0 gives the full-vocabulary entropy.
        chunk_size: rows per chunk (see ``DEFAULT_CHUNK_SIZE``).
    Returns:
        (...) float32 entropy in nats (0 when a single token holds >= p of the mass).
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], chunk_size):
        out[start : start + chunk_size] = _top_p_entropy_chunk(flat[start : start + chunk_size], top_p)
    return out.reshape(shape)
