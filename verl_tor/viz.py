"""Token maps: which response tokens ToR picked, as a self-contained HTML page (no CDN, no JavaScript needed).

Each response token is a ``<span class="tok {reasoning|perception|both|none}">`` with a hover title giving its
entropy, |Δ log p| and weight (plus ``tie``/``tie-out`` when the seeded tie-break decided it); the header shows the
legend (what each colour and mark means), the thresholds and two inline-SVG histograms of entropy and |Δ log p| over
the batch with the selection cut marked (the paper's Figure 5 view). One card per rollout, titled by prompt and
rollout number ("prompt 3 · rollout 2/4"), shows the question, the figure, what the run knows about the rollout's
outcome (reward, the response's ``\\boxed{}`` answer, the ground truth; a field the caller does not have is marked
absent, never guessed) and the response. Used by ``verl-tor demo``, ``verl-tor inspect`` and, every
``tor.log_token_maps`` steps, by the training stage (``TrainingTokenMapWriter``).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "CardFact",
    "TokenMapRollout",
    "card_facts",
    "classify_tokens",
    "extract_boxed",
    "find_ties",
    "number_rollouts",
    "render_token_map",
    "render_histogram_svg",
    "token_pieces",
    "TrainingTokenMapWriter",
]

CLASSES = ("both", "reasoning", "perception", "none")
COLORS = {"both": "#b15cff", "reasoning": "#ff8c42", "perception": "#3fa7f5", "none": "transparent"}


FIGURE_LABEL_COLORS = ("black", "blue", "red", "dark green")
"""The colours ``verl_tor.figures.task`` draws a figure's side labels in: one per figure, drawn at random as part of
the task's input (a test keeps this list equal to the task's). The page says so, so that nobody reads a label's
colour as a mark of a right or wrong rollout."""


@dataclass
class CardFact:
    """One item of a card's outcome line: ``value``, or ``None`` with ``absent`` saying why it is missing."""

    label: str
    value: str | None
    absent: str = ""


