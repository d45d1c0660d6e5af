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


# ------------------------------------------------------------------------------------ area_plus (issue 20's task)
def test_area_plus_reads_three_values_ignores_a_fourth_and_needs_two_operations():
    from verl_tor.figures.task import DISTRACTOR_CELL, INSIDE_CELL, PLUS_QUESTION

    problems = [make_problem(seed, "area_plus") for seed in split_seeds("val", 64)]
    for p in problems:
        w, h, c = p.width, p.height, p.inside
        assert p.question == PLUS_QUESTION and p.answer == str(w * h + c)
        a, t = w * h, w * h + c
        expected = f"<think>The sides are {w} and {h}, inside is {c}. {w}*{h}={a}. {a}+{c}={t}</think> "
        assert p.target == expected + f"\\boxed{{{t}}}"
        kinds, parsed = label_response(p.target, task="area_plus")
        assert parsed and "".join(ch for ch, k in zip(p.target, kinds) if k == "read") == f"{w}{h}{c}"
        for name, (row, col) in (("inside", INSIDE_CELL), ("distractor", DISTRACTOR_CELL)):
            x0, y0, x1, y1 = p.label_boxes[name]
            assert col * CELL <= x0 < x1 <= (col + 1) * CELL and row * CELL <= y0 < y1 <= (row + 1) * CELL, name
        assert str(p.distractor) not in p.question
    # the distractor varies independently of the needed values, and the area task's problems did not change
    assert len({(p.inside, p.distractor) for p in problems}) > 20
    assert make_problem(5).target == build_target(make_problem(5).width, make_problem(5).height)[0]


def test_classify_response_separates_misread_miscalculated_and_malformed():
    from verl_tor.figures.task import ERROR_CLASSES, build_task_target, classify_response, parse_response

    p = make_problem(split_seeds("val", 1)[0], "area_plus")
    w, h, c = p.width, p.height, p.inside
    right = p.target
    assert parse_response(right, "area_plus")[:3] == [("{w}", w), ("{h}", h), ("{c}", c)]
    assert classify_response(right, p, correct=True) == "correct"
    # a wrong first-stated value (the distractor read for the inside number) is a misread, whatever follows
    other = c % 9 + 1
    misread = build_task_target("area_plus", w, h, other)[0]
    assert classify_response(misread, p, correct=False) == "misread"
    # values right, product wrong (the sum then follows from the wrong product): miscalculated
    wrong = right.replace(f"={w * h}.", f"={w * h + 1}.").replace(f"{w * h}+", f"{w * h + 1}+")
    assert classify_response(wrong, p, correct=False) == "miscalculated"
    # the boxed answer differs from the computed total: still miscalculated (the values were read right)
    assert classify_response(right.replace(f"boxed{{{w * h + c}}}", "boxed{0}"), p, correct=False) == "miscalculated"
    for broken in ("", "<think>The sides are", right.replace(", inside is", " inside"), right + " extra"):
        assert parse_response(broken, "area_plus") is None
        assert classify_response(broken, p, correct=False) == "malformed"
    assert set(ERROR_CLASSES) == {"correct", "misread", "miscalculated", "malformed"}
    with pytest.raises(ValueError, match="task='volume'"):
        make_problem(0, "volume")
