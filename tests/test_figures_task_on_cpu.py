"""The figure task's ground truth: the numbers are only in the image, in the cells the generator says, and the
figure-derived characters of a response are exactly the side digits (verl_tor/figures/task.py)."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from verl_tor.figures.task import (
    CELL,
    FIGURE_KINDS,
    HEIGHT_CELL,
    KINDS,
    QUESTION,
    WIDTH_CELL,
    build_target,
    label_response,
    make_problem,
    render_figure,
    split_seeds,
)


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_target_spans_are_the_side_digits(seed):
    problem = make_problem(seed)
    w, h, area = str(problem.width), str(problem.height), str(problem.width * problem.height)
    assert problem.target == f"<think>The sides are {w} and {h}. {w}*{h}={area}</think> \\boxed{{{area}}}"
    by_kind = {}
    for span in problem.spans:
        by_kind.setdefault(span.kind, []).append(problem.target[span.start : span.end])
    assert by_kind == {
        "read": [w, h],
        "restated": [w, h],
        "operator": ["*", "="],
        "computed": [area],
        "answer": [area],
    }
    # the first read span is the 22nd character: right after "<think>The sides are "
    assert problem.spans[0].start == len("<think>The sides are ")


def test_label_response_agrees_with_the_generator_and_labels_wrong_digits_by_slot():
    text, spans = build_target(6, 7)
    kinds, parsed = label_response(text + "<|im_end|>")
    assert parsed
    expected = ["template"] * len(text)
    for span in spans:
        expected[span.start : span.end] = [span.kind] * (span.end - span.start)
    assert kinds[: len(text)] == expected and set(kinds[len(text) :]) == {"template"}
    # a misread figure and a wrong product: still the same slots (the slot is what was read, not whether it is right)
    wrong = "<think>The sides are 5 and 7. 5*7=36</think> \\boxed{36}"
    kinds, parsed = label_response(wrong)
    assert parsed and [wrong[i] for i, k in enumerate(kinds) if k == "read"] == ["5", "7"]
    assert [wrong[i] for i, k in enumerate(kinds) if k == "computed"] == ["3", "6"]
    # a response that leaves the format keeps the labels of what came before; the rest is unparsed
    partial = "<think>The sides are 5 and 8. 5*8=4</think> \\boxed{?}<|im_end|>"
    kinds, parsed = label_response(partial)
    assert not parsed and [partial[i] for i, k in enumerate(kinds) if k == "read"] == ["5", "8"]
    assert kinds[partial.index("?") :] == ["unparsed"] * len(partial[partial.index("?") :])
    for broken in ("<think>The side is 5</think> \\boxed{5}", "5*7=35", ""):
        kinds, parsed = label_response(broken)
        assert not parsed and set(kinds) <= {"unparsed"} and len(kinds) == len(broken)
    assert set(FIGURE_KINDS) < set(KINDS)


def test_the_numbers_are_only_in_the_image():
    assert not re.search(r"\d", QUESTION)
    problem = make_problem(3)
    assert not re.search(r"\d", problem.question)


@pytest.mark.parametrize("seed", range(6))
def test_each_label_is_drawn_inside_its_cell_and_nowhere_else(seed):
    """Redraw the figure with the same randomness but another width (height): only the width (height) cell changes."""
    problem = make_problem(seed)
    for name, cell in (("width", WIDTH_CELL), ("height", HEIGHT_CELL)):
        x0, y0, x1, y1 = problem.label_boxes[name]
        row, col = cell
        assert col * CELL <= x0 < x1 <= (col + 1) * CELL and row * CELL <= y0 < y1 <= (row + 1) * CELL
    for changed, cell in (("width", WIDTH_CELL), ("height", HEIGHT_CELL)):
        sides = {"width": problem.width, "height": problem.height}
        sides[changed] = 1 + sides[changed] % 9  # another digit
        rng = random.Random(f"verl_tor.figures:{seed}")
        rng.choice(range(1, 10)), rng.choice(range(1, 10))  # the two side draws of make_problem
        image, _ = render_figure(sides["width"], sides["height"], rng)
        diff = np.any(np.asarray(image) != np.asarray(problem.image), axis=-1)  # (H, W)
        ys, xs = np.nonzero(diff)
        assert len(ys) > 10, "a different digit must change the figure"
        row, col = cell
        assert set((ys // CELL).tolist()) == {row} and set((xs // CELL).tolist()) == {col}


def test_problems_are_deterministic_and_splits_disjoint():
    a, b = make_problem(42), make_problem(42)
    assert (a.width, a.height, a.target) == (b.width, b.height, b.target)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    splits = {(s, seed): set(split_seeds(s, 1000, seed)) for s in ("sft", "train", "val") for seed in (0, 1)}
    assert len(set().union(*splits.values())) == 6000
    with pytest.raises(ValueError, match="split='test'"):
        split_seeds("test", 3)
    sides = [(make_problem(s).width, make_problem(s).height) for s in range(300)]
    assert {w for w, _ in sides} == set(range(1, 10)) and {h for _, h in sides} == set(range(1, 10))
