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
    "TASKS",
    "ERROR_CLASSES",
    "READ_SLOTS",
    "task_format",
    "build_task_target",
    "parse_response",
    "classify_response",
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

INSIDE_CELL = (1, 1)
"""``area_plus``: (row, column) of the number drawn inside the rectangle (the centre cell)."""
DISTRACTOR_CELL = (2, 2)
"""``area_plus``: (row, column) of the number the question does not need (bottom-right, next to the width)."""
PLUS_QUESTION = "The figure shows a rectangle with a number inside. Find its area plus that number."
PLUS_TEXT_QUESTION = "A rectangle has sides {w} and {h} and the number {c} inside. Find its area plus that number."
_PLUS_FORMAT = (
    ("<think>The sides are ", "template"),
    ("{w}", "read"),
    (" and ", "template"),
    ("{h}", "read"),
    (", inside is ", "template"),
    ("{c}", "read"),
    (". ", "template"),
    ("{w}", "restated"),
    ("*", "operator"),
    ("{h}", "restated"),
    ("=", "operator"),
    ("{area}", "computed"),
    (". ", "template"),
    ("{area}", "computed"),
    ("+", "operator"),
    ("{c}", "restated"),
    ("=", "operator"),
    ("{total}", "computed"),
    ("</think> \\boxed{", "template"),
    ("{total}", "answer"),
    ("}", "template"),
)
"""``area_plus``'s answer format: three values read (width, height, the number inside), two operations (a product,
then a sum), e.g. ``<think>The sides are 3 and 5, inside is 7. 3*5=15. 15+7=22</think> \\boxed{22}``."""

TASKS = {"area": (QUESTION, TEXT_QUESTION, _FORMAT), "area_plus": (PLUS_QUESTION, PLUS_TEXT_QUESTION, _PLUS_FORMAT)}
"""task -> (question, text-only question, answer format). ``area``: read two sides, one product (the shipped
reader's task). ``area_plus`` (issue 20): read three values, ignore a fourth, a product and a sum."""
READ_SLOTS = {"area": ("{w}", "{h}"), "area_plus": ("{w}", "{h}", "{c}")}
"""The slots whose first occurrence states a value read from the figure."""
ERROR_CLASSES = ("correct", "misread", "miscalculated", "malformed")
"""``classify_response``'s classes, in the order a response is tested against them."""


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task={task!r}: choose one of {sorted(TASKS)}")


def task_format(task: str = "area") -> tuple[tuple[str, str], ...]:
    """The answer format of ``task``: (literal text or number slot, kind) pieces."""
    _check_task(task)
    return TASKS[task][2]


def _slot_values(task: str, width: int, height: int, inside: int = 0) -> dict[str, int]:
    area = width * height
    values = {"{w}": width, "{h}": height, "{area}": area}
    if task == "area_plus":
        values.update({"{c}": inside, "{total}": area + inside})
    return values


def build_task_target(task: str, width: int, height: int, inside: int = 0) -> tuple[str, list[Span]]:
    """``build_target`` for any task: the target response and its spans (template omitted)."""
    values = {k: str(v) for k, v in _slot_values(task, width, height, inside).items()}
    text, spans = "", []
    for piece, kind in task_format(task):
        piece = values.get(piece, piece)
        if kind != "template":
            spans.append(Span(len(text), len(text) + len(piece), kind))
        text += piece
    return text, spans


def parse_response(text: str, task: str = "area", end_token: str = "<|im_end|>") -> list[tuple[str, int]] | None:
    """The number slots of a response that follows ``task``'s format, in order: ``[(slot, value), ...]``; None when
    the format is not followed (the same reading as ``label_response``: ``_walk_format``)."""
    pieces, _pos, followed = _walk_format(text, task, end_token)
    if not followed:
        return None
    return [(piece, int(text[start:end])) for piece, _kind, start, end in pieces if piece.startswith("{")]


def _walk_format(text: str, task: str, end_token: str) -> tuple[list[tuple[str, str, int, int]], int, bool]:
    """Read ``text`` against ``task``'s answer format piece by piece: number slots match any digits, literals match
    exactly. Returns the pieces matched, in order, as (piece, kind, start, end); the position after the last one;
    whether the format was followed (every piece matched, then nothing or ``end_token``). The walk stops at the
    first piece that does not match."""
    pos, pieces = 0, []
    for piece, kind in task_format(task):
        if piece.startswith("{"):
            match = _NUMBER.match(text, pos)
            end = match.end() if match else -1
        else:
            end = pos + len(piece) if text.startswith(piece, pos) else -1
        if end < 0:
            return pieces, pos, False
        pieces.append((piece, kind, pos, end))
        pos = end
    return pieces, pos, text[pos:] in ("", end_token)


