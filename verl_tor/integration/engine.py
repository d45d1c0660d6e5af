"""Engine hook for ``tor.entropy=top_p``: the paper's truncated entropy, computed where the logits are.

verl's FSDP engine computes the per-token entropy of the old-policy pass inside ``prepare_model_outputs``, on one of
two paths: the packed (remove-padding) path calls the instance attribute ``self.compute_entropy_from_logits``; the
non-packed path (``use_remove_padding=false``) calls ``verl_F.entropy_from_logits`` (``transformer_impl``'s module
alias of ``verl.utils.torch_functional``). When a micro-batch carries the non-tensor flag ``tor_entropy_top_p`` (set
by the ToR trainer for the old-log-prob pass only), the hook swaps ``compute_top_p_entropy_from_logits`` in on both
for that one call and restores them in ``finally``, so the entropy written back is H of the top-p truncated,
renormalised distribution. The update pass never carries the flag and keeps verl's differentiable full entropy; no
other module sees the swap (the non-packed one replaces ``transformer_impl``'s alias by a view of the same module,
not the module's attribute). Fused kernels never materialise logits: a flagged micro-batch with
``use_fused_kernels`` raises (the ToR config check refuses the combination up front).

Only the tokens that are ranked: verl computes the entropy of every position of the sequence, prompt included, and
then keeps the response positions (``no_padding_2_padding``: the logits at positions ``L - R - 1 .. L - 2`` of a
sequence of length L with R response tokens predict the response). When the micro-batch carries ``responses``
(verl's old-log-prob micro-batches do), the top-p entropy is computed at those positions only and the others get 0,
which verl never reads: at the GPU recipes' lengths (a ~480-token Geometry3K prompt with its 256 image tokens, up to
2,048 response tokens) that removes 19-49 % of the hook's work (benchmarks/README.md). Under Ulysses sequence
parallelism a rank holds a shard of the packed sequence, and every row of it is computed, as before.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from verl_tor.ops import compute_top_p_entropy_from_logits
from verl_tor.stage import TOP_P_FLAG  # the flag is defined with the stage, which sets it on its own pass too

__all__ = ["TOP_P_FLAG", "install_top_p_entropy_hook", "uninstall_top_p_entropy_hook"]


class _TorchFunctionalWithTopPEntropy:
    """``verl.utils.torch_functional`` as ``transformer_impl`` sees it during one flagged call: every attribute is the
    module's, except ``entropy_from_logits``."""

    def __init__(self, module: Any, entropy_from_logits: Any) -> None:
        self._module = module
        self.entropy_from_logits = entropy_from_logits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def install_top_p_entropy_hook() -> bool:
    """Wrap ``FSDPEngineWithLMHead.prepare_model_outputs`` (idempotent). Returns whether it wrapped now."""
    import verl.utils.torch_functional as torch_functional
    import verl.workers.engine.fsdp.transformer_impl as impl
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    original = FSDPEngineWithLMHead.prepare_model_outputs
    if getattr(original, "__verl_tor__", False):
        return False
    if getattr(impl, "verl_F", None) is not torch_functional:  # the non-packed path's entropy goes through it
        raise RuntimeError(
            "verl_tor: verl.workers.engine.fsdp.transformer_impl has no module alias `verl_F` of "
            "verl.utils.torch_functional, so tor.entropy=top_p could not reach its non-packed entropy. "
            "Fix: use a verl version verl_tor supports (patches/README.md)."
        )

    @functools.wraps(original)
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        top_p = tu.get_non_tensor_data(data=micro_batch, key=TOP_P_FLAG, default=None)
        if top_p is None:
            return original(self, output, output_args, micro_batch, logits_processor_func)
        if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
            raise ValueError(
                f"{TOP_P_FLAG}={top_p!r} (tor.entropy=top_p) on a micro-batch with use_fused_kernels=true: fused "
                "kernels never materialise the logits, so verl would return the full entropy. "
                "Fix: set actor_rollout_ref.model.use_fused_kernels=false, or tor.entropy=full."
            )
        lengths = None if self.use_ulysses_sp else read_response_lengths(micro_batch)
        top_p_entropy = functools.partial(_top_p_entropy, top_p=float(top_p), lengths=lengths)
        packed, non_packed = self.compute_entropy_from_logits, impl.verl_F
        self.compute_entropy_from_logits = top_p_entropy  # packed path (remove padding)
        impl.verl_F = _TorchFunctionalWithTopPEntropy(non_packed, top_p_entropy)  # non-packed path
        try:
            return original(self, output, output_args, micro_batch, logits_processor_func)
        finally:
            self.compute_entropy_from_logits = packed
            impl.verl_F = non_packed

    def _top_p_entropy(logits, chunk_size=None, *, top_p, lengths):
        kwargs = {"chunk_size": chunk_size} if chunk_size else {}
        if lengths is None:
            return compute_top_p_entropy_from_logits(logits, top_p, **kwargs)
        return compute_response_top_p_entropy(logits, top_p, *lengths, **kwargs)

    prepare_model_outputs.__verl_tor__ = True
    prepare_model_outputs.__wrapped_original__ = original
    FSDPEngineWithLMHead.prepare_model_outputs = prepare_model_outputs
    return True


