"""Runtime fix for verl 0.9.1's Qwen2-VL/2.5-VL no-pixel forward under transformers 5.x (``patches/0001-...``).

verl's ``_get_input_embeds`` (``verl/models/transformers/qwen2_vl.py``), used by the ``Qwen2(_5)_VLModel.forward``
that ``apply_monkey_patch`` installs, runs a dummy vision-tower forward when a micro-batch has no pixels, so that
FSDP's collectives stay aligned across ranks where some micro-batches carry images and others do not. With
transformers 5.x the vision tower returns an output object, not a tensor; the with-pixel branches already unpack
it with ``unpack_visual_output``, the no-pixel branch does not and raises ``AttributeError: ... has no attribute
'mean'``. Every image-free view, and every text-only sample, goes through that branch.

The bug is in verl's Qwen2-VL module, which verl's ``apply_monkey_patch`` installs for ``model_type`` qwen2_vl and
qwen2_5_vl (``AFFECTED_MODEL_TYPES``). Qwen3-VL has its own module (``verl/models/transformers/qwen3_vl.py``) whose
no-pixel branch already unpacks the output: it never reaches this fix (tested in
``tests/test_model_families_on_cpu.py``).

The fix keeps the dummy forward (same zeros input, same 1×4×4 grid, same ``0.0 * mean()`` that keeps the tower in
the graph) and only unpacks its output; micro-batches with pixels still run verl's own function unchanged. It is
applied only when the bug is present (feature detection on verl's source), and it refuses to guess when verl's
function no longer looks as expected.
"""

from __future__ import annotations

import functools
import inspect

from verl_tor.integration.fixes import RuntimeFix, original_of

__all__ = [
    "QWEN2_VL_FIX",
    "apply_qwen2_vl_fix",
    "revert_qwen2_vl_fix",
    "is_qwen2_vl_bug_present",
    "AFFECTED_MODEL_TYPES",
    "BUGGY_LINE",
    "FIXED_LINE",
]

TARGET = "verl.models.transformers.qwen2_vl"
AFFECTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
"""The model types whose forward verl routes through ``TARGET`` (``verl.models.transformers.monkey_patch``)."""
_MEAN = "\n        inputs_embeds = inputs_embeds + 0.0 * image_embeds.mean()"
BUGGY_LINE = "image_embeds = model.visual(pixel_values, grid_thw=image_grid_thw)" + _MEAN
"""verl 0.9.1's no-pixel branch (two consecutive source lines)."""
FIXED_LINE = "image_embeds, _ = unpack_visual_output(model.visual(pixel_values, grid_thw=image_grid_thw))" + _MEAN
"""The same lines after ``patches/0001-*``."""


def _module():
    import importlib

    return importlib.import_module(TARGET)


def _vision_returns_object() -> bool:
    """Whether this transformers' vision towers return an output object (>= 5.0, per verl's own
    ``unpack_visual_output``) rather than a tensor (4.x, where verl's no-pixel branch works)."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).major >= 5


def is_qwen2_vl_bug_present() -> bool:
    """True when verl's no-pixel branch does not unpack the vision output and transformers returns an object.

    Raises ``RuntimeError`` when verl's function matches neither the buggy nor the fixed form (a verl that
    verl_tor was not checked against): patching it blindly could corrupt the forward.
    """
    module = _module()
    original = original_of(module._get_input_embeds)
    source = inspect.getsource(original)
    if BUGGY_LINE in source:
        return _vision_returns_object()
    if FIXED_LINE in source:
        return False
    raise RuntimeError(
        f"{TARGET}._get_input_embeds has neither the known buggy nor the fixed no-pixel branch: this verl is not "
        "the one verl_tor was checked against. Fix: install verl==0.9.1, or check patches/0001-* by hand."
    )


def _fixed_no_pixel_embeds(model, input_ids, attention_mask):
    """verl's no-pixel branch with the vision output unpacked (the diff in patches/0001-*)."""
    import torch
    from verl.utils.transformers_compat import unpack_visual_output

    inputs_embeds = model.get_input_embeddings()(input_ids)
    config = model.config.vision_config
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    pixel_values = torch.zeros((16, patch_dim), dtype=inputs_embeds.dtype, device=inputs_embeds.device)
    image_grid_thw = torch.tensor([[1, 4, 4]], dtype=torch.long, device=inputs_embeds.device)
    image_embeds, _ = unpack_visual_output(model.visual(pixel_values, grid_thw=image_grid_thw))
    inputs_embeds = inputs_embeds + 0.0 * image_embeds.mean()
    if attention_mask is not None:
        attention_mask = attention_mask.to(inputs_embeds.device)
    return inputs_embeds, attention_mask


def _wrap(original):
    @functools.wraps(original)
    def _get_input_embeds(
        model,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
    ):
        if pixel_values is None and pixel_values_videos is None:
            return _fixed_no_pixel_embeds(model, input_ids, attention_mask)
        return original(
            model, input_ids, attention_mask, pixel_values, pixel_values_videos, image_grid_thw, video_grid_thw
        )

    return _get_input_embeds


# verl's callers (qwen2_vl_base_forward, qwen2_vl_forward) look the name up in the module at call time: no importers
QWEN2_VL_FIX = RuntimeFix(
    target=TARGET,
    name="_get_input_embeds",
    is_bug_present=is_qwen2_vl_bug_present,
    wrap=_wrap,
    what="no-pixel vision output unpacking",
)
apply_qwen2_vl_fix = QWEN2_VL_FIX.apply
"""Install the fix if the bug is present (idempotent). Returns whether the fix is active now."""
revert_qwen2_vl_fix = QWEN2_VL_FIX.revert
"""Restore verl's original function (tests)."""
