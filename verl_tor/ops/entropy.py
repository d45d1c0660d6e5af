"""Per-token entropy of the policy from its logits: full vocabulary, and the paper's top-p truncated entropy.

ToR ranks reasoning tokens T_r by the old policy's entropy (paper §3.2). verl's old-log-prob pass already returns the
full-vocabulary entropy for free; ``tor.entropy=top_p`` swaps in the paper's truncated entropy (keep the smallest
top-probability prefix with mass >= p, renormalise, take H), computed where the logits are
(``verl_tor.integration.engine``).

Both functions compute in float32 whatever the logits' dtype (bf16 logits would lose ~3 digits in the sums), and
both work on flattened rows in chunks, so a (4096, 151936) logits tensor never needs a full float32 copy.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DEFAULT_ACCELERATOR_TOP_P_CHUNK_SIZE",
    "DEFAULT_ENTROPY_CHUNK_SIZE",
    "TOP_P_METHODS",
    "compute_entropy_from_logits",
    "compute_top_p_entropy_from_logits",
    "default_top_p_chunk_size",
]

DEFAULT_ENTROPY_CHUNK_SIZE = 256
"""Rows (tokens) per chunk. With Qwen2.5-VL's vocabulary V = 151,936 one float32 (256, V) buffer is 156 MB: the
top-p path holds the chunk's float32 probabilities plus the ``topk`` candidates (measured extra peak on CPU: ~2 such
buffers when rows are peaked, ~4 when every row is flat and needs the full sort, which runs ``_SORT_ROWS`` rows at a
time), i.e. 0.3-0.6 GB on top of the logits, whatever the number of tokens; each chunk is still ~39M elements,
enough to keep a GPU busy (4096 tokens = 16 chunks)."""

DEFAULT_ACCELERATOR_TOP_P_CHUNK_SIZE = 2048
"""Rows per chunk of the top-p entropy on a GPU: a float32 (2048, 151,936) block of probabilities is 1.2 GB, next to
the 5 GB of bf16 logits of a 16,384-token micro-batch (verl's ``max_token_len_per_gpu`` in the GPU recipes) that the
old-policy pass holds anyway; 311M elements per ``softmax``/``topk`` call keep an H200 saturated, and 8 chunks per
micro-batch leave 8 kernel batches to launch, not 64. 4,096 rows would halve the launches for another 1.2 GB."""

TOP_P_METHODS = ("escalate", "bracket", "radix")
"""The exact methods of ``compute_top_p_entropy_from_logits`` (see its docstring)."""

_BRACKET_SAMPLE = 4096
"""Probabilities per row sampled (strided) to estimate where a short row's cut falls (``"bracket"``): sorting 4,096
values per row is ~3 % of sorting V = 151,936, and the bracket around the estimate (+-4 standard deviations of the
sampled mass) is a few thousand tokens on rows whose nucleus holds tens of thousands."""

_BRACKET_SIGMAS = 4.0
"""Half-width of the bracket in standard deviations of the sampled mass estimate: wide enough that a miss (then a full
sort of that row) is rare, narrow enough that the bracket's sort stays a small fraction of V."""

_BRACKET_CANDIDATES = 30
"""Sample values inside the estimated bracket at which the exact mass above is measured (one ``searchsorted`` and one
``scatter_add`` over the rows) to narrow it: the bracket that gets sorted is ~1/31 of the estimate's."""

_BRACKET_MAX_FRACTION = 0.25
"""Rows whose bracket holds more than this share of V (nearly uniform rows) are sorted in full instead: a ``topk``
that wide costs about a sort, and it would set the width for every row of its chunk."""

_RADIX_BINS = 65536
"""Bins per histogram of the ``"radix"`` method: every bit pattern of a 16-bit float (bf16, fp16), or one half of a
float32's bits."""

_RADIX_MIN_VOCAB = 16384
"""Below this vocabulary ``"radix"`` sorts its short rows instead: a (rows, V) sort is then cheaper than the
(rows, 65,536) histogram arrays (single rows of 12 tokens took ~50 ms through the bins on CPU)."""

_RADIX_ROWS = 256
"""Short rows finished at once by ``"radix"`` off CPU: per row an int64 index (V x 8 bytes, 1.2 MB at V = 151,936,
freed before the bins) and ~6 float32/float64 (65,536)-bin arrays (~2.6 MB): ~0.7-0.8 GB for 256 rows, below the
top-k pass's float32 (2048, V) chunk (1.2 GB); no host decision inside, so the block size only sets the launches."""

_RADIX_CPU_ROWS = 32
"""The same on CPU, where float32 logits take the two-pass path with four float64 (rows, V) buffers (4.9 MB a row):
~0.16 GB for 32 rows."""

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
    logits: torch.Tensor, top_p: float, chunk_size: int | None = None, *, method: str | None = None
) -> torch.Tensor:
    """Entropy of the top-p truncated, renormalised next-token distribution (the paper's reasoning score), in nats.

    Per row: sort the probabilities descending, p_(1) >= p_(2) >= ...; keep token i iff the cumulative probability
    *before* it, Σ_{j<i} p_(j), is < ``top_p`` (so the top token is always kept and the kept prefix is the smallest
    one with mass >= ``top_p``), where a mass within ``TOP_P_TOLERANCE`` (2^-21, relative) of ``top_p`` counts as
    reaching it, so that masses equal in the intended probabilities are decided by the definition, not by float32
    rounding; renormalise the kept mass Z to 1 and return -Σ_kept (p/Z) log(p/Z). One kept token gives exactly 0
    (an exact tie for ``select.py``'s seeded tie-breaking). ``top_p = 1`` returns the full entropy.

    Speed, exactly: a full sort of V = 151,936 values per token dominates. Every method first takes each row's top
    k = 256 probabilities (``torch.topk``, sorted); once their mass reaches the cut the kept prefix lies inside them
    (every later token has cumulative-before >= the cut), so the answer is the one a full sort gives. Ties at the cut
    do not matter: tied tokens have equal probability, so any order of them keeps the same multiset of probabilities.
    They differ in how they finish the rows still short of p (flat rows, whose nucleus holds thousands of tokens):

    - ``"escalate"`` (CPU default): per chunk, ``topk`` of 4096, then 32768 for the rows still short, skipping a
      level a row's lower bound on its kept count already exceeds, then a full sort. Each level is a host decision
      (``nonzero``, ``any``), free on a CPU, where the work per level is what counts: on 2 cores and 512 x 151,936
      logits it is 2.5-7x faster than a full sort for LLM-like rows (``benchmarks/bench_entropy.py``).
    - ``"bracket"``: the 256-candidate pass runs over every chunk without a single host decision (the entropy of rows
      that reached p is written with ``torch.where``); then ONE ``nonzero`` over all rows finds the short ones, whose
      probabilities are recomputed in chunks (a softmax of the gathered logits) and finished without sorting V: a
      strided sample of 4,096 probabilities per row, sorted, estimates where the cut falls (+-4 standard deviations
      of the sampled mass); one ``searchsorted`` + ``scatter_add`` gives the exact float64 mass above 30 sample
      values in that range, which narrows it to a bracket (v_lo, v_hi] of a few thousand tokens whose mass above
      v_hi is < the cut and above v_lo reaches it; the kept set is every token above v_hi plus a prefix of the
      bracket, whose values alone are sorted (``topk``) and summed in float64. Rows whose bracket misses or is wider
      than a quarter of V (nearly uniform rows) get a full sort. Two host decisions per quarter chunk of short rows.
      Measured on an H200 (16,384 x 151,936 bf16): 2.6x the full entropy on LLM-like rows, 7.1x when half the rows
      are short, slower than a naive full sort there (``benchmarks/README.md``).
    - ``"radix"`` (default on any other device than CPU): the same top-k pass and ONE ``nonzero``; then the short
      rows are finished by a radix select on the logits' bits, no sort and no host decision at all: the probability
      order is the logit order, so a bf16/fp16 row is one histogram of counts over its 65,536 bit patterns (one
      ``scatter_add_`` of ones into (rows, 65,536) float32 bins), from which the masses n exp(l - max), their
      float64 cumulative sum from the largest logit down, the threshold logit, the tie rule at it (a count) and H
      all follow on the bins (``_finish_short_rows_radix``; float32 logits take two 16-bit passes). Why it is the
      default off CPU, by bytes moved per short row at V = 151,936 (not measured on a GPU yet: ``bench_gpu.py``
      measures it): ~6 MB over V (gather the bf16 row, an int64 index, one atomic add per token into the ~2,900
      distinct logits of a row, so little contention) and ~6 MB over the bins (13 float32/float64 passes of 65,536),
      ~12 MB in all, against ~25 MB plus a ``topk`` of the bracket's width (~3,200), a sample sort and ~33-bucket
      atomics for ``"bracket"``, and a segmented sort of V (keys + int64 indices, several passes) for a naive sort.
      At the rate the full entropy runs on the H200 (~45 bytes per logit in 46 ms for 16,384 rows: ~2.4 TB/s) that
      is ~5 us a short row: 9 % of rows short ("llm") adds ~7 ms to the ~45 ms top-k pass (~1.15x the full entropy),
      45 % ("wide") ~37 ms (~1.8x, more if the atomics cost more than their bytes), against 2.6x / 7.1x measured for
      ``"bracket"``. Its extra memory is the top-k pass's (a float32 (chunk, V) block: 1.2 GB at 2048 rows); the
      short rows add ~3 MB each, 256 at a time (``_RADIX_ROWS``): ~0.8 GB.

    Args:
        logits: ``(..., V)`` unnormalised log-probabilities, any float dtype (bf16/fp16/fp32); ``-inf`` allowed.
        top_p: p in (0, 1].
        chunk_size: rows of the flattened ``(rows, V)`` view processed at a time; ``None``: by device
            (``default_top_p_chunk_size``). Peak extra memory is 2-4 float32 ``(chunk_size, V)`` buffers.
        method: ``"escalate"``, ``"bracket"``, ``"radix"`` or ``None`` (by device: ``"escalate"`` on CPU, where it
            is the code measured since 3f33d2f, ``"radix"`` elsewhere). All give the same values: the same kept set
            (``"radix"`` decides it on exp(l - max) without the softmax's division, so a row can differ only where a
            mass lies within float32 rounding of the cut), H summed in another order (~1e-6 nats).

    Returns:
        ``(...)`` float32 entropy in nats, on ``logits.device``; no gradient (runs under ``torch.no_grad``).
    """
    top_p = float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} is invalid. Fix: give p in (0, 1] (paper: 0.95).")
    if chunk_size is None:
        chunk_size = default_top_p_chunk_size(logits.device)
    _check_chunk_size(chunk_size)
    if method is None:
        method = "escalate" if logits.device.type == "cpu" else "radix"
    if method not in TOP_P_METHODS:
        raise ValueError(
            f"method={method!r} is invalid. Fix: give one of {', '.join(map(repr, TOP_P_METHODS))} or None (by device)."
        )
    if top_p >= 1.0:
        # Nothing is truncated; the full formula avoids the cumulative sum's rounding deciding the last tokens.
        return compute_entropy_from_logits(logits, chunk_size=min(chunk_size, DEFAULT_ENTROPY_CHUNK_SIZE))
    rows = logits.reshape(-1, logits.shape[-1])  # (R, V)
    if method == "bracket":
        return _compute_top_p_entropy_bracketed(rows, top_p, chunk_size).reshape(logits.shape[:-1])
    if method == "radix":
        return _compute_top_p_entropy_radix(rows, top_p, chunk_size).reshape(logits.shape[:-1])
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, rows.shape[0], chunk_size):
        out[i : i + chunk_size] = _compute_top_p_entropy_chunk(rows[i : i + chunk_size], top_p)
    return out.reshape(logits.shape[:-1])


