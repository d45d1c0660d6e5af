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
"""

from __future__ import annotations

import functools
from typing import Any

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

    from verl_tor.ops import compute_top_p_entropy_from_logits

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
        top_p_entropy = functools.partial(_top_p_entropy, top_p=float(top_p))
        packed, non_packed = self.compute_entropy_from_logits, impl.verl_F
        self.compute_entropy_from_logits = top_p_entropy  # packed path (remove padding)
        impl.verl_F = _TorchFunctionalWithTopPEntropy(non_packed, top_p_entropy)  # non-packed path
        try:
            return original(self, output, output_args, micro_batch, logits_processor_func)
        finally:
            self.compute_entropy_from_logits = packed
            impl.verl_F = non_packed

    def _top_p_entropy(logits, chunk_size=None, *, top_p):
        kwargs = {"chunk_size": chunk_size} if chunk_size else {}
        return compute_top_p_entropy_from_logits(logits, top_p, **kwargs)

    prepare_model_outputs.__verl_tor__ = True
    prepare_model_outputs.__wrapped_original__ = original
    FSDPEngineWithLMHead.prepare_model_outputs = prepare_model_outputs
    return True


def uninstall_top_p_entropy_hook() -> None:
    """Restore verl's method (tests)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    current = FSDPEngineWithLMHead.prepare_model_outputs
    if getattr(current, "__verl_tor__", False):
        FSDPEngineWithLMHead.prepare_model_outputs = current.__wrapped_original__
