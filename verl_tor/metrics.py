"""Every metric key verl_tor logs, in one place (verl style: one namespace, ``tor/``; timings under ``timing_s/``).

The README's metrics table lists exactly these; a test keeps the two in step.
"""

ENTROPY_THRESHOLD = "tor/entropy_threshold"
"""Smallest entropy among the selected reasoning tokens T_r (nats; batch scope: the global cut)."""
SENSITIVITY_THRESHOLD = "tor/sensitivity_threshold"
"""Smallest visual sensitivity S_t among the selected perception tokens T_p."""
REASONING_FRAC = "tor/reasoning_frac"
"""|T_r| / valid response tokens."""
PERCEPTION_FRAC = "tor/perception_frac"
"""|T_p| / valid response tokens."""
OVERLAP_FRAC = "tor/overlap_frac"
"""|T_r ∩ T_p| / valid response tokens."""
SELECTED_FRAC = "tor/selected_frac"
"""Fraction of valid response tokens with a non-zero weight."""
WEIGHT_MEAN = "tor/weight_mean"
"""Mean token weight w_t over valid response tokens."""
SENSITIVITY_MEAN_SELECTED = "tor/sensitivity_mean/selected"
"""Mean S_t over T_p."""
SENSITIVITY_MEAN_REST = "tor/sensitivity_mean/rest"
"""Mean S_t over valid tokens outside T_p."""
ENTROPY_MEAN_SELECTED = "tor/entropy_mean/selected"
"""Mean entropy over T_r."""
ENTROPY_MEAN_REST = "tor/entropy_mean/rest"
"""Mean entropy over valid tokens outside T_r."""
NO_IMAGE_FRAC = "tor/no_image_frac"
"""Fraction of responses whose prompt had no image: S_t = 0, and their tokens take no part in the ranking of T_p
(logged when the image-free pass runs)."""
NOIMG_SCORED_FRAC = "tor/noimg_scored_frac"
"""Fraction of responses the image-free pass scored. 0 when the pass is skipped (``mode`` reasoning_only /
all_tokens, or ``mode=tor`` with γ_p = 0); below 1 with text-only prompts, view fallbacks or
``rank_tokens=informative`` (responses with advantage 0 everywhere are not scored)."""
VIEW_FALLBACK_FRAC = "tor/view_fallback_frac"
"""Fraction of responses whose image-free view could not be built (a response holding vision tokens, a video
under ``image_view=blank|noise``): S_t = 0 for them, they take no part in T_p, and the step warns once."""
INFORMATIVE_FRAC = "tor/informative_frac"
"""Fraction of valid response tokens with a non-zero advantage: the tokens ranked under
``rank_tokens=informative`` (logged only then)."""
TIMING_NOIMG = "timing_s/tor_noimg"
"""Seconds spent building the image-free view and scoring it."""
TIMING_SELECT = "timing_s/tor_select"
"""Seconds spent ranking tokens and building the weights."""

ALL_METRICS: tuple[str, ...] = tuple(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str))