def read_response_lengths(micro_batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(sequence_lengths, response_lengths)``, ``(B,)`` int64 on CPU, of a verl micro-batch in its no-padding layout
    (nested ``input_ids`` and ``responses``); ``None`` when it lacks them (then every position is computed)."""
    keys = micro_batch.keys()
    if "input_ids" not in keys or "responses" not in keys:
        return None
    input_ids, responses = micro_batch["input_ids"], micro_batch["responses"]
    if not (getattr(input_ids, "is_nested", False) and getattr(responses, "is_nested", False)):
        return None
    sequence_lengths = input_ids.offsets().diff().cpu()
    response_lengths = responses.offsets().diff().cpu()
    if sequence_lengths.shape != response_lengths.shape or bool((response_lengths >= sequence_lengths).any()):
        return None  # not verl's prompt + response layout: compute everything rather than guess
    return sequence_lengths, response_lengths


def compute_response_top_p_entropy(
    logits: torch.Tensor,
    top_p: float,
    sequence_lengths: torch.Tensor,
    response_lengths: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Top-p entropy at the positions whose logits predict a response token, 0 at every other position.

    Args:
        logits: verl's packed ``(N, V)`` logits (the sequences back to back, then any padding rows), or its padded
            ``(B, T, V)`` logits (sequence b in ``[b, :L_b]``).
        top_p: p in (0, 1].
        sequence_lengths: ``(B,)`` L_b, prompt + response tokens.
        response_lengths: ``(B,)`` R_b < L_b; positions ``L_b - R_b - 1 .. L_b - 2`` of sequence b are computed.
        chunk_size: as ``compute_top_p_entropy_from_logits``.

    Returns:
        float32 ``(N,)`` or ``(B, T)``, on ``logits.device``: equal to ``compute_top_p_entropy_from_logits(logits)``
        at the computed positions (the same rows go through the same function).
    """
    from verl_tor.ops.entropy import default_top_p_chunk_size

    starts = torch.cumsum(sequence_lengths, 0) - sequence_lengths  # (B,) offset of each sequence
    if logits.dim() == 3:  # padded: sequence b starts at b * T
        starts = torch.arange(len(sequence_lengths)) * logits.shape[1]
    first = starts + sequence_lengths - response_lengths - 1  # (B,) position predicting the first response token
    rows = torch.cat([torch.arange(int(a), int(a) + int(r)) for a, r in zip(first, response_lengths)])
    flat = logits.reshape(-1, logits.shape[-1])  # (N or B*T, V), a view
    out = torch.zeros(flat.shape[0], dtype=torch.float32, device=logits.device)
    rows = rows.to(logits.device)
    # gather a few chunks' worth of rows at a time: bounded extra memory, and few calls (each of which makes its own
    # fixed number of host decisions on a GPU)
    step = 2 * (chunk_size or default_top_p_chunk_size(logits.device))
    kwargs = {"chunk_size": chunk_size} if chunk_size else {}
    for part in rows.split(step):
        out[part] = compute_top_p_entropy_from_logits(flat[part], top_p, **kwargs)
    return out.reshape(logits.shape[:-1])


def uninstall_top_p_entropy_hook() -> None:
    """Restore verl's method (tests)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    current = FSDPEngineWithLMHead.prepare_model_outputs
    if getattr(current, "__verl_tor__", False):
        FSDPEngineWithLMHead.prepare_model_outputs = current.__wrapped_original__