@dataclass
class TokenMapRollout:
    """One response to render. Per-token lists have the response's length (valid tokens only).

    ``ties`` (optional, per token): ``"picked"`` / ``"left"`` when the token's score equals the cut of a set it
    competed for and the seeded tie-break chose it / left it out (``find_ties``), else ``""``; ``tie_notes`` says
    which set and score, for the hover text.
    """

    tokens: list[str]
    entropy: list[float]
    sensitivity: list[float]
    weight: list[float]
    reasoning: list[bool]
    perception: list[bool]
    prompt: str = ""
    image_png: bytes | None = None
    title: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    facts: list[CardFact] = field(default_factory=list)
    subtitle: str = ""
    ties: list[str] = field(default_factory=list)
    tie_notes: list[str] = field(default_factory=list)


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` of ``text`` as verl's Geometry3K scorer reads it, or None without one.

    Delegates to ``mathruler``'s ``extract_boxed_content`` (what the scorer calls: the last ``\\boxed{``, read to its
    matching brace, one linear pass), whose "no box" answer is the string ``"None"``; that is returned as None here
    (so a literal ``\\boxed{None}`` also reads as no answer, as it scores).
    """
    from mathruler.grader import extract_boxed_content

    content = extract_boxed_content(text)
    return None if content == "None" else content


def _format_value(value: Any, limit: int = 80) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
        return f"{float(value):.4g}"
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def card_facts(
    response_text: str,
    reward: float | None = None,
    reward_absent: str = "",
    ground_truth: Any = None,
    ground_truth_absent: str = "",
    reward_details: dict[str, Any] | None = None,
    reward_label: str = "reward",
) -> list[CardFact]:
    """A card's outcome line: reward, the response's ``\\boxed{}`` answer, ground truth, then verl's
    ``reward_extra_info`` entries (``reward_details``, e.g. ``acc``). ``None`` values stay absent, with the reason."""
    answer = extract_boxed(response_text)
    facts = [
        CardFact(reward_label, None if reward is None else _format_value(float(reward)), reward_absent),
        CardFact("answer", answer if answer is not None else "no \\boxed{}"),
        CardFact("ground truth", None if ground_truth is None else _format_value(ground_truth), ground_truth_absent),
    ]
    for name, value in list((reward_details or {}).items())[:8]:
        if value is not None and not isinstance(value, (dict, list, tuple)):
            facts.append(CardFact(str(name), _format_value(value)))
    return facts


def number_rollouts(keys: Sequence[str]) -> list[tuple[int, int, int]]:
    """Per row of a batch: (prompt number, rollout number, rollouts of that prompt), numbers from 1.

    verl's V1 keys are ``{uid}_{session}_{output}`` (``uid`` shared by a prompt's rollouts, ``session`` the rollout);
    prompts are numbered in the order they first appear in ``keys`` (the order rows reached the trainer), rollouts
    by (session, output) within their prompt. A key without that shape is a prompt of its own.
    """
    parsed: list[tuple[Any, tuple[int, int, int]]] = []  # (prompt identity, order within the prompt)
    for position, key in enumerate(keys):
        parts = str(key).rsplit("_", 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            parsed.append((parts[0], (int(parts[1]), int(parts[2]), position)))
        else:
            parsed.append(((key, position), (0, 0, position)))
    prompt_of: dict[Any, int] = {}
    for uid, _ in parsed:
        prompt_of.setdefault(uid, len(prompt_of) + 1)
    members: dict[Any, list] = {}
    for uid, order in parsed:
        members.setdefault(uid, []).append(order)
    for orders in members.values():
        orders.sort()
    return [(prompt_of[uid], members[uid].index(order) + 1, len(members[uid])) for uid, order in parsed]


def rollout_title(prompt: int, rollout: int, of: int) -> str:
    return f"prompt {prompt} · rollout {rollout}/{of}"


def find_ties(
    scores: torch.Tensor, selected: torch.Tensor, candidates: torch.Tensor, segments: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens the seeded tie-break decided (``verl_tor.ops.select``: only the tokens tied at a scope's cut).

    Args:
        scores: ``(B, T)`` the score the set was ranked by (entropy for T_r, |Δ log p| for T_p), compared in float32
            as the selection does.
        selected: ``(B, T)`` bool, the set (T_r or T_p).
        candidates: ``(B, T)`` bool, the tokens that took part in the ranking.
        segments: ``(B,)`` int64 scope id per row (``ops.select.build_segments``).

    Returns:
        ``(picked, left)``, ``(B, T)`` bool: candidates whose score equals their scope's cut (its smallest selected
        score) in a scope where some such token was selected and some was not -- ``picked`` selected, ``left`` not.
        Empty when nothing was left at the cut (no draw happened).
    """
    s = scores.to(torch.float32)
    selected, candidates = selected.bool() & candidates.bool(), candidates.bool()
    n_segments = int(segments.max()) + 1 if segments.numel() else 0
    seg = segments.to(device=s.device, dtype=torch.long).unsqueeze(1).expand_as(s)  # (B, T)
    inf = torch.tensor(float("inf"), device=s.device)
    cut = torch.full((n_segments,), float("inf"), device=s.device).scatter_reduce(
        0, seg.reshape(-1), torch.where(selected, s, inf).reshape(-1), reduce="amin"
    )  # (S,) smallest selected score per scope
    at_cut = candidates & torch.isfinite(cut[seg]) & (s == cut[seg])
    left = at_cut & ~selected
    has_left = (
        torch.zeros(n_segments, dtype=torch.long, device=s.device).index_add_(
            0, seg.reshape(-1), left.reshape(-1).long()
        )
        > 0
    )
    picked = at_cut & selected & has_left[seg]
    return picked, left


def classify_tokens(reasoning: Sequence[bool], perception: Sequence[bool]) -> list[str]:
    """Per token: ``both`` (T_r ∩ T_p), ``reasoning`` (T_r only), ``perception`` (T_p only) or ``none``."""
    out = []
    for r, p in zip(reasoning, perception):
        out.append("both" if r and p else "reasoning" if r else "perception" if p else "none")
    return out


def render_histogram_svg(
    values: Sequence[float], threshold: float | None, title: str, bins: int = 40, width: int = 460, height: int = 140
) -> str:
    """An inline SVG histogram of ``values`` with a red line at ``threshold`` (log-scaled counts)."""
    vals = torch.as_tensor(list(values), dtype=torch.float64)
    if vals.numel() == 0:
        label = f'<text x="8" y="20">{html.escape(title)}: no data</text>'
        return f'<svg class="hist" width="{width}" height="{height}">{label}</svg>'
    lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        hi = lo + 1.0
    counts = torch.histc(vals, bins=bins, min=lo, max=hi)
    scaled = torch.log1p(counts) / max(float(torch.log1p(counts.max())), 1e-9)
    pad, plot_h = 24, height - 40
    bar_w = (width - 2 * pad) / bins
    bars = []
    for i, s in enumerate(scaled.tolist()):
        h = s * plot_h
        bars.append(
            f'<rect x="{pad + i * bar_w:.1f}" y="{20 + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="#7a8ca3"><title>{int(counts[i])}</title></rect>'
        )
    cut = ""
    if threshold is not None and lo <= threshold <= hi:
        x = pad + (threshold - lo) / (hi - lo) * (width - 2 * pad)
        cut = (
            f'<line x1="{x:.1f}" y1="16" x2="{x:.1f}" y2="{20 + plot_h}" stroke="#d62728" stroke-width="2"/>'
            f'<text x="{x + 3:.1f}" y="14" font-size="10" fill="#d62728">cut {threshold:.3g}</text>'
        )
    return (
        f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
        f'<text x="{pad}" y="{height - 4}" font-size="11">{html.escape(title)} '
        f"(min {lo:.3g}, max {hi:.3g}; log counts)</text>{''.join(bars)}{cut}</svg>"
    )


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px} h2{font-size:16px;margin:4px 0 6px}
.legend{font-size:13px;line-height:1.7;max-width:980px;margin-bottom:10px}
.legend ul{margin:4px 0;padding-left:18px}
.legend span.tok{display:inline-block;padding:0 6px;border-radius:3px}
.rollout{border:1px solid #ddd;border-radius:6px;padding:12px;margin:12px 0}
.key{color:#999;font-size:11px;margin:0 0 6px}
.head{display:flex;gap:12px;align-items:flex-start;margin-bottom:8px}
.rollout img{max-width:160px;border:1px solid #ccc}
.prompt{color:#555;white-space:pre-wrap;font-size:13px}
.facts{font-size:13px;margin:0 0 8px}
.fact{display:inline-block;margin-right:16px} .fact b{font-weight:600;color:#444}
.fact.absent{color:#999;font-style:italic}
.response{font-family:ui-monospace,monospace;font-size:14px;line-height:1.9;white-space:pre-wrap}
.tok{border-radius:2px;padding:1px 0}
.tok.reasoning{background:#ffd2b0} .tok.perception{background:#bfe3ff} .tok.both{background:#e3c2ff}
.tok.none{color:#777} .tok.partial{display:inline-block;min-width:3px;height:1em;vertical-align:middle}
.tok.tie{text-decoration:underline dotted #c0392b 2px;text-underline-offset:3px}
table.summary td,table.summary th{padding:2px 10px;text-align:left;font-size:13px}
.hists svg{margin-right:16px;border:1px solid #eee}
"""


def render_legend(any_ties: bool, any_image: bool, ties_unmarked: str = "") -> str:
    """What the colours and marks of the page mean (paper §3.2), the tie-break and, with figures, their colours."""
    items = [
        "<span class='tok reasoning'>reasoning</span> T_r only: the top ρ_r of tokens by entropy (weight γ_r)",
        "<span class='tok perception'>perception</span> T_p only: the top ρ_p by visual sensitivity |Δ log p|, the "
        "change of the token's log-probability when the image is removed (weight γ_p; under tor.mode=tor a T_p token "
        "that is also in T_r takes γ_r)",
        "<span class='tok both'>both</span> in T_r and T_p",
        "<span class='tok none'>none</span> in neither: weight 0 under the paper's modes (its advantage does not "
        "reach the gradient)",
        "<span class='tok reasoning tie'>tie</span> (dotted underline) selected by a tie-break: the token's score "
        "equals the cut and more tokens share that exact score than places are left (e.g. entropy exactly 0 under "
        "tor.entropy=top_p: a one-token nucleus). ToR picks among the tied tokens with a seeded random draw "
        "(tor.seed; verl_tor.ops.select), never by position, so two identical-looking tokens can land on either side "
        "of the cut; the hover text of a tied token says whether the draw picked it or left it out"
        + (
            f" (not marked on this page: {ties_unmarked})"
            if ties_unmarked
            else ""
            if any_ties
            else " (no token on this page was decided by a tie)"
        ),
        "Hover a token for its entropy, |Δ log p| and weight. Cards are titled by prompt (numbered in the order the "
        "batch lists them) and rollout within the prompt; the outcome line shows the reward, the response's last "
        "\\boxed{} (what verl's Geometry3K scorer grades), the ground truth and verl's reward_extra_info entries, "
        "where the run has them; a field it does not have is marked absent",
    ]
    if any_image:
        items.append(
            "Figures are shown as the model received them (training: rebuilt from verl's pixel values). Colours in "
            "a figure are part of its input, not a mark of right or wrong: verl_tor's rectangle task draws each "
            f"figure's side labels in one colour picked at random from {', '.join(FIGURE_LABEL_COLORS)}"
        )
    return "<div class='legend'><ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul></div>"


def _render_facts(facts: Sequence[CardFact]) -> str:
    out = []
    for fact in facts:
        label = html.escape(fact.label)
        if fact.value is None:
            why = f" ({html.escape(fact.absent)})" if fact.absent else ""
            out.append(f"<span class='fact absent'><b>{label}</b> absent{why}</span>")
        else:
            out.append(f"<span class='fact'><b>{label}</b> {html.escape(fact.value)}</span>")
    return f"<div class='facts'>{''.join(out)}</div>" if out else ""


def render_token_map(
    rollouts: Sequence[TokenMapRollout],
    thresholds: dict[str, float] | None = None,
    summary: dict[str, float] | None = None,
    title: str = "ToR token map",
    all_entropy: Sequence[float] | None = None,
    all_sensitivity: Sequence[float] | None = None,
    ties_unmarked: str = "",
) -> str:
    """A complete, self-contained HTML page for ``rollouts`` (one ``h2`` card title per rollout, one ``span.tok``
    per response token). ``ties_unmarked``: why ties are not marked (``why_ties_unmarked``), "" when they are."""
    thresholds = thresholds or {}
    ent = list(all_entropy) if all_entropy is not None else [e for r in rollouts for e in r.entropy]
    sen = list(all_sensitivity) if all_sensitivity is not None else [s for r in rollouts for s in r.sensitivity]
    any_ties = any(t for r in rollouts for t in r.ties)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        render_legend(any_ties, any(r.image_png for r in rollouts), ties_unmarked),
    ]
    if thresholds or summary:
        rows = {**{f"threshold: {k}": v for k, v in thresholds.items()}, **(summary or {})}
        parts.append("<table class='summary'>")
        parts += [f"<tr><th>{html.escape(k)}</th><td>{v:.4g}</td></tr>" for k, v in rows.items()]
        parts.append("</table>")
    parts.append("<div class='hists'>")
    parts.append(render_histogram_svg(ent, thresholds.get("entropy"), "entropy (nats)"))
    parts.append(render_histogram_svg(sen, thresholds.get("sensitivity"), "|Δ log p| (visual sensitivity)"))
    parts.append("</div>")
    for i, r in enumerate(rollouts):
        classes = classify_tokens(r.reasoning, r.perception)
        ties = r.ties or [""] * len(classes)
        notes = r.tie_notes or [""] * len(classes)
        parts.append(f"<div class='rollout' data-index='{i}'>")
        parts.append(f"<h2>{html.escape(r.title or f'rollout {i + 1}')}</h2>")
        if r.subtitle:
            parts.append(f"<div class='key'>{html.escape(r.subtitle)}</div>")
        parts.append("<div class='head'>")  # the prompt image next to the prompt text, the response below both
        if r.image_png:
            b64 = base64.b64encode(r.image_png).decode("ascii")
            parts.append(f"<img alt='prompt image' src='data:image/png;base64,{b64}'>")
        if r.prompt:
            parts.append(f"<div class='prompt'>{html.escape(r.prompt)}</div>")
        parts.append("</div>")
        parts.append(_render_facts(r.facts))
        spans = []
        for tok, cls, e, s, w, tie, note in zip(r.tokens, classes, r.entropy, r.sensitivity, r.weight, ties, notes):
            tip = f"entropy {e:.3f} | |Δlog p| {s:.3f} | weight {w:.2f}"
            if tie:
                cls, tip = f"{cls} {'tie' if tie == 'picked' else 'tie-out'}", f"{tip} | {note}"
            if not tok:  # the first bytes of a character completed by a later token: a thin hoverable mark
                cls, tip = f"{cls} partial", tip + " | part of a multi-byte character"
            spans.append(
                f"<span class='tok {cls}' data-entropy='{e:.4f}' data-sensitivity='{s:.4f}' "
                f"data-weight='{w:.2f}' title='{html.escape(tip, quote=True)}'>{html.escape(tok)}</span>"
            )
        parts.append(f"<div class='response'>{''.join(spans)}</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded response; ``"".join(pieces) == tokenizer.decode(ids)``.

    Decoding tokens one by one breaks byte-level BPE: a character spread over several byte tokens (``°``, ``∠``,
    ``√``, CJK) comes out as ``\ufffd`` pieces. Here each token gets the text that becomes final once it is
    appended (incremental detokenization, as vLLM's detokenizer does), so the whole character lands on the token
    that completes it and the tokens before it get ``""``.
    """
    pieces: list[str] = []
    prefix, read = 0, 0  # text of ids[prefix:read] is final; ids[read:] is pending
    for end in range(1, len(ids) + 1):
        before = tokenizer.decode(ids[prefix:read])
        now = tokenizer.decode(ids[prefix:end])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            pieces.append(now[len(before) :])
            prefix, read = read, end
        else:
            pieces.append("")
    if len(ids) and read < len(ids):  # trailing incomplete bytes: show what the tokenizer gives for them
        pieces[-1] = tokenizer.decode(ids[prefix:])[len(tokenizer.decode(ids[prefix:read])) :]
    return pieces


def image_to_png_bytes(image: Any) -> bytes | None:
    """A PIL image (or None) -> PNG bytes, for the page header."""
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


TIE_MODES = ("tor", "reasoning_only", "perception_only")
"""The ``tor.mode``s that rank by entropy and |Δ log p|, so that a tie at the cut is a tie of those scores
(``random`` draws its tokens uniformly; ``all_tokens`` selects nothing)."""


def why_ties_unmarked(mode: str, rank_tokens: str) -> str:
    """Why ``compute_tie_marks`` cannot mark ties for this config ("" when it can)."""
    if mode not in TIE_MODES:
        return f"tor.mode={mode} does not rank by these scores"
    if rank_tokens != "all":
        return f"with tor.rank_tokens={rank_tokens} the page does not know which tokens were ranked"
    return ""


def compute_tie_marks(
    tensors: dict[str, Any], segments: torch.Tensor, mode: str = "tor", rank_tokens: str = "all"
) -> dict[str, torch.Tensor] | None:
    """``find_ties`` for T_r (by entropy) and T_p (by |Δ log p|) of a stage's tensors (``ToRStage.on_weights``).

    The candidates are the valid response tokens, as under ``tor.rank_tokens=all`` (a response the image-free pass
    did not score has S_t = 0 and no part in T_p's ranking: it only matters when T_p's cut is exactly 0). Returns
    ``{"picked_r", "left_r", "picked_p", "left_p"}`` ``(B, T)`` bool masks, or None when ties cannot be told
    (``why_ties_unmarked``)."""
    if why_ties_unmarked(mode, rank_tokens):
        return None
    mask = tensors["response_mask"].bool()
    out = {}
    for name, score, selected in (
        ("r", tensors.get("entropy"), tensors.get("reasoning")),
        ("p", tensors.get("sensitivity"), tensors.get("perception")),
    ):
        if score is None or selected is None:
            out[f"picked_{name}"] = out[f"left_{name}"] = torch.zeros_like(mask)
        else:
            out[f"picked_{name}"], out[f"left_{name}"] = find_ties(score, selected, mask, segments)
    return out


def _tie_tokens(marks: dict[str, torch.Tensor] | None, row: int, n: int, entropy: list, sensitivity: list):
    """Per token of row ``row``: tie state (``picked`` / ``left`` / ``""``) and the hover note."""
    states, notes = [""] * n, [""] * n
    if marks is None:
        return states, notes
    for name, label, scores in (("r", "T_r cut (entropy", entropy), ("p", "T_p cut (|Δ log p|", sensitivity)):
        picked, left = marks[f"picked_{name}"][row, :n].tolist(), marks[f"left_{name}"][row, :n].tolist()
        for t in range(n):
            if picked[t] or left[t]:
                verdict = "picked" if picked[t] else "left out"
                note = f"tied at the {label} {scores[t]:.4g}): {verdict} by the seeded tie-break"
                notes[t] = f"{notes[t]} | {note}" if notes[t] else note
                states[t] = "picked" if picked[t] or states[t] == "picked" else "left"
    return states, notes


def build_rollouts(
    tokenizer: Any,
    response_ids: Sequence[torch.Tensor],
    entropy: torch.Tensor,
    sensitivity: torch.Tensor | None,
    weights: torch.Tensor,
    reasoning: torch.Tensor,
    perception: torch.Tensor,
    prompts: Sequence[str] | None = None,
    images: Sequence[Any] | None = None,
    limit: int | None = None,
    rows: Sequence[int] | None = None,
    tie_marks: dict[str, torch.Tensor] | None = None,
) -> list[TokenMapRollout]:
    """Padded (B, T) per-token tensors + token ids -> ``TokenMapRollout``s.

    ``response_ids[j]``, ``prompts[j]`` and ``images[j]`` belong to row ``rows[j]`` of the tensors (default: row
    ``j``); the first ``limit`` are built. ``tie_marks``: ``compute_tie_marks`` of the same tensors."""
    out = []
    rows = list(range(len(response_ids))) if rows is None else list(rows)
    count = len(response_ids) if limit is None else min(limit, len(response_ids))
    for j in range(count):
        i, ids = rows[j], response_ids[j].tolist()
        n = len(ids)
        ent = entropy[i, :n].tolist()
        sen = (sensitivity[i, :n] if sensitivity is not None else torch.zeros(n)).tolist()
        ties, notes = _tie_tokens(tie_marks, i, n, ent, sen)
        out.append(
            TokenMapRollout(
                tokens=token_pieces(tokenizer, ids),
                entropy=ent,
                sensitivity=sen,
                weight=weights[i, :n].tolist(),
                reasoning=reasoning[i, :n].bool().tolist(),
                perception=perception[i, :n].bool().tolist(),
                prompt=prompts[j] if prompts else "",
                image_png=image_to_png_bytes(images[j]) if images and images[j] is not None else None,
                title=f"rollout {j + 1}",
                ties=ties,
                tie_notes=notes,
            )
        )
    return out


def segments_for(scope: str, keys: Sequence[str]) -> torch.Tensor:
    """``(B,)`` scope id per row, as the selection ranked them: ``batch`` one, ``sequence`` per row, ``group`` per
    prompt (verl's uid, the prefix of its key)."""
    if scope == "batch":
        return torch.zeros(len(keys), dtype=torch.long)
    if scope == "sequence":
        return torch.arange(len(keys), dtype=torch.long)
    return torch.tensor([p for p, _, _ in number_rollouts(keys)], dtype=torch.long) - 1


class TrainingTokenMapWriter:
    """Writes a token map every ``tor.log_token_maps`` steps into ``<default_local_dir>/tor_token_maps/``.

    Called by the ToR stage with the step's tensors; decodes a few rollouts with the trainer's tokenizer. The cards
    are whole prompts' groups first ("prompt 1 · rollout 1/4", ...), each with the outcome verl stored for it
    (``read_outcomes``). When wandb is a logger, the page is also logged as a ``wandb.Html`` under ``tor/token_map``.
    """

    def __init__(
        self,
        every: int,
        n_rollouts: int,
        out_dir: str,
        tokenizer: Any,
        read_responses,
        use_wandb: bool,
        read_prompts=None,
        read_outcomes=None,
        scope: str = "batch",
        mode: str = "tor",
        rank_tokens: str = "all",
    ):
        """``read_responses(keys) -> [response ids]``; ``read_prompts(keys) -> ([question text], [PIL image | None])``
        (optional: the page then shows each rollout's question and figure); ``read_outcomes(keys) -> {"reward":
        [float] | None, "ground_truth": [..] | None, "reward_extra_info": [dict] | None}`` (optional; a ``None`` list
        is a field the batch does not have, shown as absent). ``scope``/``mode``/``rank_tokens``: the run's
        ``tor.*``, to tell which tokens the seeded tie-break decided."""
        self.every, self.n_rollouts, self.out_dir = every, n_rollouts, out_dir
        self.tokenizer, self.read_responses, self.use_wandb = tokenizer, read_responses, use_wandb
        self.read_prompts, self.read_outcomes = read_prompts, read_outcomes
        self.scope, self.mode, self.rank_tokens = scope, mode, rank_tokens
        self.written: list[str] = []

    @classmethod
    def from_trainer(cls, trainer: Any) -> TrainingTokenMapWriter:
        import transfer_queue as tq

        cfg = trainer.config
        loggers = cfg.trainer.get("logger", [])
        loggers = [loggers] if isinstance(loggers, str) else list(loggers or [])
        out_dir = os.path.join(cfg.trainer.get("default_local_dir", "."), "tor_token_maps")

        def read_responses(keys: list[str], partition_id: str = "train") -> list[torch.Tensor]:
            data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=["responses"])
            return list(data["responses"].unbind(0))

        processor = getattr(trainer, "processor", None)

        def read_prompts(keys: list[str], partition_id: str = "train") -> tuple[list[str], list[Any]]:
            fields = ["raw_prompt", "multi_modal_inputs"]
            data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=fields)
            texts = [prompt_text(m) for m in _column(data, "raw_prompt", len(keys))]
            images = [
                first_image(mm, processor) if processor is not None else None
                for mm in _column(data, "multi_modal_inputs", len(keys))
            ]
            return texts, images

        def read_field(keys: list[str], name: str, partition_id: str = "train") -> Any:
            try:  # one field per read: TransferQueue refuses a whole read when one selected field is missing
                data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=[name])
            except Exception:  # noqa: BLE001 - a field this run does not store is shown as absent
                return None
            return data[name] if name in data.keys() else None

        def read_outcomes(keys: list[str]) -> dict[str, list | None]:
            return outcomes_from_verl_fields(
                read_field(keys, "rm_scores"), read_field(keys, "reward_model"), read_field(keys, "extra_fields")
            )

        tor = trainer.tor_config
        return cls(
            every=tor.log_token_maps,
            n_rollouts=tor.log_token_maps_rollouts,
            out_dir=out_dir,
            tokenizer=trainer.tokenizer,
            read_responses=read_responses,
            use_wandb="wandb" in loggers,
            read_prompts=read_prompts,
            read_outcomes=read_outcomes,
            scope=tor.scope,
            mode=tor.mode,
            rank_tokens=tor.rank_tokens,
        )

    def __call__(self, step: int, keys: list[str], tensors: dict[str, torch.Tensor | None], **_: Any) -> str | None:
        if self.every <= 0 or step % self.every != 0:
            return None
        numbers = number_rollouts(keys)
        order = sorted(range(len(keys)), key=lambda i: numbers[i][:2])[: self.n_rollouts]  # whole prompts first
        chosen = [keys[i] for i in order]
        responses = self.read_responses(chosen)
        w = tensors["weights"]
        reasoning = tensors.get("reasoning")
        perception = tensors.get("perception")
        if reasoning is None:
            reasoning = torch.zeros_like(w, dtype=torch.bool)
        if perception is None:
            perception = torch.zeros_like(w, dtype=torch.bool)
        prompts, images = self.read_prompts(chosen) if self.read_prompts is not None else (None, None)
        marks = compute_tie_marks(tensors, segments_for(self.scope, keys), self.mode, self.rank_tokens)
        rollouts = build_rollouts(
            self.tokenizer,
            responses,
            tensors["entropy"],
            tensors.get("sensitivity"),
            w,
            reasoning,
            perception,
            prompts=prompts,
            images=images,
            rows=order,
            tie_marks=marks,
        )
        outcomes = self.read_outcomes(chosen) if self.read_outcomes is not None else {}
        absent = "not in this batch" if self.read_outcomes is not None else "not read by this writer"
        for j, (r, key, i) in enumerate(zip(rollouts, chosen, order)):
            r.title, r.subtitle = rollout_title(*numbers[i]), f"verl key {key}"
            text = "".join(r.tokens)  # == the decoded response (token_pieces)
            rewards, truths, details = (outcomes.get(k) for k in ("reward", "ground_truth", "reward_extra_info"))
            r.facts = card_facts(
                text,
                reward=rewards[j] if rewards is not None else None,
                reward_absent=absent,
                ground_truth=truths[j] if truths is not None else None,
                ground_truth_absent=absent if truths is None else "this row's reward_model has no ground_truth",
                reward_details=details[j] if details is not None else None,
            )
        mask = tensors["response_mask"].bool()
        sens = tensors.get("sensitivity")
        page = render_token_map(
            rollouts,
            thresholds={k: float(v) for k, v in (tensors.get("thresholds") or {}).items()},
            title=f"ToR token map, step {step}",
            all_entropy=tensors["entropy"][mask].tolist(),
            all_sensitivity=sens[mask].tolist() if sens is not None else [],
            ties_unmarked=why_ties_unmarked(self.mode, self.rank_tokens),
        )
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"step_{step:06d}.html")
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
        self.written.append(path)
        if self.use_wandb:
            try:
                import wandb

                if wandb.run is not None:
                    wandb.log({"tor/token_map": wandb.Html(page)}, step=step)
            except ImportError:
                pass
        return path


def outcomes_from_verl_fields(rm_scores: Any, reward_model: Any, extra_fields: Any) -> dict[str, list | None]:
    """verl's stored outcome of each row: ``rm_scores`` (per-token reward, summed: the sequence score verl's own
    rollout dump shows), ``reward_model["ground_truth"]`` (the dataset's) and ``extra_fields["reward_extra_info"]``
    (what the reward function returned besides the score, e.g. ``acc``). A field that is ``None`` stays ``None``."""
    rewards = None
    if rm_scores is not None:
        rows = rm_scores.unbind(0) if hasattr(rm_scores, "unbind") else list(rm_scores)
        rewards = [float(torch.as_tensor(r).float().sum()) for r in rows]
    truths = None
    if reward_model is not None:
        truths = [m.get("ground_truth") if isinstance(m, dict) else None for m in _as_list(reward_model)]
    details = None
    if extra_fields is not None:
        details = [(e.get("reward_extra_info") or {}) if isinstance(e, dict) else {} for e in _as_list(extra_fields)]
    return {"reward": rewards, "ground_truth": truths, "reward_extra_info": details}


def _as_list(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _column(data: Any, name: str, n: int) -> list:
    """A field of a TransferQueue batch as a list (``[None] * n`` when no row has it)."""
    if name not in data.keys():
        return [None] * n
    value = data[name]
    return value.tolist() if hasattr(value, "tolist") else list(value)


def prompt_text(messages: Any) -> str:
    """The text of a chat prompt (verl's ``raw_prompt``: messages whose content is a string or a list of parts)."""
    if not messages:
        return ""
    parts = []
    for message in messages:
        content = message.get("content", "") if isinstance(message, dict) else str(message)
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return " ".join(p for p in parts if p).replace("<image>", "").strip()


def first_image(multi_modal_inputs: Any, processor: Any) -> Any:
    """The first image of a trajectory, rebuilt exactly from verl's ``multi_modal_inputs`` (``pixel_values`` as
    Qwen2-VL's image processor patchified and normalised them; ``image_grid_thw``), as a PIL image; ``None`` when
    the row has no image."""
    if not multi_modal_inputs or "pixel_values" not in multi_modal_inputs:
        return None
    from PIL import Image

    ip = processor.image_processor
    grid = multi_modal_inputs["image_grid_thw"]
    t, h, w = (int(x) for x in grid[0].tolist())
    m, p, tp = int(ip.merge_size), int(ip.patch_size), int(ip.temporal_patch_size)
    pixels = multi_modal_inputs["pixel_values"][: t * h * w].float()  # (patches, C * tp * p * p)
    channels = pixels.shape[1] // (tp * p * p)
    # the inverse of the processor's patchify: (t, tp, C, h/m, m, p, w/m, m, p) -> transpose(0,3,6,4,7,2,1,5,8)
    frames = pixels.reshape(t, h // m, w // m, m, m, channels, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    frame = frames.reshape(t * tp, channels, h * p, w * p)[0]
    mean = torch.tensor(ip.image_mean, dtype=frame.dtype).view(channels, 1, 1)
    std = torch.tensor(ip.image_std, dtype=frame.dtype).view(channels, 1, 1)
    rgb = ((frame * std + mean) / float(ip.rescale_factor)).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())
