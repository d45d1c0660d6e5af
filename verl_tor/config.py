"""The one ToR config: every knob of Token Reweighting, documented once, validated with named errors.

Importable without torch or verl (the CLI, the docs and the recipe tests read it on machines with neither).
A user writes it as a ``tor:`` block in a verl/hydra config or as ``+tor.<field>=<value>`` overrides;
``ToRConfig.from_mapping`` turns either (a dict or an omegaconf ``DictConfig``) into this dataclass.

Paper: "Bridging Perception and Reasoning: Token Reweighting for RLVR in Multimodal LLMs" (arXiv 2603.25077).
Defaults are the paper's except ``entropy`` (the paper's values: ``PAPER``); ``enable=False`` makes every verl_tor
hook a no-op.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import numbers
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from typing import Any

__all__ = ["ToRConfig", "ToRConfigError", "CHOICES", "PAPER"]


class ToRConfigError(ValueError):
    """A ``tor.*`` value is invalid; the message names the field, the value and the fix."""


# Allowed values of the enumerated fields, first = default. One place: the dataclass, the docs and the
# validation all read this table.
CHOICES: dict[str, tuple[str, ...]] = {
    "scope": ("batch", "sequence", "group"),
    "entropy": ("full", "top_p"),
    "sensitivity": ("abs_log_ratio", "prob_diff", "entropy_diff", "k3"),
    "image_view": ("remove", "blank", "noise"),
    "scorer_policy": ("old", "ref"),
    "apply": ("advantage", "loss"),
    "mode": ("tor", "reasoning_only", "perception_only", "random", "all_tokens"),
    "rank_tokens": ("all", "informative"),
}

FLOAT32_MAX = 3.4028234663852886e38
"""Largest finite float32: ToR's scores, weights and advantages are float32 tensors."""
FLOAT32_TINY = 1.1754943508222875e-38
"""Smallest positive normal float32; a smaller non-zero value becomes subnormal or 0 in those tensors."""
SEED_LIMIT = 1 << 63
"""Seeds are used as torch generator seeds and int64 tensor values: 0 <= seed < 2**63."""

# The paper's settings (arXiv 2603.25077, §3-4), in one place: the GPU recipes pass exactly these
# (verl_tor/recipes/common.sh) and tests/test_recipes_on_cpu.py checks every "paper" value of the recipes and README
# against this table. ToRConfig's defaults equal it except `entropy` (default `full`, the free option; see its doc).
PAPER: dict[str, Any] = {
    "reasoning_ratio": 0.3,  # ρ_r
    "perception_ratio": 0.3,  # ρ_p
    "reasoning_weight": 1.0,  # γ_r
    "perception_weight": 0.5,  # γ_p
    "scope": "batch",  # both thresholds over every response token of the rollout batch
    "entropy": "top_p",  # reasoning score: entropy of the top-p truncated, renormalised distribution
    "entropy_top_p": 0.95,
    "sensitivity": "abs_log_ratio",  # |log π(o_t|I,q,o_<t) − log π(o_t|∅,q,o_<t)|
    "image_view": "remove",  # ∅: the image removed from the prompt
    "scorer_policy": "old",  # the same old policy scores both views
    "mode": "tor",  # γ_r on T_r, γ_p on T_p \ T_r, 0 elsewhere
    "rank_tokens": "all",  # every valid response token takes part in the ranking
}


