"""Today's top-p entropy (``verl_tor/ops/entropy.py`` at commit 3f33d2f, the same code as at 56149d3, where issue 19's
GPU numbers were measured), kept verbatim as the "before" of ``bench_entropy.py`` and ``bench_gpu.py``: escalating
``topk`` (256, 4096, 32768, full sort) over chunks of 256 rows, a host decision (``nonzero``/``any``) per chunk and
per level.
Not used by verl_tor itself; do not edit (it is the reference the new implementation is measured against).
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_ENTROPY_CHUNK_SIZE", "compute_entropy_from_logits", "compute_top_p_entropy_from_logits"]

DEFAULT_ENTROPY_CHUNK_SIZE = 256
"""Rows (tokens) per chunk. With Qwen2.5-VL's vocabulary V = 151,936 one float32 (256, V) buffer is 156 MB: the
top-p path holds the chunk's float32 probabilities plus the ``topk`` candidates (measured extra peak on CPU: ~2 such
buffers when rows are peaked, ~4 when every row is flat and needs the full sort, which runs ``_SORT_ROWS`` rows at a
time), i.e. 0.3-0.6 GB on top of the logits, whatever the number of tokens; each chunk is still ~39M elements,
enough to keep a GPU busy (4096 tokens = 16 chunks)."""

_SORT_ROWS = 32
"""Rows fully sorted at once: a sort of (rows, V) float32 holds values, int64 indices and the cumulative sums, ~7
float32 buffers' worth, so 32 rows (~140 MB at V = 151,936) bounds the rare full-sort path below the chunk itself."""

TOP_P_TOLERANCE = 2.0**-21
"""Relative tolerance of the nucleus cut, 8 float32 ulps (4.8e-7): token i is kept iff the probability mass strictly
before it is < p (1 - 2^-21), i.e. a mass within 2^-21 (relative) of p counts as having reached p. The definition's
boundary is an exact comparison that float32 cannot make: masses that are equal in the intended probabilities
(the row 0.5, 0.3, 0.15, 0.05 at p = 0.8, whose first two tokens hold exactly 0.8: keep two) come out a few ulps
apart, on either side. The mass at the cut is off its float64 value by at most 3.5 ulps (measured on rows of 12 to
151,936 tokens), so 8 ulps decides such ties by the definition; ties between equal logits are exact at any
magnitude (bit-equal probabilities). The price falls on continuous rows whose mass before the cut token lies within
the tolerance of p, which drop that token: of 2,000 flat rows, H moved by > 1e-4 against the float64 definition in
0 with no tolerance, 9 at 2^-21, 21 at 2^-20 (``benchmarks/bench_entropy_exactness.py``)."""

_TOP_P_CANDIDATES = (256, 4096, 32768)
"""How many top tokens the fast path looks at, escalating, before a full sort of a row. At p = 0.95 an LLM's
next-token distribution almost always puts the mass in a handful of tokens, so nearly every row stops at 256; a
flat row goes on to 4096 and 32768 (``topk`` costs 0.04 / 0.19 / ~0.5 s per 256 x 151,936 rows on 2 CPU cores,
against 1.6 s for the full sort) and only rows still short are sorted in full. Exact at every level (see
``compute_top_p_entropy_from_logits``)."""


def compute_entropy_from_logits(logits: torch.Tensor, chunk_size: int = DEFAULT_ENTROPY_CHUNK_SIZE) -> torch.Tensor:
    """Full-vocabulary entropy H = -Σ_v p_v log p_v of softmax(logits), in nats.

    Args:
        logits: ``(..., V)`` unnormalised log-probabilities, any float dtype; ``-inf`` entries (masked vocabulary)
            are allowed and contribute 0.
        chunk_size: rows of the flattened ``(rows, V)`` view processed at a time; extra memory is ~4 float32
            ``(chunk_size, V)`` buffers (log-probs, probs, their product, the masked product).

    Returns:
        ``(...)`` float32 entropy in nats, on ``logits.device``. Differentiable (no ``no_grad``): it matches verl's
        ``entropy_from_logits`` and can stand in for it.
    """
    _check_chunk_size(chunk_size)
    rows = logits.reshape(-1, logits.shape[-1])  # (R, V)
    parts = [_compute_entropy_chunk(rows[i : i + chunk_size]) for i in range(0, rows.shape[0], chunk_size)]
    out = torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)
    return out.reshape(logits.shape[:-1])


