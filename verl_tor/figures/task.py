"""The synthetic visual-math task: a rectangle whose side lengths appear only in the figure; "Find the area."

Every problem knows which characters of its answer were read from the figure (the ground truth for ToR's
grounding measurements), and so does every sampled response that follows the answer format
(``label_response``). Pure Python + PIL (no torch): import it anywhere.

The figure is 84×84 pixels: Qwen2.5-VL's 14-px patches merged 2×2 make a 3×3 grid of 28×28 cells, one image token
per cell. The width label always sits in the bottom-middle cell (``WIDTH_CELL``) and the height label in the
middle-left cell (``HEIGHT_CELL``), jittered inside them; the per-cell digit head of the SFT's vision stage
(``verl_tor.figures.sft``) learns to read exactly those cells.

Target response (the ``<think>…</think> \\boxed{}`` format of verl's Geometry3K reward)::

    <think>The sides are 3 and 5. 3*5=15</think> \\boxed{15}
                         ^     ^  ^ ^ ^^           ^^
                      read  read  restated  computed  answer
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DATA_SOURCE",
    "IMAGE_SIZE",
    "CELL",
    "WIDTH_CELL",
    "HEIGHT_CELL",
    "QUESTION",
    "KINDS",
    "FIGURE_KINDS",
    "Span",
    "Problem",
    "make_problem",
    "render_figure",
    "build_target",
    "label_response",
    "split_seeds",
    "build_messages",
    "to_verl_row",
]

DATA_SOURCE = "hiyouga/geometry3k"
"""verl's ``default_compute_score`` routes this to its Geometry3K scorer (``verl.utils.reward_score.geo3k``:
0.9·accuracy + 0.1·format, ``mathruler``'s boxed-answer grading) with no reward config at all; the task's answers
are integers in that format, so the recipes' own reward applies unchanged."""

IMAGE_SIZE = 84
CELL = 28
"""One merged Qwen2.5-VL image token covers CELL×CELL pixels (patch 14, merge 2)."""
WIDTH_CELL = (2, 1)
"""(row, column) of the 3×3 merged-token grid holding the width label: below the rectangle, in the middle."""
HEIGHT_CELL = (1, 0)
"""(row, column) holding the height label: left of the rectangle, in the middle."""
LABEL_JITTER = 1
"""Pixels a label may move from its cell's centre. Measured with the SFT's vision stage (2-layer, 96-wide tower, 300
steps): ±1 px reads 100% of held-out digit cells, ±4 px only 55% after 600 steps (a tower this small learns
translation invariance slowly); 0 px also reads 100%."""
SIDES = range(1, 10)
"""Side lengths are single digits 1-9 (the vision head's classes are "no digit" and 1-9)."""

QUESTION = "The figure shows a rectangle. Find its area."
TEXT_QUESTION = "A rectangle has sides {w} and {h}. Find its area."
"""The text-only variant (sides in the text, no image): 20% of the SFT mix, so that the image-free view ToR builds
(the same prompt with the vision tokens deleted) is in distribution (design.md)."""

KINDS = ("read", "restated", "computed", "answer", "operator", "template", "unparsed")
"""Character/token kinds of a response. ``read``: a side length, first stated (read from the figure);
``restated``: a side length repeated in the product; ``computed``: the product's digits inside <think>;
``answer``: the boxed digits; ``operator``: ``*`` and ``=``; ``template``: the fixed words, tags, punctuation and
the end-of-turn token; ``unparsed``: a response that does not follow the format."""
FIGURE_KINDS = ("read", "restated")
"""The figure-derived kinds: characters whose value comes from reading the image."""

_COLORS = ("black", "blue", "red", "darkgreen")
_FORMAT = (
    ("<think>The sides are ", "template"),
    ("{w}", "read"),
    (" and ", "template"),
    ("{h}", "read"),
    (". ", "template"),
    ("{w}", "restated"),
    ("*", "operator"),
    ("{h}", "restated"),
    ("=", "operator"),
    ("{area}", "computed"),
    ("</think> \\boxed{", "template"),
    ("{area}", "answer"),
    ("}", "template"),
)
"""The answer format, piece by piece: literal text, or a number slot (``{w}``, ``{h}``, ``{area}``) of a kind."""
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Span:
    """Characters ``[start, end)`` of a response, of one kind (``KINDS``)."""

    start: int
    end: int
    kind: str


@dataclass
class Problem:
    """One rendered problem: its figure, question, answer and target response with ground-truth spans."""

    seed: int
    width: int
    height: int
    image: Any
    """The figure, a PIL RGB image of IMAGE_SIZE×IMAGE_SIZE pixels."""
    question: str
    target: str
    spans: list[Span] = field(default_factory=list)
    """Non-template spans of ``target`` (read / restated / operator / computed / answer), in order."""
    label_boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    """Pixel bounding box (x0, y0, x1, y1) of each drawn label: ``width`` and ``height``."""

    @property
    def answer(self) -> str:
        return str(self.width * self.height)


