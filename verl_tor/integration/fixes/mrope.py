"""Runtime fix for verl 0.9.1's M-RoPE position ids in equal-length batches (``patches/0002-...``).

Qwen2-VL-family rows carry ``position_ids`` of shape (C, L) per trajectory (C = 4: text, t, h, w). TransferQueue
packs a field of per-row tensors with ``torch.nested.as_nested_tensor(rows, layout=torch.jagged)``, and torch makes
the *first* dimension of the components ragged when it can: with rows of different L it picks L (ragged dim 2, what
verl expects), but when every row of a batch has the same L the components' first dimensions are all C and it
makes dim 1 "ragged" (offsets C, 2C, ...). verl's ``maybe_fix_3d_position_ids`` (``verl/utils/tensordict_utils.py``)
restores ``_ragged_idx = 2`` on every 3-D nested ``position_ids`` -- right after a pickle round trip, which loses
the index, but wrong for such a batch: the offsets then describe C-long rows, and ``train_mini_batch`` /
``infer_batch`` fail in ``unbind`` ("split_with_sizes expects split_sizes to sum exactly to ..."). Every
equal-length batch hits it (fixed-length responses, a single trajectory per micro-batch, ``ignore_eos``), on GPU
as on CPU, ToR or not.

The fix recognises that layout -- ragged dim 1 whose offsets index the values' first dimension -- and rebuilds the
tensor with ragged dim 2 (nested from (L, C) components, transposed), then runs verl's function unchanged. It is
applied only when a probe shows the bug (``is_mrope_bug_present``).
"""

from __future__ import annotations

import functools
import importlib

import torch

from verl_tor.integration.fixes import RuntimeFix, original_of

__all__ = ["MROPE_FIX", "apply_mrope_fix", "revert_mrope_fix", "is_mrope_bug_present", "rebuild_position_ids"]

TARGET = "verl.utils.tensordict_utils"
IMPORTERS = ("verl.workers.engine_workers", "verl.workers.engine.base", "verl.workers.engine_workers_tinker")
"""verl modules that ``from verl.utils.tensordict_utils import maybe_fix_3d_position_ids`` (bound at import)."""


def _stacks_equal_rows(position_ids: torch.Tensor) -> bool:
    """Whether a 3-D jagged tensor is the (B, C, L) stack of equal-length (C, L) rows that torch made ragged in
    dim 1 (its offsets index the values' first dimension), not a (B, C, j) tensor that lost its ragged index."""
    if not (position_ids.is_nested and position_ids.layout == torch.jagged and position_ids.dim() == 3):
        return False
    if position_ids._ragged_idx != 1:
        return False
    return int(position_ids.offsets()[-1]) == position_ids.values().shape[0]


def rebuild_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, C, L) rows stored ragged in dim 1 -> the same rows as a (B, C, j) jagged tensor, ragged in dim 2."""
    rows = position_ids.unbind()  # B x (C, L)
    return torch.nested.as_nested_tensor([r.transpose(0, 1).contiguous() for r in rows], layout=torch.jagged).transpose(
        1, 2
    )


def _module():
    return importlib.import_module(TARGET)


def is_mrope_bug_present() -> bool:
    """Probe verl's function: two equal-length (4, L) rows packed as TransferQueue packs them must unbind back."""
    from tensordict import TensorDict

    original = original_of(_module().maybe_fix_3d_position_ids)
    rows = [torch.arange(4 * 6).reshape(4, 6), torch.arange(4 * 6).reshape(4, 6) + 1]
    data = TensorDict({"position_ids": torch.nested.as_nested_tensor(rows, layout=torch.jagged)}, batch_size=2)
    original(data)
    try:
        back = data["position_ids"].unbind()
        return not all(torch.equal(a, b) for a, b in zip(back, rows))
    except RuntimeError:
        return True


def _wrap(original):
    @functools.wraps(original)
    def maybe_fix_3d_position_ids(data):
        if "position_ids" in data.keys() and _stacks_equal_rows(data["position_ids"]):
            data["position_ids"] = rebuild_position_ids(data["position_ids"])
        return original(data)

    return maybe_fix_3d_position_ids


MROPE_FIX = RuntimeFix(
    target=TARGET,
    name="maybe_fix_3d_position_ids",
    is_bug_present=is_mrope_bug_present,
    wrap=_wrap,
    importers=IMPORTERS,
    what="equal-length M-RoPE batches",
)
apply_mrope_fix = MROPE_FIX.apply
"""Install the fix if the bug is present (idempotent). Returns whether the fix is active now."""
revert_mrope_fix = MROPE_FIX.revert
"""Restore verl's original function (tests)."""