@torch.no_grad()
def compute_top_p_entropy_from_logits(
    logits: torch.Tensor, top_p: float, chunk_size: int = DEFAULT_ENTROPY_CHUNK_SIZE
) -> torch.Tensor:
    """Entropy of the top-p truncated, renormalised next-token distribution (the paper's reasoning score), in nats.

    Per row: sort the probabilities descending, p_(1) >= p_(2) >= ...; keep token i iff the cumulative probability
    *before* it, Σ_{j<i} p_(j), is < ``top_p`` (so the top token is always kept and the kept prefix is the smallest
    one with mass >= ``top_p``), where a mass within ``TOP_P_TOLERANCE`` (2^-21, relative) of ``top_p`` counts as
    reaching it, so that masses equal in the intended probabilities are decided by the definition, not by float32
    rounding; renormalise the kept mass Z to 1 and return -Σ_kept (p/Z) log(p/Z). One kept token gives exactly 0
    (an exact tie for ``select.py``'s seeded tie-breaking). ``top_p = 1`` returns the full entropy.

    Speed, exactly: a full sort of V = 151,936 values per token dominates. Instead each row takes its top k
    probabilities (``torch.topk``, sorted; k = 256, then 4096, 32768 for the rows still short, see
    ``_TOP_P_CANDIDATES``); once their mass reaches the cut the kept prefix lies inside them (every later token has
    cumulative-before >= the cut), so the answer is the one a full sort gives. A row skips a level that its lower
    bound on the kept count already exceeds, and rows short at every level are sorted in full. Ties at the cut do not
    matter: tied tokens have equal probability, so any order of them keeps the same multiset of probabilities. On 2 CPU
    cores and 512 x 151,936 logits: 2.5-7x faster than a full sort for LLM-like rows (mostly peaked, some flat), up to
    ~15% slower when every row is nearly uniform.

    Args:
        logits: ``(..., V)`` unnormalised log-probabilities, any float dtype (bf16/fp16/fp32); ``-inf`` allowed.
        top_p: p in (0, 1].
        chunk_size: rows of the flattened ``(rows, V)`` view processed at a time; peak extra memory is 2-4 float32
            ``(chunk_size, V)`` buffers (see ``DEFAULT_ENTROPY_CHUNK_SIZE``).

    Returns:
        ``(...)`` float32 entropy in nats, on ``logits.device``; no gradient (runs under ``torch.no_grad``).
    """
    top_p = float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} is invalid. Fix: give p in (0, 1] (paper: 0.95).")
    _check_chunk_size(chunk_size)
    if top_p >= 1.0:
        # Nothing is truncated; the full formula avoids the cumulative sum's rounding deciding the last tokens.
        return compute_entropy_from_logits(logits, chunk_size=chunk_size)
    rows = logits.reshape(-1, logits.shape[-1])  # (R, V)
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, rows.shape[0], chunk_size):
        out[i : i + chunk_size] = _compute_top_p_entropy_chunk(rows[i : i + chunk_size], top_p)
    return out.reshape(logits.shape[:-1])


def _compute_entropy_chunk(logits: torch.Tensor) -> torch.Tensor:
    """(C, V) logits -> (C,) float32 entropy."""
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (C, V)
    probs = log_probs.exp()
    # 0 * log 0 = 0: a -inf logit gives p = 0 and log p = -inf, whose product would be NaN.
    # clamp: a dominant token's log-softmax can round to a hair above 0, making H a hair negative.
    return (-torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=-1)).clamp_min(0.0)


