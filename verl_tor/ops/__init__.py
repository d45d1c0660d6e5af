"""Pure tensor ops of ToR: entropy, visual sensitivity, exact top-fraction selection, token weights.

Torch (and numpy) only: ``import verl_tor.ops`` works without verl or Ray. Tensors are verl's padded ``(B, T)``
response tensors with ``response_mask``; shapes and units are in each docstring.
"""

from verl_tor.ops.entropy import (
    DEFAULT_ACCELERATOR_TOP_P_CHUNK_SIZE,
    DEFAULT_ENTROPY_CHUNK_SIZE,
    TOP_P_METHODS,
    compute_entropy_from_logits,
    compute_top_p_entropy_from_logits,
    default_top_p_chunk_size,
)
from verl_tor.ops.select import (
    build_segments,
    compute_selection_threshold,
    compute_tie_keys,
    count_top_fraction,
    select_top_fraction,
    select_top_k_per_segment,
)
from verl_tor.ops.sensitivity import SENSITIVITY_FNS, compute_visual_sensitivity
from verl_tor.ops.weights import ToRSelection, compute_tor_weights, make_generator, select_tor_tokens

__all__ = [
    "DEFAULT_ACCELERATOR_TOP_P_CHUNK_SIZE",
    "DEFAULT_ENTROPY_CHUNK_SIZE",
    "SENSITIVITY_FNS",
    "TOP_P_METHODS",
    "ToRSelection",
    "build_segments",
    "compute_entropy_from_logits",
    "compute_selection_threshold",
    "compute_tie_keys",
    "compute_top_p_entropy_from_logits",
    "compute_tor_weights",
    "compute_visual_sensitivity",
    "count_top_fraction",
    "default_top_p_chunk_size",
    "make_generator",
    "select_top_fraction",
    "select_top_k_per_segment",
    "select_tor_tokens",
]