def default_top_p_chunk_size(device: torch.device | str) -> int:
    """Rows per chunk of the top-p entropy on ``device``: ``DEFAULT_ENTROPY_CHUNK_SIZE`` (256) on CPU, where a
    (256, V) float32 block (156 MB at V = 151,936) stays near the caches and larger chunks only add memory;
    ``DEFAULT_ACCELERATOR_TOP_P_CHUNK_SIZE`` (2048) elsewhere, where each chunk is a few kernel launches and 256-row
    chunks left the GPU idle between them (issue 19: 271-340 ms at chunk 256 against 118 ms at 4096 for the same
    work)."""
    return DEFAULT_ENTROPY_CHUNK_SIZE if torch.device(device).type == "cpu" else DEFAULT_ACCELERATOR_TOP_P_CHUNK_SIZE


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


def _compute_top_p_entropy_bracketed(rows: torch.Tensor, top_p: float, chunk_size: int) -> torch.Tensor:
    """(R, V) logits -> (R,) float32 top-p entropy with a fixed number of host decisions (the ``"bracket"`` method of
    ``compute_top_p_entropy_from_logits``): one over all rows, two per quarter chunk of rows short of p."""
    out, pending, top_mass, top_last = _run_top_k_pass(rows, top_p, chunk_size)
    short = pending.nonzero().squeeze(1)  # the one host decision over all rows
    # A quarter chunk at a time: finishing a row holds its float32 probabilities plus an int64 bucket index and a
    # float64 copy for the exact masses (~5 float32 buffers), so a quarter of the rows keeps the peak near the top-k
    # pass's one float32 chunk (at 2048 rows and V = 151,936: 1.5 GB against 1.2 GB, measured on CPU).
    for ids in short.split(max(1, chunk_size // 4)):
        out[ids] = _finish_short_rows(rows[ids], top_p, top_mass[ids], top_last[ids])
    return out


def _compute_top_p_entropy_radix(rows: torch.Tensor, top_p: float, chunk_size: int) -> torch.Tensor:
    """(R, V) logits -> (R,) float32 top-p entropy (the ``"radix"`` method of ``compute_top_p_entropy_from_logits``):
    the top-k pass, one host decision (which rows are short of p), then the short rows by value histograms
    (``_finish_short_rows_radix``) in blocks of ``_RADIX_ROWS``, with no host decision at all."""
    out, pending, _, _ = _run_top_k_pass(rows, top_p, chunk_size)
    short = pending.nonzero().squeeze(1)  # the one host decision
    for ids in short.split(_RADIX_ROWS if rows.device.type != "cpu" else _RADIX_CPU_ROWS):
        out[ids] = _finish_short_rows_radix(rows[ids], top_p)
    return out


def _run_top_k_pass(
    rows: torch.Tensor, top_p: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first pass of ``"bracket"`` and ``"radix"``: per chunk, softmax, ``topk(256)``, the entropy of every row
    whose top 256 reach the cut, with no host decision (``torch.where``, no ``nonzero``).

    Returns:
        ``(R,)`` float32 entropy (final where the row reached p), ``(R,)`` bool rows still short of p, ``(R,)``
        float64 mass of each row's top k, ``(R,)`` float32 its k-th probability (+inf without a top-k pass).
    """
    num_rows, vocab = rows.shape
    device = rows.device
    out = torch.empty(num_rows, dtype=torch.float32, device=device)
    k = min(_TOP_P_CANDIDATES[0], vocab) if _TOP_P_CANDIDATES else 0
    pending = torch.ones(num_rows, dtype=torch.bool, device=device)  # (R,) rows short of p after the top-k pass
    top_mass = torch.zeros(num_rows, dtype=torch.float64, device=device)  # (R,) mass of each row's top k
    top_last = torch.full((num_rows,), math.inf, dtype=torch.float32, device=device)  # (R,) its k-th probability
    if k:
        for i in range(0, num_rows, chunk_size):
            probs = torch.softmax(rows[i : i + chunk_size], dim=-1, dtype=torch.float32)  # (C, V)
            threshold = probs.sum(dim=-1).double() * (top_p * (1.0 - TOP_P_TOLERANCE))  # as in the escalation
            top = torch.topk(probs, k, dim=-1, largest=True, sorted=True).values  # (C, k), descending
            h, reached, mass = _compute_truncated_entropy(top, threshold, trim=False)
            out[i : i + chunk_size] = h  # rows short of p are overwritten by the caller
            # a top-k of the whole vocabulary is a full sort: it decides, even below the cut by float rounding
            pending[i : i + chunk_size] = ~reached if k < vocab else False
            top_mass[i : i + chunk_size] = mass
            top_last[i : i + chunk_size] = top[:, -1]
    return out, pending, top_mass, top_last


def _finish_short_rows(
    logits: torch.Tensor, top_p: float, top_mass: torch.Tensor, top_last: torch.Tensor
) -> torch.Tensor:
    """Top-p entropy of rows whose top k did not reach p, without sorting V (``"bracket"``).

    Args:
        logits: ``(S, V)`` the short rows' logits (their probabilities are recomputed here: same softmax, same values).
        top_p: p in (0, 1).
        top_mass: ``(S,)`` float64 mass of each row's top k (0 without a top-k pass), for the estimate only.
        top_last: ``(S,)`` float32 its k-th largest probability (+inf without a top-k pass), for the estimate only.

    Returns:
        ``(S,)`` float32 entropy. The bracket only chooses what to sort; every kept set is decided by the exact
        float64 masses, and rows whose bracket does not hold the cut are sorted in full.
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (S, V)
    num_rows, vocab = probs.shape
    threshold = probs.sum(dim=-1).double() * (top_p * (1.0 - TOP_P_TOLERANCE))  # (S,) float64
    # Estimate where the cut falls from a strided sample (token ids carry no order of probability that matters here:
    # a miss only costs a sort). The sample's values below the top k stand for `stride` tokens each.
    sample = probs[:, :: max(1, vocab // _BRACKET_SAMPLE)]  # (S, n)
    n = sample.shape[1]
    sample = torch.where(sample < top_last[:, None], sample, 0.0).sort(dim=-1, descending=True).values  # (S, n)
    # estimate[:, j]: the mass of the tokens >= sample[:, j], each sampled value standing for `scale` tokens, with
    # the standard deviation of such a sampled sum (each token drawn with probability 1 / scale): scale sqrt(Σ s^2).
    # The bracket runs from where even estimate + z sd is below the cut to where even estimate - z sd reaches it,
    # two samples further out each way for the discreteness of the sample.
    scale = vocab / n
    estimate = top_mass[:, None] + sample.cumsum(dim=-1, dtype=torch.float64) * scale  # (S, n)
    spread = _BRACKET_SIGMAS * scale * sample.double().square().cumsum(dim=-1).sqrt()  # (S, n)
    hi = (estimate + spread < threshold[:, None]).sum(dim=-1) - 3  # (S,) last sample surely above the cut, - 2
    lo = (estimate - spread < threshold[:, None]).sum(dim=-1) + 2  # (S,) first sample surely past it, + 2
    v_hi = torch.where(hi >= 0, sample.gather(1, hi.clamp(0, n - 1)[:, None]).squeeze(1), top_last)  # (S,)
    v_lo = torch.where(lo < n, sample.gather(1, lo.clamp(0, n - 1)[:, None]).squeeze(1), 0.0)  # (S,)
    # Narrow the bracket exactly: the float64 mass above each of _BRACKET_CANDIDATES sample values inside it, all in
    # one pass (each token's bucket among the descending boundaries v_hi = d_0 > d_1 > ... > d_m+1 = v_lo, then the
    # masses per bucket); the new bracket is (d_t+1, d_t] where the mass above crosses the cut.
    inner = hi[:, None] + (lo - hi)[:, None] * torch.arange(1, _BRACKET_CANDIDATES + 1, device=probs.device) // (
        _BRACKET_CANDIDATES + 1
    )  # (S, m) sample indices strictly between hi and lo, ascending
    inner_values = torch.where(inner < n, sample.gather(1, inner.clamp(0, n - 1)), 0.0)
    inner_values = torch.minimum(inner_values, v_hi[:, None]).clamp_min(0.0)
    bounds = torch.cat([v_hi[:, None], inner_values, v_lo[:, None]], dim=1)  # (S, m + 2), non-increasing
    ascending = bounds.flip(1).contiguous()
    # bucket b = how many boundaries lie below p: b = m + 2 above v_hi, 0 at or below v_lo
    bucket = torch.searchsorted(ascending, probs, right=False)  # (S, V) int64
    bucket_mass = torch.zeros(num_rows, bounds.shape[1] + 1, dtype=torch.float64, device=probs.device)
    bucket_mass.scatter_add_(1, bucket, probs.double())  # (S, m + 3)
    del bucket
    # mass above d_t (t = 0 is v_hi): the buckets whose p exceeds d_t, i.e. b >= m + 2 - t
    mass_above_bound = bucket_mass.flip(1).cumsum(dim=1)[:, : bounds.shape[1]]  # (S, m + 2)
    below_cut = (mass_above_bound < threshold[:, None]).sum(dim=1)  # (S,) boundaries whose mass above is < the cut
    t = (below_cut - 1).clamp(0, bounds.shape[1] - 2)
    v_hi = bounds.gather(1, t[:, None]).squeeze(1)
    v_lo = bounds.gather(1, (t + 1)[:, None]).squeeze(1)
    above = probs > v_hi[:, None]  # (S, V): all kept when their mass is below the cut
    band = (probs > v_lo[:, None]) & ~above  # (S, V): the bracket, sorted below
    mass_above = mass_above_bound.gather(1, t[:, None]).squeeze(1)  # (S,)
    band_mass = mass_above_bound.gather(1, (t + 1)[:, None]).squeeze(1) - mass_above
    band_count = band.sum(dim=-1)
    holds = (below_cut >= 1) & (below_cut <= bounds.shape[1] - 1) & (band_count >= 1)
    holds &= (mass_above < threshold) & (mass_above + band_mass >= threshold)
    holds &= band_count <= max(1, int(vocab * _BRACKET_MAX_FRACTION))
    holds_list, count_list = torch.stack([holds.long(), band_count]).tolist()  # host decision 1: what, how wide
    entropy = torch.empty(num_rows, dtype=torch.float32, device=probs.device)
    in_bracket = [i for i, h in enumerate(holds_list) if h]
    ids = torch.tensor(in_bracket, dtype=torch.long, device=probs.device)
    to_sort = torch.tensor([i for i, h in enumerate(holds_list) if not h], dtype=torch.long, device=probs.device)
    if in_bracket:
        width = max(count_list[i] for i in in_bracket)
        sub_probs, sub_threshold, sub_above = probs[ids], threshold[ids], above[ids]
        # the bracket's values, descending, zeros after each row's count (they add no mass and are never kept)
        values = torch.topk(torch.where(band[ids], sub_probs, 0.0), width, dim=-1, sorted=True).values  # (A, width)
        cumulative = mass_above[ids, None] + values.cumsum(dim=-1, dtype=torch.float64)  # (A, width)
        # the first bracket token is kept (mass before it < the cut: `holds`); token i + 1 iff the mass through i is
        num_kept = 1 + (cumulative[:, :-1] < sub_threshold[:, None]).sum(dim=-1)  # (A,)
        kept_mass = cumulative.gather(1, (num_kept - 1)[:, None]).squeeze(1).float()  # Z, (A,); >= every kept p
        q = values / kept_mass[:, None]
        in_prefix = torch.arange(width, device=probs.device) < num_kept[:, None]
        h = -torch.where(in_prefix & (q > 0), q * q.log(), 0.0).sum(dim=-1)
        q = sub_probs / kept_mass[:, None]  # (A, V): the tokens above the bracket, all kept
        h = h - torch.where(sub_above & (q > 0), q * q.log(), 0.0).sum(dim=-1) + 0.0  # + 0.0: no -0.0
        entropy[ids] = h
        # float64 sums in another order can differ in the last bit: a row whose bracket then falls short is sorted
        missed = cumulative[:, -1] < sub_threshold
        if bool(missed.any()):  # host decision 2
            to_sort = torch.cat([to_sort, ids[missed]])
    for sub in to_sort.split(_SORT_ROWS if probs.device.type == "cpu" else 8 * _SORT_ROWS):
        ordered = torch.sort(probs[sub], dim=-1, descending=True).values  # (<= _SORT_ROWS, V)
        entropy[sub] = _compute_truncated_entropy(ordered, threshold[sub])[0]
    return entropy


def _finish_short_rows_radix(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p entropy of rows whose top k did not reach p, by histograms of the logits' bit patterns (``"radix"``).

    The probability order is the logit order (softmax is monotone), so the nucleus is every token whose logit is above
    one threshold logit plus some of the tokens equal to it. A 16-bit float has 65,536 bit patterns: one histogram of
    counts per row over all of them (one ``scatter_add_`` of ones) holds the row's whole distribution as (logit,
    count) pairs. Their masses n exp(l - max), cumulated from the largest logit down, give the threshold logit, and
    the entropy follows from the bins alone (``_entropy_from_value_bins``): nothing is sorted, no V-wide float array
    is made, no host decision is taken. float32 logits (any other dtype is cast to float32) take two 16-bit passes:
    the high half of the bits (a bf16 truncation: the same order) with float64 masses summed per bin, then the low
    half inside the one bin that holds the cut.

    Args:
        logits: ``(S, V)`` logits of the short rows.
        top_p: p in (0, 1).

    Returns:
        ``(S,)`` float32 entropy. Tokens with equal logits fall in one bin and are kept or dropped as a count, so ties
        at the cut follow the definition exactly (the j-th of n tied tokens is kept iff the mass before it is < p
        (1 - ``TOP_P_TOLERANCE``) of the row's mass). The masses are exp(l - max) in float32 for 16-bit logits (the
        arithmetic of the float32 softmax the other methods use, without its division) and in float64 for float32
        logits, cumulated in float64; a row can differ from the other methods only where a mass lies within float32
        rounding (~1e-7 relative) of the cut, and H by float32 rounding (~1e-6 nats).
    """
    num_rows, vocab = logits.shape
    device = logits.device
    if vocab < _RADIX_MIN_VOCAB:  # a sort of so few values costs less than the 65,536-bin arrays
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        threshold = probs.sum(dim=-1).double() * (top_p * (1.0 - TOP_P_TOLERANCE))
        return _compute_truncated_entropy(torch.sort(probs, dim=-1, descending=True).values, threshold)[0]
    zero = torch.zeros(num_rows, dtype=torch.float64, device=device)
    if logits.dtype in (torch.bfloat16, torch.float16):
        values, order = _radix_bins(logits.dtype, device)  # (B,) float32 descending, (B,) its bins' raw patterns
        # raw pattern + 32768 in [0, 65536): one int64 index per token (scatter_add_ takes no narrower index)
        index = logits.view(torch.int16).long().add_(32768)  # (S, V)
        counts = torch.zeros(num_rows, _RADIX_BINS, dtype=torch.float32, device=device)
        # float32 counts are exact up to 2^24 tokens per logit; the ones are a stride-0 view, not an (S, V) buffer
        counts.scatter_add_(1, index, torch.ones((), dtype=torch.float32, device=device).expand(index.shape))
        del index
        counts = counts.index_select(1, order)  # (S, B), largest logit first
        largest = logits.max(dim=1).values.float()  # (S,)
        # l - max in float32, as the softmax computes it; clamped: bins above the row's largest logit are empty
        # (their exp could overflow), and -inf / NaN patterns (-inf in the table) get a finite d with exp(d) = 0
        d = (values[None, :] - largest[:, None]).clamp_(-1e4, 0.0)  # (S, B)
        return _entropy_from_value_bins(counts, d, d.exp().mul_(counts), zero, zero, top_p)
    x = logits.float()
    bits = x.view(torch.int32)  # (S, V)
    _, order = _radix_bins(torch.bfloat16, device)  # the high 16 bits of a float32 are a bf16 pattern
    high = (bits >> 16).long().add_(32768)  # (S, V) in [0, 65536)
    # pass 1: float64 masses per high-half bin (each spans 2^16 float32 values), from the same float64 exp(l - max)
    # as pass 2's exact values, so that both passes agree on every mass
    largest = x.max(dim=1).values.double()  # (S,)
    d = (x.double() - largest[:, None]).clamp_(min=-1e4)  # (S, V) float64 l - max
    w = d.exp()
    mass_high = torch.zeros(num_rows, _RADIX_BINS, dtype=torch.float64, device=device).scatter_add_(1, high, w)
    weighted_high = torch.zeros_like(mass_high).scatter_add_(1, high, w.mul_(d))  # Σ w d per bin
    del w, d
    cumulative = mass_high.index_select(1, order).cumsum(dim=1)  # (S, B), largest first
    threshold = cumulative[:, -1] * (top_p * (1.0 - TOP_P_TOLERANCE))  # (S,)
    cut, before = _locate_cut(cumulative, zero, threshold, may_fall_short=False)
    weighted_before = torch.where(
        torch.arange(_RADIX_BINS, device=device) < cut[:, None], weighted_high.index_select(1, order), 0.0
    ).sum(dim=1)  # (S,) Σ w d above the cut's bin
    del mass_high, weighted_high, cumulative
    # pass 2: the cut's bin by its low 16 bits, exact logits. Inside one high-half bin every logit has the same sign:
    # a positive one grows with its low bits, a negative one shrinks.
    raw = order[cut]  # (S,) the cut bin's high half + 32768
    negative = (raw < 32768)[:, None]  # (S, 1)
    low = (bits & 0xFFFF).long()  # (S, V) in [0, 65536)
    low = torch.where(negative, low, 65535 - low)  # descending position inside the bin
    counts = torch.zeros(num_rows, _RADIX_BINS, dtype=torch.float32, device=device)
    counts.scatter_add_(1, low, (high == raw[:, None]).float())
    del low, high
    position = torch.arange(_RADIX_BINS, device=device)
    value_bits = ((raw - 32768)[:, None] << 16) | torch.where(negative, position, 65535 - position)  # (S, B) int64
    exact = value_bits.int().view(torch.float32).double()  # (S, B) each bin's logit, largest first
    d = torch.where(counts > 0, exact - largest[:, None], -1e4).clamp_(min=-1e4)  # (S, B), finite
    return _entropy_from_value_bins(counts, d, d.exp() * counts, before, weighted_before, top_p, threshold)


def _locate_cut(
    cumulative: torch.Tensor, above: torch.Tensor, threshold: torch.Tensor, may_fall_short: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bin holding the cut: the first (largest-logit) bin through which the mass reaches ``threshold``.

    Args:
        cumulative: ``(S, B)`` float64 mass of the bins up to and including each, largest logit first.
        above: ``(S,)`` float64 mass of every token above these bins.
        threshold: ``(S,)`` float64.
        may_fall_short: whether ``above`` + the bins' mass can fall short of ``threshold`` (float rounding, when the
            threshold comes from another sum). Then the cut is the last bin with mass: every token is kept, as a full
            sort keeps them. Without it the threshold, < the bins' total, is always reached.

    Returns:
        ``(S,)`` int64 bin index and ``(S,)`` float64 mass of every token above it.
    """
    cut = (cumulative < (threshold - above)[:, None]).sum(dim=1)
    if may_fall_short:
        cut = torch.minimum(cut, (cumulative < cumulative[:, -1:]).sum(dim=1))  # the bin adding the last mass
    before = cumulative.gather(1, (cut - 1).clamp_min(0)[:, None]).squeeze(1)
    return cut, above + torch.where(cut > 0, before, 0.0)


def _entropy_from_value_bins(
    counts: torch.Tensor,
    d: torch.Tensor,
    mass: torch.Tensor,
    above: torch.Tensor,
    weighted_above: torch.Tensor,
    top_p: float,
    threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-p entropy of rows given as bins of equal logits, largest first.

    Args:
        counts: ``(S, B)`` tokens per bin (one logit value per bin), largest logit first.
        d: ``(S, B)`` the bin's logit minus the row's largest (finite; clamped at -1e4 where exp(d) = 0).
        mass: ``(S, B)`` counts x exp(d), float32 or float64.
        above: ``(S,)`` float64 mass of the tokens above every bin (0, or the float32 path's first pass).
        weighted_above: ``(S,)`` float64 their Σ w d, w = exp(d).
        top_p: p in (0, 1).
        threshold: ``(S,)`` float64 p (1 - ``TOP_P_TOLERANCE``) times the row's mass; ``None``: from these bins,
            which then hold the whole row.

    Returns:
        ``(S,)`` float32 entropy.
    """
    cumulative = mass.cumsum(dim=1, dtype=torch.float64)  # (S, B)
    may_fall_short = threshold is not None
    if threshold is None:
        threshold = cumulative[:, -1] * (top_p * (1.0 - TOP_P_TOLERANCE))
    cut, before = _locate_cut(cumulative, above, threshold, may_fall_short)
    n = counts.gather(1, cut[:, None]).squeeze(1).double()  # (S,) tokens tied at the threshold logit
    d_cut = d.gather(1, cut[:, None]).squeeze(1).double()
    w = d_cut.exp()  # (S,) each one's mass
    # the tie rule: the j-th tied token (j = 0, 1, ...) is kept iff before + j w < threshold; at least one is
    # (before < threshold). The quotient is off by at most one from rounding; the two corrections are exact.
    kept = ((threshold - before) / w).ceil().clamp(min=torch.ones_like(n), max=n)
    kept = torch.where((kept > 1) & (before + (kept - 1) * w >= threshold), kept - 1, kept)
    kept = torch.where((kept < n) & (before + kept * w < threshold), kept + 1, kept)
    z = before + kept * w  # Z, the kept mass
    in_front = torch.arange(mass.shape[1], device=mass.device) < cut[:, None]  # (S, B) bins above the cut's
    weighted = torch.where(in_front, mass * d, 0.0).sum(dim=1, dtype=torch.float64)
    weighted = weighted_above + weighted + kept * w * d_cut  # Σ_kept w d
    # H = -Σ q log q with q = w / Z and log q = d - log Z: H = log Z - Σ w d / Z. One kept token is the row's
    # largest (d = 0, w = 1): Z = 1, Σ w d = 0, H = 0 exactly; k tied largest logits give log k.
    return (z.log() - weighted / z).clamp_min(0.0).float() + 0.0  # + 0.0: no -0.0


def _radix_bins(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(65536,)`` float32 values of every 16-bit pattern of ``dtype``, largest first (NaN patterns as -inf, last),
    and ``(65536,)`` int64 for each, its raw pattern + 32768 (the histogram's index). Cached per dtype and device."""
    key = (dtype, str(device))
    if key not in _RADIX_TABLES:
        raw = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).float()
        raw = torch.where(raw.isnan(), -math.inf, raw)
        values, order = torch.sort(raw, descending=True, stable=True)
        _RADIX_TABLES[key] = (values.to(device), order.to(device))
    return _RADIX_TABLES[key]


_RADIX_TABLES: dict[tuple[torch.dtype, str], tuple[torch.Tensor, torch.Tensor]] = {}
"""``_radix_bins``' tables (0.75 MB per dtype and device)."""


def _compute_truncated_entropy(
    sorted_probs: torch.Tensor, threshold: torch.Tensor, trim: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-p entropy from a descending prefix of each row's probabilities.

    Args:
        sorted_probs: ``(C, K)`` the K largest probabilities of each row, descending (K = V for a full sort).
        threshold: ``(C,)`` float64, p (1 - ``TOP_P_TOLERANCE``) times the row's summed probabilities.
        trim: sum H over the widest kept prefix only (a host round trip for its width) rather than all K columns
            (no round trip: the ``"bracket"`` method's top-k pass, where K = 256).

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
    width = (int(num_kept.max()) if num_kept.numel() else 0) if trim else sorted_probs.shape[1]
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
