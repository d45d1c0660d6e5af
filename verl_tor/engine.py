"""Engine hook for ``tor.entropy=top_p``: the paper's truncated entropy, computed where the logits are.

verl's FSDP engine computes the per-token entropy of the old-policy pass with ``self.compute_entropy_from_logits``
(an instance attribute) inside ``prepare_model_outputs``. When a micro-batch carries the non-tensor flag
``tor_entropy_top_p`` (set by the ToR trainer for the old-log-prob pass only), the hook swaps in
``compute_top_p_entropy_from_logits`` for that call, so the entropy written back is H of the top-p truncated,
renormalised distribution. The update pass never carries the flag and keeps verl's differentiable full entropy.
Needs ``use_fused_kernels=false`` (fused kernels never materialise logits; the ToR config check refuses it).
"""

from __future__ import annotations

import functools

TOP_P_FLAG = "tor_entropy_top_p"


def install_top_p_entropy_hook() -> bool:
    """Wrap ``FSDPEngineWithLMHead.prepare_model_outputs`` (idempotent). Returns whether it wrapped now."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from verl_tor.ops import compute_top_p_entropy_from_logits

    original = FSDPEngineWithLMHead.prepare_model_outputs
    if getattr(original, "__verl_tor__", False):
        return False

    @functools.wraps(original)
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        top_p = tu.get_non_tensor_data(data=micro_batch, key=TOP_P_FLAG, default=None)
        if top_p is None:
            return original(self, output, output_args, micro_batch, logits_processor_func)
        full = self.compute_entropy_from_logits
        self.compute_entropy_from_logits = functools.partial(_top_p_entropy, top_p=float(top_p))
        try:
            return original(self, output, output_args, micro_batch, logits_processor_func)
        finally:
            self.compute_entropy_from_logits = full

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
