"""verl_tor: Token Reweighting (ToR, arXiv 2603.25077) for multimodal RLVR, as a verl 0.9.1 plugin.

Importing this package is cheap (no torch, no verl): the config lives in ``verl_tor.config``, the tensor ops in
``verl_tor.ops`` (torch only), and the verl-facing layer in ``verl_tor.plugin`` / ``verl_tor.trainer``.
"""

__version__ = "0.1.0"

SUPPORTED_VERL = ">=0.9.1,<0.9.2"
"""The verl versions whose internals verl_tor's hooks were checked against (see ``patches/``)."""
