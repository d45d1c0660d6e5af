"""The token map's cards and legend (issue 17 item 21): cards titled by prompt and rollout, each with its reward,
``\\boxed{}`` answer and ground truth (absent fields marked absent), ties of the seeded tie-break marked and
explained, the figure's label colours explained; checked in the HTML and in headless chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from html.parser import HTMLParser

import pytest
import torch

from verl_tor.ops.select import build_segments, select_top_fraction
from verl_tor.viz import (
    FIGURE_LABEL_COLORS,
    TrainingTokenMapWriter,
    extract_boxed,
    find_ties,
    number_rollouts,
    outcomes_from_verl_fields,
)


class Page(HTMLParser):
    """Card titles, outcome lines and token spans of a token map."""

    def __init__(self):
        super().__init__()
        self.titles: list[str] = []
        self.facts: list[str] = []
        self.spans: list[dict] = []
        self.legend = ""
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        cls = (attrs.get("class") or "").split()
        if self._in == "facts" and tag == "span":
            self.facts[-1] += " "  # one fact per span
        if tag == "h2":
            self._in = "h2"
            self.titles.append("")
        elif tag == "div" and "facts" in cls:
            self._in = "facts"
            self.facts.append("")
        elif tag == "div" and "legend" in cls:
            self._in = "legend"
        elif tag == "span" and "tok" in cls and "data-weight" in attrs:
            self.spans.append(attrs)

    def handle_endtag(self, tag):
        if (tag == "h2" and self._in == "h2") or (tag == "div" and self._in in ("facts", "legend")):
            self._in = None

    def handle_data(self, data):
        if self._in == "h2":
            self.titles[-1] += data
        elif self._in == "facts":
            self.facts[-1] += data
        elif self._in == "legend":
            self.legend += data


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


class PieceTokenizer:
    """Decodes ids to fixed text pieces, so that a response can hold a ``\\boxed{}`` answer."""

    pieces = ["<think>", "The", " sides", " are", " 3", " and", " 5", ".", "</think>", " \\boxed{", "15", "}", "8"]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


RIGHT = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # <think>The sides are 3 and 5.</think> \boxed{15}
WRONG = [0, 1, 2, 3, 4, 5, 4, 7, 8, 9, 12, 11]  # ... 3 and 3. ... \boxed{8}
NO_BOX = [0, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]  # no \boxed{}


def test_rollouts_are_numbered_by_prompt_and_rollout_from_verls_keys():
    # verl's V1 keys are {uid}_{session}_{output}; rows arrive in the order their generations finish
    keys = ["9f1c_1_0", "07ab_0_0", "9f1c_0_0", "07ab_1_0", "9f1c_2_0"]
    assert number_rollouts(keys) == [(1, 2, 3), (2, 1, 2), (1, 1, 3), (2, 2, 2), (1, 3, 3)]
    assert number_rollouts(["a", "b"]) == [(1, 1, 1), (2, 1, 1)]  # not verl's shape: a prompt each


def writer_page(tmp_path, outcomes, keys, responses, scope="batch"):
    n_rows, width = len(keys), max(len(r) for r in responses)
    mask = torch.zeros(n_rows, width, dtype=torch.bool)
    for i, r in enumerate(responses):
        mask[i, : len(r)] = True
    entropy = torch.zeros(n_rows, width)
    entropy[:, 4] = 1.0  # one confident-free token per row; the rest tie at entropy 0
    reasoning = select_top_fraction(entropy, mask, 0.3, scope=scope, index=[k.rsplit("_", 2)[0] for k in keys])
    by_key = dict(zip(keys, responses))
    writer = TrainingTokenMapWriter(
        every=1,
        n_rollouts=n_rows,
        out_dir=str(tmp_path),
        tokenizer=PieceTokenizer(),
        read_responses=lambda chosen: [torch.tensor(by_key[k]) for k in chosen],
        use_wandb=False,
        read_outcomes=(lambda chosen: {k: [v[keys.index(c)] for c in chosen] for k, v in outcomes.items()})
        if outcomes is not None
        else None,
        scope=scope,
    )
    tensors = {
        "entropy": entropy,
        "sensitivity": torch.rand(n_rows, width),
        "weights": reasoning.float(),
        "reasoning": reasoning,
        "perception": torch.zeros(n_rows, width, dtype=torch.bool),
        "response_mask": mask,
        "thresholds": {"entropy": 0.0, "sensitivity": 0.5},
    }
    path = writer(step=1, keys=keys, tensors=tensors)
    return path, tensors


def test_training_map_cards_are_titled_by_prompt_and_rollout_and_show_the_outcome(tmp_path):
    """The cards used to be titled by verl's random uids and show no outcome: right and wrong rollouts looked alike."""
    keys = ["9f1c_1_0", "07ab_0_0", "9f1c_0_0", "07ab_1_0"]
    responses = [WRONG, RIGHT, RIGHT, NO_BOX]
    outcomes = {
        "reward": [0.1, 1.0, 1.0, 0.0],
        "ground_truth": ["15", "15", "15", "15"],
        "reward_extra_info": [{"acc": 0.0}, {"acc": 1.0}, {"acc": 1.0}, {"acc": 0.0}],
    }
    path, _ = writer_page(tmp_path, outcomes, keys, responses)
    page = parse(open(path, encoding="utf-8").read())
    # whole prompts first, rollouts in order; keys[2] is prompt 1's first rollout
    assert page.titles == [
        "prompt 1 · rollout 1/2",
        "prompt 1 · rollout 2/2",
        "prompt 2 · rollout 1/2",
        "prompt 2 · rollout 2/2",
    ]
    assert [re.sub(r"\s+", " ", f).strip() for f in page.facts] == [
        "reward 1 answer 15 ground truth 15 acc 1",
        "reward 0.1 answer 8 ground truth 15 acc 0",
        "reward 1 answer 15 ground truth 15 acc 1",
        "reward 0 answer no \\boxed{} ground truth 15 acc 0",
    ]
    assert "9f1c_0_0" in open(path, encoding="utf-8").read()  # the verl key, to find the row in verl's dumps