@dataclass(frozen=True)
class ToRConfig:
    """Token Reweighting (ToR) settings, the ``tor:`` block of a verl config."""

    enable: bool = False
    """Switch ToR on. ``False`` (default) leaves verl untouched: advantages and loss are bit-identical to stock
    verl with ``trainer.v1.trainer_mode=sync``."""

    reasoning_ratio: float = 0.3
    """ρ_r, fraction of valid response tokens (per ``scope``) chosen as reasoning tokens T_r: the highest-entropy
    ones. Range [0, 1]; ceil(ρ_r·N) tokens are selected exactly. Paper default 0.3 (ablation: 0.2-0.8)."""

    perception_ratio: float = 0.3
    """ρ_p, fraction of valid response tokens (per ``scope``) chosen as perception tokens T_p: the most
    visually sensitive ones. Range [0, 1]; ceil(ρ_p·N) tokens. Paper default 0.3 (ablation: 0.2-0.8)."""

    reasoning_weight: float = 1.0
    """γ_r, weight of the surrogate on T_r (reasoning tokens, including those also in T_p). Range >= 0, finite.
    Paper default 1.0."""

    perception_weight: float = 0.5
    """γ_p, weight of the surrogate on T_p \\ T_r (perception-only tokens). Range >= 0, finite. Paper default
    0.5 (ablation: 0.1-1.5, 0.5 best). Tokens in neither set get weight 0. With ``mode=tor`` and γ_p = 0, T_p
    cannot change any weight, so the image-free pass is skipped (``tor/noimg_scored_frac`` = 0)."""

    scope: str = "batch"
    """Where the top-ρ ranking happens: ``batch`` (paper: over all response tokens of the rollout batch),
    ``sequence`` (per response) or ``group`` (per prompt group, by verl's ``uid``)."""

    entropy: str = "full"
    """Entropy used to rank reasoning tokens: ``top_p`` (paper: the entropy of the top-p truncated, renormalised
    distribution; computed from the logits in the old-policy pass by an engine hook, so it needs
    ``use_fused_kernels=False``; the GPU recipes run it) or ``full`` (the full-vocabulary entropy, which verl's
    old-log-prob pass already returns for free). Default ``full``, the cheap option, not the paper's: on synthetic
    LLM-like distributions the two select 98.7% the same T_r at ρ_r=0.3 (``benchmarks/bench_entropy_agreement.py``);
    check a real model with ``verl-tor inspect ... tor.entropy=top_p`` before relying on it."""

    entropy_top_p: float = 0.95
    """p of the top-p truncation when ``entropy=top_p``: keep the smallest set of tokens whose cumulative
    probability is >= p, renormalise, take the entropy. Range (0, 1]; 1.0 equals ``full``. Paper 0.95."""

    sensitivity: str = "abs_log_ratio"
    """Visual-sensitivity score S_t of a token: ``abs_log_ratio`` (paper: |log π(o_t|I,q,o_<t) − log π(o_t|∅,q,o_<t)|),
    ``prob_diff`` (|Δp|), ``entropy_diff`` (|ΔH|, needs the image-free entropy; both entropies of the kind
    ``entropy`` picks, top-p or full) or ``k3`` (k3 KL estimator, clamped as PAPO/VPPO do). The paper's ablation
    finds |Δ log p| best."""

    image_view: str = "remove"
    """How the image-free view ∅ is built: ``remove`` (paper: delete the vision tokens from the prompt and drop
    the pixels), ``blank`` (same-size black image, same tokens) or ``noise`` (Gaussian noise on the pixels, drawn
    per trajectory from ``seed``, the step and the trajectory's prompt and response, whatever its place in the
    batch)."""

    noise_std: float = 1.0
    """Standard deviation of the Gaussian noise for ``image_view=noise``, in units of the processor's normalised
    pixel values (whose std is ~1). Range > 0. Not in the paper (ours)."""

    scorer_policy: str = "old"
    """Which policy scores the image-free view: ``old`` (paper: the same old policy as the rollout's
    old_log_prob) or ``ref`` (the frozen reference model; needs a ref worker, and then compares ref(∅) with
    old(I), which the paper does not do)."""

    apply: str = "advantage"
    """How weights reach the loss: ``advantage`` (multiply advantages by w_t; exact for verl's vanilla/DAPO
    clipped loss since w_t >= 0 factors out of the clip) or ``loss`` (wrap verl's ``ppo_loss`` and multiply w_t
    into ``rollout_is_weights``; works for every registered policy loss that uses them)."""

    mode: str = "tor"
    """``tor`` (paper: γ_r on T_r, γ_p on T_p \\ T_r), the paper's ablation arms ``reasoning_only`` (γ_r on T_r)
    and ``perception_only`` (γ_p on T_p), ``random`` (a control: |T_r ∪ T_p| tokens drawn uniformly per scope,
    |T_r| of them weighted γ_r and the rest γ_p, so the weight histogram matches ``tor``; it still runs the
    image-free pass to count T_p) or ``all_tokens`` (weight 1 everywhere: plain GRPO/DAPO through the ToR path)."""

    allow_gae: bool = False
    """Allow ToR with a critic (``algorithm.adv_estimator=gae``, PPO). ToR then multiplies each token's GAE
    advantage by its weight w_t ∈ {0, γ_p, γ_r}: the tokens outside T_r ∪ T_p (40-70 % at the paper's ratios) lose
    their per-token credit, the whitened advantages no longer have mean 0 / std 1 over the tokens that train, and
    the critic still trains on every token's return. Not what the paper studies (outcome rewards: GRPO, DAPO).
    Default ``false``: ``gae`` is refused with this reason."""
    rank_tokens: str = "all"
    """Which tokens take part in the top-ρ ranking: ``all`` (paper: every valid response token) or
    ``informative`` (only tokens with a non-zero advantage; ours, not the paper's). In GRPO a group whose rewards
    are all equal has advantage 0 on every token: those tokens cannot change the policy gradient, yet under
    ``all`` they use up the ρ budget. ``informative`` selects ceil(ρ·N) of the N informative tokens per scope,
    gives the others weight 0, and skips the image-free pass for responses without an informative token (counted
    in ``tor/noimg_scored_frac``); the ``tor/*`` fractions are then over informative tokens. The stage reads the
    advantages for it, also with ``apply=loss``. Zero means exactly 0: verl's GRPO gives exact zeros to an all-equal
    group whose reward has an exact float32 mean (0, 0.1, 0.9, 1 with 12 rollouts), but leaves rounding noise
    (|A| up to ~0.1 for 0.7 × 12) otherwise, and such tokens count as informative."""

    seed: int = 0
    """Seed of the deterministic tie-breaking permutation (top-p entropy gives many exact zeros) and of the
    ``random`` mode. Combined with the training step, so each step breaks ties differently but reproducibly."""

    log_token_maps: int = 0
    """Write an HTML token map of sampled rollouts every this many training steps (0 = never). Range >= 0."""

    log_token_maps_rollouts: int = 4
    """How many rollouts each token map renders. Range >= 1."""

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, block: Any | None) -> ToRConfig:
        """Build from a ``tor:`` block: ``None``, a dict, or an omegaconf ``DictConfig`` (resolved).

        Unknown keys raise ``ToRConfigError`` with the closest valid name.
        """
        if block is None:
            return cls()
        if isinstance(block, cls):
            return block
        if not isinstance(block, Mapping):
            try:  # omegaconf DictConfig; imported lazily to keep this module dependency-free
                from omegaconf import DictConfig, OmegaConf

                if isinstance(block, DictConfig):
                    block = OmegaConf.to_container(block, resolve=True)
            except ImportError:  # pragma: no cover - omegaconf always present next to verl
                pass
        if not isinstance(block, Mapping):
            raise ToRConfigError(
                f"tor: expected a mapping of tor.* fields, got {type(block).__name__} {block!r}. "
                "Fix: write `tor:` as a block of fields (e.g. `+tor.enable=true`)."
            )
        names = [f.name for f in fields(cls)]
        for key in block:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean tor.{close[0]}?" if close else f"valid fields: {', '.join(names)}"
                raise ToRConfigError(f"tor.{key}: unknown field. Fix: {hint}")
        return cls(**dict(block))

    def replace(self, **changes: Any) -> ToRConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def fail(name: str, fix: str) -> None:
            raise ToRConfigError(f"tor.{name}={getattr(self, name)!r} is invalid. Fix: {fix}")

        def coerce_float(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                fail(name, "give a number")
            # numpy's float32/float16 print as the number that was meant (np.float32(0.3) -> "0.3"), whereas
            # float() gives their binary value (0.30000001192092896), which would move ceil(ρ·N)
            number = float(str(value)) if _is_narrow_numpy_float(value) else float(value)
            if not math.isfinite(number):
                fail(name, "give a finite number")
            if abs(number) > FLOAT32_MAX or 0 < abs(number) < FLOAT32_TINY:
                fail(
                    name,
                    f"give 0 or a magnitude in [{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}]: ToR's tensors are float32, "
                    "where this value overflows to inf or underflows to 0",
                )
            object.__setattr__(self, name, number)  # ints (and numpy numbers) from the command line are fine
            return number

        def check_int(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                fail(name, f"give an integer >= {low}")
            if high is not None and value >= high:
                fail(name, f"give an integer < {high} (2**63: it seeds torch generators, which hold int64)")
            object.__setattr__(self, name, int(value))

        for name in ("enable", "allow_gae"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "give true or false")
        for name in ("reasoning_ratio", "perception_ratio"):
            if not 0.0 <= coerce_float(name) <= 1.0:
                fail(name, "give a fraction in [0, 1] (paper: 0.3)")
        for name in ("reasoning_weight", "perception_weight"):
            if coerce_float(name) < 0.0:
                fail(name, "give a weight >= 0 (a negative weight flips the sign of the policy gradient)")
        if not 0.0 < coerce_float("entropy_top_p") <= 1.0:
            fail("entropy_top_p", "give p in (0, 1] (paper: 0.95)")
        if coerce_float("noise_std") <= 0.0:
            fail("noise_std", "give a standard deviation > 0")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                value = getattr(self, name)
                close = difflib.get_close_matches(str(value), choices, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                fail(name, f"choose one of {', '.join(choices)}{hint}")
        check_int("seed", 0, SEED_LIMIT)
        check_int("log_token_maps", 0)
        check_int("log_token_maps_rollouts", 1)

        # Interactions: a setting that would zero every token's weight trains nothing; refuse it up front.
        if self.mode in ("tor", "random"):
            selects_nothing = (self.reasoning_ratio == 0 or self.reasoning_weight == 0) and (
                self.perception_ratio == 0 or self.perception_weight == 0
            )
            if selects_nothing:
                fail("mode", "with these ratios/weights every token gets weight 0; raise a ratio or a weight")
        elif self.mode == "reasoning_only" and (self.reasoning_ratio == 0 or self.reasoning_weight == 0):
            fail("mode", "reasoning_only needs tor.reasoning_ratio > 0 and tor.reasoning_weight > 0")
        elif self.mode == "perception_only" and (self.perception_ratio == 0 or self.perception_weight == 0):
            fail("mode", "perception_only needs tor.perception_ratio > 0 and tor.perception_weight > 0")

    # ------------------------------------------------------------------ derived facts
    @property
    def needs_image_free_pass(self) -> bool:
        """Whether the extra image-free forward pass is needed: not for reasoning_only / all_tokens, nor for
        ``mode=tor`` with γ_p = 0 (T_p \\ T_r then gets weight 0, and T_r carries its own weight whatever T_p is)."""
        if self.mode in ("reasoning_only", "all_tokens"):
            return False
        if self.mode == "tor" and self.perception_weight == 0:
            return False
        return self.perception_ratio > 0

    @property
    def needs_image_free_entropy(self) -> bool:
        return self.needs_image_free_pass and self.sensitivity == "entropy_diff"

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Field name -> its attribute docstring (the single source of the docs; the README table is built from it)."""
        return _field_docs(cls)


def _is_narrow_numpy_float(value: Any) -> bool:
    """A numpy float of fewer than 64 bits (numpy is not imported here: this module imports without it)."""
    dtype = getattr(value, "dtype", None)
    return type(value).__module__ == "numpy" and getattr(dtype, "kind", "") == "f" and dtype.itemsize < 8


@cache
def _field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
