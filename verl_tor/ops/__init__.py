"""Pure tensor ops of ToR (torch only; importable without verl or Ray). Shapes and units in each docstring."""

from verl_tor.ops.entropy import compute_entropy_from_logits, compute_top_p_entropy_from_logits
from verl_tor.ops.select import build_segments, count_top_fraction, select_top_fraction, select_top_k_per_segment
from verl_tor.ops.sensitivity import SENSITIVITY_FNS, compute_visual_sensitivity
from verl_tor.ops.weights import ToRSelection, compute_tor_weights, make_generator, select_tor_tokens

__all__ = [
    "SENSITIVITY_FNS",
    "ToRSelection",
    "build_segments",
    "compute_entropy_from_logits",
    "compute_top_p_entropy_from_logits",
    "compute_tor_weights",
    "compute_visual_sensitivity",
    "count_top_fraction",
    "make_generator",
    "select_top_fraction",
    "select_top_k_per_segment",
    "select_tor_tokens",
]
