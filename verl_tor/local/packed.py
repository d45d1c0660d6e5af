"""verl's packed-sequence path (``use_remove_padding=true``) on the CPU platform, for Qwen2-VL and Qwen2.5-VL.

With remove padding, verl's engine feeds the model one ``(1, total_tokens)`` row holding every sequence of the
micro-batch back to back, ``attention_mask=None``, and the position ids restarting at 0 at each sequence start.
For Qwen2-VL / Qwen2.5-VL, verl 0.9.1's ``apply_monkey_patch`` then replaces the text attention's ``forward`` by
``verl.models.transformers.qwen2_vl.qwen2_vl_attn_forward``, which calls flash-attn's varlen kernel
(``flash_attn_varlen_func``) with sequence boundaries read from those position ids. flash-attn has no CPU build, and
verl defines that module's flash-attn globals only when flash-attn (or an NPU) is present, so on a CPU the first
packed forward fails with ``NameError: name '_flash_use_top_left_mask' is not defined``.

transformers' own attention already handles this input: with ``attention_mask=None`` and a batch of one, its mask
builder (``masking_utils``) finds the packed sequences from the position-id resets (the text row of M-RoPE's
``(4, 1, total)`` position ids) and builds the block-causal mask, which ``sdpa`` applies -- the same attention as
flash-attn's varlen call. So, on the CPU platform only and only when verl's module lacks its flash-attn globals,
verl's ``qwen2_vl_attn_forward`` is replaced (in verl's module, before ``apply_monkey_patch`` imports it) by a
dispatcher to transformers' own ``Qwen2VLAttention.forward`` / ``Qwen2_5_VLAttention.forward``. Qwen3-VL needs
nothing: verl does not patch its attention. The packed path's outputs equal the padded path's
(``tests/test_packed_on_cpu.py``). Ulysses sequence parallelism needs verl's all-to-all inside that attention:
refused with a clear error.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["route_qwen2_vl_attention_to_transformers"]

FLASH_GLOBAL = "_flash_use_top_left_mask"
"""What verl's ``qwen2_vl_attn_forward`` reads first and defines only with flash-attn or an NPU (verl 0.9.1)."""


def route_qwen2_vl_attention_to_transformers() -> bool:
    """Replace verl's flash-attn-only ``qwen2_vl_attn_forward`` by transformers' own attention (idempotent).

    Returns whether it replaced it now; ``False`` when already done or when verl's flash-attn path is usable.
    Raises ``RuntimeError`` when verl's module no longer has the function (a verl this was not written for).
    """
    import verl.models.transformers.qwen2_vl as verl_qwen2_vl
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLAttention

    original = getattr(verl_qwen2_vl, "qwen2_vl_attn_forward", None)
    if original is None:
        raise RuntimeError(
            "verl_tor: verl.models.transformers.qwen2_vl has no qwen2_vl_attn_forward, so the CPU platform cannot "
            "route the packed path (use_remove_padding=true) to transformers' attention. Fix: use a verl version "
            "verl_tor supports (patches/README.md), or actor_rollout_ref.model.use_remove_padding=false."
        )
    if getattr(original, "__verl_tor__", False) or hasattr(verl_qwen2_vl, FLASH_GLOBAL):
        return False
    own = {cls: cls.forward for cls in (Qwen2_5_VLAttention, Qwen2VLAttention)}
    if any(forward is original or getattr(forward, "__verl_tor__", False) for forward in own.values()):
        raise RuntimeError(
            "verl_tor: transformers' Qwen2-VL attention is already verl's patched forward in this process, so its "
            "own forward cannot be recovered. Fix: import verl (which loads verl_tor) before building the model."
        )

    @functools.wraps(original)
    def qwen2_vl_attn_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size

        sp = get_ulysses_sequence_parallel_world_size()
        if sp > 1:
            raise RuntimeError(
                f"ulysses_sequence_parallel_size={sp} on the CPU platform: Qwen2-VL's sequence parallelism runs "
                "inside verl's flash-attn attention, which has no CPU build. Fix: set "
                "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1 (and ref's) on the CPU platform."
            )
        for cls in type(self).__mro__:
            if cls in own:
                return own[cls](self, *args, **kwargs)
        raise TypeError(f"verl_tor: {type(self).__name__} is not a Qwen2-VL / Qwen2.5-VL attention")

    qwen2_vl_attn_forward.__verl_tor__ = True
    qwen2_vl_attn_forward.__wrapped_original__ = original
    verl_qwen2_vl.qwen2_vl_attn_forward = qwen2_vl_attn_forward
    return True


def revert_qwen2_vl_attention_route() -> None:
    """Put verl's function back (tests)."""
    import verl.models.transformers.qwen2_vl as verl_qwen2_vl

    current = verl_qwen2_vl.qwen2_vl_attn_forward
    if getattr(current, "__verl_tor__", False):
        verl_qwen2_vl.qwen2_vl_attn_forward = current.__wrapped_original__