def test_fields_a_run_does_not_have_are_marked_absent(tmp_path):
    keys = ["u_0_0", "u_1_0"]
    path, _ = writer_page(tmp_path, None, keys, [RIGHT, WRONG])
    facts = [re.sub(r"\s+", " ", f).strip() for f in parse(open(path, encoding="utf-8").read()).facts]
    assert facts == [
        "reward absent (not read by this writer) answer 15 ground truth absent (not read by this writer)",
        "reward absent (not read by this writer) answer 8 ground truth absent (not read by this writer)",
    ]
    # verl's stored fields -> outcomes; a field the batch lacks stays None (absent), never a made-up value
    nested = torch.nested.nested_tensor([torch.tensor([0.0, 0.0, 0.9]), torch.tensor([0.0, 0.1])], layout=torch.jagged)
    got = outcomes_from_verl_fields(nested, [{"ground_truth": "15"}, {"style": "rule"}], None)
    assert got["reward"] == pytest.approx([0.9, 0.1]) and got["ground_truth"] == ["15", None]
    assert got["reward_extra_info"] is None
    assert outcomes_from_verl_fields(None, None, [{"reward_extra_info": {"acc": 1.0}}, {}]) == {
        "reward": None,
        "ground_truth": None,
        "reward_extra_info": [{"acc": 1.0}, {}],
    }


@pytest.mark.parametrize("scope", ["batch", "group", "sequence"])
def test_ties_at_the_cut_are_exactly_the_tokens_the_seeded_draw_decided(scope):
    """A hand-made batch: 3 rows x 6 tokens, one clear winner per row and 5 tokens tied at entropy 0 (as top-p
    entropy gives). ceil(0.3 N) places: the winners, then a seeded draw among the zeros."""
    entropy = torch.tensor([[0.0, 0, 0, 0, 0.9, 0], [0, 0, 0.7, 0, 0, 0], [0, 0.5, 0, 0, 0, 0]])
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 5] = False  # a shorter row: its padding is no candidate
    uids = ["a", "a", "b"]
    selected = select_top_fraction(entropy, mask, 0.3, scope=scope, index=uids, seed=3)
    segments, _ = build_segments(3, scope, uids)
    picked, left = find_ties(entropy, selected, mask, segments)
    zero = mask & (entropy == 0)
    assert torch.equal(picked, selected & zero)  # every selected zero was a draw, and nothing else
    assert torch.equal(left, ~selected & zero)  # every other zero lost it
    assert picked.any() and not (left & ~mask).any()
    # distinct scores: nothing to draw, nothing marked
    distinct = torch.arange(18, dtype=torch.float32).reshape(3, 6)
    chosen = select_top_fraction(distinct, mask, 0.3, scope=scope, index=uids)
    assert not any(t.any() for t in find_ties(distinct, chosen, mask, segments))