def build_target(width: int, height: int) -> tuple[str, list[Span]]:
    """The target response for sides ``width`` × ``height`` and its spans (``KINDS``, template omitted)."""
    values = {"{w}": str(width), "{h}": str(height), "{area}": str(width * height)}
    text, spans = "", []
    for piece, kind in _FORMAT:
        piece = values.get(piece, piece)
        if kind != "template":
            spans.append(Span(len(text), len(text) + len(piece), kind))
        text += piece
    return text, spans


def label_response(text: str, end_token: str = "<|im_end|>") -> tuple[list[str], bool]:
    """Kind of every character of a (sampled) response, read against the answer format piece by piece.

    Number slots match any digits, right or wrong (a misread side is still the slot where the figure was read).
    The first piece that does not match and everything after it are ``unparsed``; an ``end_token`` right after the
    format is ``template``.

    Returns:
        (one kind per character of ``text``, whether the whole format was found).
    """
    kinds: list[str] = []
    pos = 0
    for piece, kind in _FORMAT:
        if piece.startswith("{"):
            match = _NUMBER.match(text, pos)
            end = match.end() if match else -1
        else:
            end = pos + len(piece) if text.startswith(piece, pos) else -1
        if end < 0:
            return kinds + ["unparsed"] * (len(text) - pos), False
        kinds += [kind] * (end - pos)
        pos = end
    if text[pos:] in ("", end_token):
        return kinds + ["template"] * (len(text) - pos), True
    return kinds + ["unparsed"] * (len(text) - pos), False


def render_figure(width: int, height: int, rng: random.Random) -> tuple[Any, dict[str, tuple[int, int, int, int]]]:
    """Draw the rectangle and its two labels; returns the image and each label's pixel box.

    The rectangle's corners and the labels are jittered by a few pixels and the label colour varies, but each
    label stays inside its cell (``WIDTH_CELL`` / ``HEIGHT_CELL``).
    """
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(img)
    left, top = 24 + rng.randint(-2, 2), 8 + rng.randint(-3, 3)
    right, bottom = 76 + rng.randint(-4, 3), 54 + rng.randint(-2, 2)
    draw.rectangle([left, top, right, bottom], outline="black", width=2)
    font = ImageFont.load_default(size=16)
    color = _COLORS[rng.randrange(len(_COLORS))]
    boxes = {}
    for name, value, (row, col) in (("width", width, WIDTH_CELL), ("height", height, HEIGHT_CELL)):
        x0, y0, x1, y1 = font.getbbox(str(value))
        # centre of the cell, jittered, so that the glyph's ink box stays inside the cell
        cx = col * CELL + CELL // 2 + rng.randint(-LABEL_JITTER, LABEL_JITTER) - (x0 + x1) // 2
        cy = row * CELL + CELL // 2 + rng.randint(-LABEL_JITTER, LABEL_JITTER) - (y0 + y1) // 2
        draw.text((cx, cy), str(value), fill=color, font=font)
        boxes[name] = (cx + x0, cy + y0, cx + x1, cy + y1)
    return img, boxes


def make_problem(seed: int) -> Problem:
    """Problem number ``seed``: sides drawn uniformly from 1-9, figure rendered, target built (deterministic)."""
    rng = random.Random(f"verl_tor.figures:{seed}")
    width, height = rng.choice(SIDES), rng.choice(SIDES)
    image, boxes = render_figure(width, height, rng)
    target, spans = build_target(width, height)
    return Problem(
        seed=seed,
        width=width,
        height=height,
        image=image,
        question=QUESTION,
        target=target,
        spans=spans,
        label_boxes=boxes,
    )


def split_seeds(split: str, n: int, seed: int = 0) -> list[int]:
    """Problem seeds of a split: disjoint ranges, so train, val and SFT problems never share a seed.

    ``sft`` starts at 0, ``train`` at 10^7, ``val`` at 2·10^7 (+ 10^5·``seed`` for each), at most 10^5 problems each.
    """
    offsets = {"sft": 0, "train": 10_000_000, "val": 20_000_000}
    if split not in offsets:
        raise ValueError(f"split={split!r}: choose one of {sorted(offsets)}")
    if not 0 <= n <= 100_000:
        raise ValueError(f"n={n}: at most 100,000 problems per split and seed")
    start = offsets[split] + 100_000 * seed
    return list(range(start, start + n))


def build_messages(question: str, with_image: bool = True) -> list[dict]:
    """The chat messages verl's ``RLHFDataset`` builds from the parquet prompt ``<image>`` + question."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def to_verl_row(problem: Problem, split: str, index: int) -> dict:
    """One row of verl's RL parquet (the schema of ``recipes/data/geo3k.py``)."""
    buf = io.BytesIO()
    problem.image.save(buf, format="PNG")
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": "<image>" + problem.question}],
        "images": [{"bytes": buf.getvalue(), "path": None}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": problem.answer},
        "extra_info": {
            "split": split,
            "index": index,
            "seed": problem.seed,
            "answer": problem.answer,
            "question": problem.question,
            "width": problem.width,
            "height": problem.height,
            "target": problem.target,
        },
    }
