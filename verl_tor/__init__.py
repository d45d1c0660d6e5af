"""verl_tor: Token Reweighting (ToR, arXiv 2603.25077) for multimodal RLVR, as a verl plugin (verl 0.9.1 and main).

Importing this package is cheap (no torch, no verl): the config lives in ``verl_tor.config``, the tensor ops in
``verl_tor.ops`` (torch only), and everything that touches verl's internals in ``verl_tor.integration``.
"""

__version__ = "0.1.0"

SUPPORTED_VERL = ">=0.9.1,<0.11.0.dev0"
"""The verl versions whose internals verl_tor's hooks were checked against: the 0.9.1 release and verl's main branch
(0.10.0.dev). The upper bound is written as a pre-release on purpose: ``SpecifierSet(">=0.9.1,<0.11")`` skips
pre-releases and refuses ``0.10.0.dev0`` (main's version), while a bound that is itself a pre-release admits them
(PEP 440) and still excludes 0.11's own dev builds. One string means the same to ``SpecifierSet``, to pip and to a
reader, with no ``prereleases=True`` flag to forget at a second call site. How to bump: ``patches/README.md``."""

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
"""transformers ``model_type`` of the vision-language families ToR's views, stage and engine forward are tested on."""

SUPPORTED_MODELS = "Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense)"
"""The same families, for error messages and docs."""
