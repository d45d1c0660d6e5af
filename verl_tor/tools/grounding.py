"""ToR measured on the figure reader: do perception tokens land on what the image shows?

``measure_tor`` runs the real ToR path (``verl_tor.tools.demo.run_tor``: verl rows built by verl's agent-loop code,
the old-policy pass, ``verl_tor.stage.ToRStage`` with its image-free views, the selection ops) on a batch of
responses, labels every response token with the task's ground truth (``verl_tor.figures.task.label_response``:
side digits read from the figure, restated, computed, answer, operators, template) and reports:

- **grounding precision of T_p**: the share of perception tokens that are figure-derived characters, against the
  share such tokens have among all valid tokens (what a random T_p of the same size would hold);
- **where T_r falls**: the kinds of the reasoning tokens, and the overlap |T_r ∩ T_p|;
- **full vs top-p entropy**: the share of the full-entropy T_r that the top-p (0.95) entropy also selects, on the
  model's own next-token distributions (a second old-policy pass with ``tor.entropy=top_p``).

``ControlScorer`` wraps the scorer with a deliberately broken image-free pass (the image kept, the log-probs
shifted by one token, the wrong temperature): negative controls that a sound measurement must tell apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from verl_tor.config import ToRConfig
from verl_tor.figures.task import FIGURE_KINDS, KINDS, label_response

__all__ = [
    "CONTROLS",
    "ControlScorer",
    "ToRMeasurement",
    "label_tokens",
    "reference_responses",
    "measure_tor",
]

CONTROLS = ("image_kept", "shifted", "wrong_temperature")
"""Broken image-free passes: ``image_kept`` scores the with-image rows again (S_t = 0 everywhere);
``shifted`` moves the image-free log-probs one token later (the off-by-one of a wrong response slice);
``wrong_temperature`` scores the image-free view at ``wrong_temperature`` while the old pass used 1.0."""


def label_tokens(tokenizer: Any, response_ids: torch.Tensor) -> tuple[list[str], bool]:
    """Kind (``KINDS``) of every token of one response, and whether the whole response follows the answer format.

    Decodes growing prefixes to find each token's characters (special tokens kept, so the end-of-turn token is
    ``template``); a token takes the kind of its first non-template character (``label_response``: the part after
    the first deviation from the format is ``unparsed``). With the figure reader's tokenizer every digit is its own
    token, so digit kinds never share a token.
    """

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    ids = [int(t) for t in response_ids]
    text = decode(ids)
    char_kinds, parsed = label_response(text, tokenizer.eos_token)
    bounds = [len(decode(ids[:i])) for i in range(len(ids) + 1)]
    kinds = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if bounds[-1] != len(text) or end < start:  # a byte piece of a character: no reliable span
            kinds.append("unparsed")
            continue
        chars = char_kinds[start:end] or char_kinds[max(0, start - 1) : start] or ["unparsed"]  # empty: neighbour
        span = [k for k in chars if k != "template"]
        kinds.append(span[0] if span else "template")
    return kinds, parsed


def reference_responses(tokenizer: Any, problems: Sequence[Any]) -> list[list[torch.Tensor]]:
    """The target response of each problem (+ the end-of-turn token) as one "sampled" response, for teacher forcing."""
    out = []
    for problem in problems:
        ids = tokenizer(problem.target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        out.append([torch.tensor(ids, dtype=torch.long)])
    return out


class ControlScorer:
    """A scorer whose image-free pass is deliberately broken (``CONTROLS``); the old-policy pass is untouched.

    Wraps an ``in_process`` scorer as ``verl_tor.tools.demo.run_tor`` uses it (trajectories in the ``train``
    partition of its store, the image-free rows in ``verl_tor.stage.VIEW_PARTITION``)."""

    def __init__(self, inner: Any, control: str, wrong_temperature: float = 0.5):
        if control not in CONTROLS:
            raise ValueError(f"control={control!r}: choose one of {CONTROLS}")
        self.inner, self.control, self.wrong_temperature = inner, control, wrong_temperature
        self.store = inner.store

    @property
    def calls(self) -> list[dict]:
        return self.inner.calls

    def compute_old_log_prob(self, *args, **kwargs) -> None:
        self.inner.compute_old_log_prob(*args, **kwargs)

    def __call__(self, meta: Any) -> Any:
        from verl_tor.stage import VIEW_KEY_SUFFIX, VIEW_PARTITION, rows_to_tensordict, tensordict_to_rows

        if meta.partition_id != VIEW_PARTITION:
            return self.inner(meta)
        if self.control == "image_kept":
            originals = [k[: -len(VIEW_KEY_SUFFIX)] for k in meta.keys]
            rows = tensordict_to_rows(self.store.kv_batch_get(originals, "train"))
            self.store.kv_batch_put(meta.keys, VIEW_PARTITION, fields=rows_to_tensordict(rows))
            return self.inner(meta)
        if self.control == "wrong_temperature":
            meta.extra_info = {**dict(meta.extra_info or {}), "temperature": self.wrong_temperature}
            return self.inner(meta)
        out = self.inner(meta)  # shifted: position s gets the log-prob of position s-1
        scored = self.store.kv_batch_get(meta.keys, VIEW_PARTITION, ["log_probs"])["log_probs"]
        shifted = [{"log_probs": torch.roll(row, 1)} for row in scored.unbind(0)]
        self.store.kv_batch_put(meta.keys, VIEW_PARTITION, fields=rows_to_tensordict(shifted))
        return out


@dataclass
class ToRMeasurement:
    """Token-level results of one ToR pass over a batch, with the ground-truth kind of every token."""

    kinds: torch.Tensor
    """(B, T) long: index into ``KINDS`` per token; -1 on padding."""
    response_mask: torch.Tensor
    reasoning: torch.Tensor
    """(B, T) bool, T_r (full-vocabulary entropy, ρ_r)."""
    perception: torch.Tensor
    """(B, T) bool, T_p (ρ_p)."""
    entropy: torch.Tensor
    sensitivity: torch.Tensor
    parsed: torch.Tensor
    """(B,) bool: the response follows the answer format (else all its tokens are ``unparsed``)."""
    metrics: dict[str, float]
    """The stage's ``tor/*`` metrics."""
    reasoning_top_p: torch.Tensor | None = None
    """(B, T) bool, T_r ranked by the top-p entropy instead (same ρ_r, same tie-breaking seed)."""
    entropy_top_p: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def mask_of(self, *kinds: str) -> torch.Tensor:
        ids = torch.tensor([KINDS.index(k) for k in kinds])
        return torch.isin(self.kinds, ids) & self.response_mask

    @property
    def figure(self) -> torch.Tensor:
        """(B, T) bool: figure-derived tokens (``FIGURE_KINDS``: side digits read and restated)."""
        return self.mask_of(*FIGURE_KINDS)

    def share(self, of: torch.Tensor, within: torch.Tensor | None = None) -> float:
        """|of ∩ within| / |within| (``within`` defaults to every valid token); 0.0 when ``within`` is empty."""
        within = self.response_mask if within is None else within & self.response_mask
        n = int(within.sum())
        return float((of & within).sum()) / n if n else 0.0

    def grounding(self, selected: torch.Tensor | None = None) -> dict[str, float]:
        """Grounding of a token set (default T_p): precision, chance, lift, and recall of the read side digits."""
        selected = self.perception if selected is None else selected
        precision = self.share(self.figure, selected)
        chance = self.share(self.figure)
        read = self.mask_of("read")
        return {
            "precision": precision,
            "chance": chance,
            "lift": precision / chance if chance else float("nan"),
            "read_recall": self.share(selected, read),
            "read_chance": self.share(selected),
        }

    def top_fraction(self, ratio: float, seed: int = 0) -> torch.Tensor:
        """The top ``ratio`` of valid tokens by S_t (the selection op the stage uses, batch scope)."""
        from verl_tor.ops import select_top_fraction

        return select_top_fraction(self.sensitivity, self.response_mask, ratio, seed=seed)

    def composition(self, selected: torch.Tensor) -> dict[str, float]:
        """Share of each kind in ``selected``."""
        return {kind: self.share(self.mask_of(kind), selected) for kind in KINDS}