def _compute_top_p_entropy_chunk(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(C, V) logits -> (C,) float32 top-p entropy: escalating ``topk``, full sort only for rows that need it."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (C, V), no separate float32 copy
    num_rows, vocab = probs.shape
    # The cut compares sums of these probabilities with p times their own row sum, not with p: softmax rounds its
    # normaliser once per row, which scales every probability of the row alike and cancels in that ratio. (The
    # former exp(log_softmax) against p carried it: the mass at the cut landed up to 128 float32 ulps off its float64
    # value, against <= 9 now; ``benchmarks/bench_entropy_exactness.py``.) Keep token i iff the mass before it is
    # < p (1 - TOP_P_TOLERANCE) of the row's mass.
    threshold = probs.sum(dim=-1).double() * (top_p * (1.0 - TOP_P_TOLERANCE))  # (C,) float64
    entropy = torch.empty(num_rows, dtype=torch.float32, device=probs.device)
    pending = torch.ones(num_rows, dtype=torch.bool, device=probs.device)  # (C,) rows not done yet
    # A lower bound on how many tokens a pending row keeps: after a level of k tokens with mass m and smallest
    # probability τ, the rest are each <= τ, so reaching the threshold needs >= k + (threshold - m) / τ tokens. Rows
    # whose bound exceeds a level skip it (it cannot succeed there), so flat rows do not pay for every level before
    # their sort.
    needed = torch.zeros(num_rows, dtype=torch.float64, device=probs.device)  # (C,)
    for k in (*(k for k in _TOP_P_CANDIDATES if k < vocab), vocab):
        final = k == vocab
        ids = (pending if final else pending & (needed <= k)).nonzero().squeeze(1)  # ascending row ids
        if ids.numel() == 0:
            continue
        if final:  # the full sort decides, even where float rounding left the total mass just below the cut
            for sub in ids.split(_SORT_ROWS):
                ordered = torch.sort(probs[sub], dim=-1, descending=True).values  # (<= _SORT_ROWS, V)
                entropy[sub] = _compute_truncated_entropy(ordered, threshold[sub])[0]
            break
        rows = probs if ids.numel() == num_rows else probs[ids]  # (C', V); all rows: no gather
        top = torch.topk(rows, k, dim=-1, largest=True, sorted=True).values  # (C', k), descending
        h, reached, mass = _compute_truncated_entropy(top, threshold[ids])
        entropy[ids[reached]] = h[reached]
        pending[ids[reached]] = False
        short = ~reached
        needed[ids[short]] = k + (threshold[ids[short]] - mass[short]) / top[short, -1].double().clamp_min(1e-45)
        if not bool(pending.any()):
            break
    return entropy


def _compute_truncated_entropy(
    sorted_probs: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-p entropy from a descending prefix of each row's probabilities.

    Args:
        sorted_probs: ``(C, K)`` the K largest probabilities of each row, descending (K = V for a full sort).
        threshold: ``(C,)`` float64, p (1 - ``TOP_P_TOLERANCE``) times the row's summed probabilities.

    Returns:
        ``(C,)`` float32 entropy of the kept tokens, ``(C,)`` bool: whether the prefix's mass reached the threshold
        (then the kept set lies inside it and the entropy is exact), and ``(C,)`` float64: the prefix's mass.
    """
    # Cumulative mass in float64, so the sum itself adds no rounding that could move a token across the cut.
    # Token i + 1 is kept iff the mass up to and including token i is below the threshold (the mass strictly before
    # it; `cumulative - p` would round); the top token always is (nothing before it, threshold > 0).
    cumulative = sorted_probs.cumsum(dim=-1, dtype=torch.float64)  # (C, K)
    num_kept = 1 + (cumulative[:, :-1] < threshold[:, None]).sum(dim=-1)  # (C,): the kept tokens are a prefix
    kept_mass = cumulative.gather(1, (num_kept - 1).unsqueeze(1)).squeeze(1).float()  # Z, (C,)
    width = int(num_kept.max()) if num_kept.numel() else 0
    kept = sorted_probs[:, :width]  # (C, width)
    # H = -Σ q log q with q = p / Z: every term is >= 0 (Z >= p, so q <= 1 after rounding too), no cancellation, and
    # one kept token gives q = p / p = 1 and log 1 = 0, exactly 0. (log Z - Σ p log p / Z left +-3e-8 there, noise
    # that outranks the exact zeros of other rows and defeats select.py's seeded tie-breaking.)
    q = kept / kept_mass[:, None]
    in_prefix = torch.arange(width, device=kept.device) < num_kept[:, None]
    entropy = -torch.where(in_prefix & (q > 0), q * q.log(), 0.0).sum(dim=-1) + 0.0  # + 0.0: no -0.0
    return entropy, cumulative[:, -1] >= threshold, cumulative[:, -1]


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid. Fix: give a positive number of rows.")