def classify_response(text: str, problem: Problem, correct: bool) -> str:
    """One of ``ERROR_CLASSES`` for a response to ``problem``, from the task's ground truth.

    Args:
        correct: the grader's verdict on the boxed answer (verl's Geometry3K ``acc_reward``); a correct answer is
            ``correct`` whatever the reasoning says.
    Returns:
        ``correct``; ``malformed`` (the format is not followed, so no value can be checked); ``misread`` (a value
        read from the figure, where the response first states it, is wrong: a side swapped for the other counts only
        when the answer is then wrong); ``miscalculated`` (every read value right, the result wrong: a product, a
        sum, a value copied wrongly into an operation, or the boxed answer differing from the computed one).
    """
    if correct:
        return "correct"
    slots = parse_response(text, problem.task)
    if slots is None:
        return "malformed"
    truth, seen = problem.values, set()
    for slot, value in slots:
        if slot in READ_SLOTS[problem.task] and slot not in seen:
            seen.add(slot)
            if value != truth[slot]:
                return "misread"
    return "miscalculated"


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
    """Pixel bounding box (x0, y0, x1, y1) of each drawn label: ``width`` and ``height`` (and, for ``area_plus``,
    ``inside`` and ``distractor``)."""
    task: str = "area"
    """``TASKS`` key: ``area`` (the shipped reader's task) or ``area_plus`` (issue 20's harder variant)."""
    inside: int = 0
    """``area_plus``: the number drawn inside the rectangle, added to the area (0 for ``area``)."""
    distractor: int = 0
    """``area_plus``: the number in the bottom-right corner that the question does not need (0 for ``area``)."""

    @property
    def answer(self) -> str:
        return str(self.width * self.height + self.inside)

    @property
    def values(self) -> dict[str, int]:
        """The values the target response states, by slot name (``READ_SLOTS``)."""
        return _slot_values(self.task, self.width, self.height, self.inside)


def build_target(width: int, height: int) -> tuple[str, list[Span]]:
    """The target response for sides ``width`` × ``height`` and its spans (``KINDS``, template omitted): the
    ``area`` task's ``build_task_target``."""
    return build_task_target("area", width, height)


def label_response(text: str, end_token: str = "<|im_end|>", task: str = "area") -> tuple[list[str], bool]:
    """Kind of every character of a (sampled) response, read against the answer format piece by piece.

    Number slots match any digits, right or wrong (a misread side is still the slot where the figure was read).
    The first piece that does not match and everything after it are ``unparsed``; an ``end_token`` right after the
    format is ``template``.

    Returns:
        (one kind per character of ``text``, whether the whole format was found).
    """
    pieces, pos, followed = _walk_format(text, task, end_token)
    kinds = [kind for _piece, kind, start, end in pieces for _ in range(end - start)]
    if followed:
        return kinds + ["template"] * (len(text) - pos), True
    return kinds + ["unparsed"] * (len(text) - pos), False


def render_figure(
    width: int, height: int, rng: random.Random, extra: tuple[tuple[str, int, tuple[int, int]], ...] = ()
) -> tuple[Any, dict[str, tuple[int, int, int, int]]]:
    """Draw the rectangle and its two labels; returns the image and each label's pixel box.

    The rectangle's corners and the labels are jittered by a few pixels and the label colour varies, but each
    label stays inside its cell (``WIDTH_CELL`` / ``HEIGHT_CELL``). ``extra``: more (name, value, cell) labels,
    drawn after the two sides (so the sides' random draws are the same with or without them).
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
    for name, value, (row, col) in (("width", width, WIDTH_CELL), ("height", height, HEIGHT_CELL), *extra):
        x0, y0, x1, y1 = font.getbbox(str(value))
        # centre of the cell, jittered, so that the glyph's ink box stays inside the cell
        cx = col * CELL + CELL // 2 + rng.randint(-LABEL_JITTER, LABEL_JITTER) - (x0 + x1) // 2
        cy = row * CELL + CELL // 2 + rng.randint(-LABEL_JITTER, LABEL_JITTER) - (y0 + y1) // 2
        draw.text((cx, cy), str(value), fill=color, font=font)
        boxes[name] = (cx + x0, cy + y0, cx + x1, cy + y1)
    return img, boxes


def make_problem(seed: int, task: str = "area") -> Problem:
    """Problem number ``seed`` of ``task``: values drawn uniformly from 1-9, figure rendered, target built
    (deterministic; ``area``'s draws are those of the shipped reader's problems)."""
    _check_task(task)
    if task == "area":
        rng = random.Random(f"verl_tor.figures:{seed}")
        width, height = rng.choice(SIDES), rng.choice(SIDES)
        inside = distractor = 0
        image, boxes = render_figure(width, height, rng)
    else:
        rng = random.Random(f"verl_tor.figures.{task}:{seed}")
        width, height, inside, distractor = (rng.choice(SIDES) for _ in range(4))
        extra = (("inside", inside, INSIDE_CELL), ("distractor", distractor, DISTRACTOR_CELL))
        image, boxes = render_figure(width, height, rng, extra)
    target, spans = build_task_target(task, width, height, inside)
    return Problem(
        seed=seed,
        width=width,
        height=height,
        image=image,
        question=TASKS[task][0],
        target=target,
        spans=spans,
        label_boxes=boxes,
        task=task,
        inside=inside,
        distractor=distractor,
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
            **(
                {"task": problem.task, "inside": problem.inside, "distractor": problem.distractor}
                if problem.task != "area"
                else {}
            ),
        },
    }