def test_tied_tokens_are_marked_on_the_page_and_the_legend_explains_the_draw(tmp_path):
    keys = ["u_0_0", "u_1_0"]
    path, tensors = writer_page(tmp_path, None, keys, [RIGHT, WRONG])
    page = parse(open(path, encoding="utf-8").read())
    valid = tensors["response_mask"]
    selected = tensors["reasoning"][valid].tolist()
    tied = [(s["class"].split()[1], "tie" in s["class"].split()) for s in page.spans]
    # 24 tokens, ceil(0.3*24) = 8 places: the two entropy-1 tokens, then 6 drawn among the 22 zeros
    assert sum(selected) == 8 and sum(t for _, t in tied) == 6
    for (cls, is_tie), sel, span, e in zip(tied, selected, page.spans, tensors["entropy"][valid].tolist()):
        assert (cls == "reasoning") == sel
        assert is_tie == (sel and e == 0.0)
        if e == 0.0:
            verdict = "picked" if sel else "left out"
            assert f"tied at the T_r cut (entropy 0): {verdict} by the seeded tie-break" in span["title"]
    assert "seeded random draw" in page.legend and "tor.seed" in page.legend


def test_the_legend_says_what_the_figure_label_colours_are():
    """The task draws each figure's labels in a random colour (part of the shipped model's inputs, so the task stays
    as it is); the page names those colours so that they do not read as a correctness signal."""
    from verl_tor.figures import task

    assert [c.replace(" ", "") for c in FIGURE_LABEL_COLORS] == list(task._COLORS)
    from verl_tor.viz import TokenMapRollout, render_token_map

    figure = task.make_problem(0).image
    import io

    buf = io.BytesIO()
    figure.save(buf, format="PNG")
    card = TokenMapRollout(["x"], [0.0], [0.0], [0.0], [False], [False], image_png=buf.getvalue())
    legend = parse(render_token_map([card])).legend
    assert "not a mark of right or wrong" in legend and "black, blue, red, dark green" in legend
    assert (
        "Colours in a figure" not in parse(render_token_map([TokenMapRollout(["x"], [0], [0], [0], [0], [0])])).legend
    )


def test_extract_boxed_reads_the_last_box_like_the_geo3k_scorer_in_linear_time():
    expected = {"\\boxed{15}": "15", "a \\boxed{1} b \\boxed{\\frac{1}{2}} c": "\\frac{1}{2}", "\\boxed{ 3 }": "3"}
    expected["\\boxed{{x}}"] = "{x}"
    for text, answer in expected.items():
        assert extract_boxed(text) == answer
    assert extract_boxed("no box") is None and extract_boxed("\\boxed{15") is None
    start = time.perf_counter()
    assert extract_boxed("\\boxed{" * 20000) is None
    assert time.perf_counter() - start < 1.0


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_cards_render_in_headless_chromium(tmp_path):
    """The browser's DOM keeps the titles, the outcome lines and the tie marks the page was written with."""
    from pathlib import Path

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is required (scripts/dev.sh installs Debian's chromium)"
    keys = ["9f1c_1_0", "07ab_0_0", "9f1c_0_0"]
    outcomes = {"reward": [0.1, 1.0, 1.0], "ground_truth": ["15"] * 3, "reward_extra_info": [{}, {}, {}]}
    path, _ = writer_page(tmp_path / "maps", outcomes, keys, [WRONG, RIGHT, RIGHT])
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    url = Path(path).resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    rendered, written = parse(dom), parse(Path(path).read_text(encoding="utf-8"))
    assert (
        rendered.titles
        == written.titles
        == ["prompt 1 · rollout 1/2", "prompt 1 · rollout 2/2", "prompt 2 · rollout 1/1"]
    )
    assert rendered.facts == written.facts and "ground truth" in rendered.facts[0]
    assert [s["class"] for s in rendered.spans] == [s["class"] for s in written.spans]
    assert any("tie" in s["class"].split() for s in rendered.spans)