def measure_tor(
    model: Any,
    processor: Any,
    problems: Sequence[Any],
    responses: list[list[torch.Tensor]],
    config: ToRConfig | None = None,
    control: str | None = None,
    wrong_temperature: float = 0.5,
    with_top_p: bool = False,
) -> ToRMeasurement:
    """Run the real ToR stage on ``responses`` to ``problems`` and label every token.

    Args:
        problems: ``Problem``s (image, question, target).
        responses: ``[problem][sample]`` response token ids (``sample_responses`` or ``reference_responses``).
        config: the ``tor`` block (default: the paper's, ``enable=True``).
        control: a broken image-free pass (``CONTROLS``) instead of the real one.
        with_top_p: also rank T_r by the top-p entropy (a second old-policy pass, ``tor.entropy=top_p``).
    """
    from verl_tor.tools.demo import build_batch, run_tor
    from verl_tor.tools.in_process import LocalLogProbScorer

    cfg = config or ToRConfig(enable=True)
    items = [{"image": p.image, "question": p.question} for p in problems]
    rows, keys = build_batch(processor, items, responses)

    def make_scorer(store):
        scorer = LocalLogProbScorer.for_model(store, model)
        return ControlScorer(scorer, control, wrong_temperature) if control else scorer

    _, metrics, tensors, _, _ = run_tor(model, processor, rows, keys, cfg, progress=False, make_scorer=make_scorer)
    mask = tensors["response_mask"]
    kinds = torch.full(mask.shape, -1, dtype=torch.long)
    parsed = torch.zeros(len(rows), dtype=torch.bool)
    for i, row in enumerate(rows):
        labels, ok = label_tokens(processor.tokenizer, row["responses"])
        kinds[i, : len(labels)] = torch.tensor([KINDS.index(k) for k in labels])
        parsed[i] = ok
    result = ToRMeasurement(
        kinds=kinds,
        response_mask=mask,
        reasoning=tensors["reasoning"],
        perception=tensors["perception"],
        entropy=tensors["entropy"],
        sensitivity=tensors["sensitivity"],
        parsed=parsed,
        metrics=metrics,
    )
    if with_top_p:
        cfg_p = cfg.replace(entropy="top_p", mode="reasoning_only")
        _, _, tensors_p, _, _ = run_tor(model, processor, rows, keys, cfg_p, progress=False)
        result.reasoning_top_p = tensors_p["reasoning"]
        result.entropy_top_p = tensors_p["entropy"]
    return result
