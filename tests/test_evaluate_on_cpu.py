"""Evaluation: the rule-based scorer on hand-made answers, and the HF backend on the tiny model for 2 items."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from verl_tor.evaluate import evaluate, extract_answer, is_correct, summary_table


@pytest.mark.parametrize(
    ("response", "answer", "choices", "expected"),
    [
        ("<think>...</think> so \\boxed{12}", "12", None, True),
        ("\\boxed{12.0}", "12", None, True),
        ("\\boxed{11.99}", "12", None, True),  # 1e-2 relative tolerance
        ("\\boxed{13}", "12", None, False),
        ("\\boxed{\\frac{1}{2}}", "0.5", None, True),
        ("\\boxed{3/4}", "0.75", None, True),
        ("\\boxed{60^\\circ}", "60", None, True),
        ("\\boxed{5 cm}", "5", None, True),
        ("\\boxed{2\\sqrt{3}}", "3.4641", None, True),
        ("\\boxed{B}", "B", ["3", "4", "5"], True),
        ("\\boxed{(C)}", "C", ["3", "4", "5"], True),
        ("\\boxed{4}", "B", ["3", "4", "5"], True),  # choice text instead of its letter
        ("\\boxed{A}", "B", ["3", "4", "5"], False),
        ("\\boxed{Yes}", "yes", None, True),
        ("no box, answer: 7", "7", None, True),  # fallback: last token
        ("", "7", None, False),
    ],
)
def test_rule_based_matching(response, answer, choices, expected):
    assert is_correct(response, answer, choices) is expected


def test_extract_balanced_boxed():
    assert extract_answer("\\boxed{1} then \\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"


def test_hf_backend_on_tiny_model(tiny_checkpoint, geometry_images, tmp_path):
    def png(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return {"bytes": buf.getvalue()}

    pd.DataFrame(
        [
            {"question": "Find the area.", "answer": "12", "image": png(geometry_images[0]), "choices": None},
            {"question": "Which is right?", "answer": "A", "image": png(geometry_images[1]), "choices": ["3", "4"]},
        ]
    ).to_parquet(tmp_path / "mathverse.parquet")
    results = evaluate(tiny_checkpoint, str(tmp_path), backend="hf", k=2, max_new_tokens=4)
    assert set(results) == {"mathverse"}
    r = results["mathverse"]
    assert r["n"] == 2 and r["k"] == 2 and r["accuracy"] in (0.0, 25.0, 50.0, 75.0, 100.0)
    assert "| mathverse |" in summary_table(results, "tiny").splitlines()[0]
    with pytest.raises(ValueError, match="none of"):
        evaluate(tiny_checkpoint, str(tmp_path / "nowhere"), backend="hf")


def test_the_model_is_loaded_once_for_all_benchmarks(tiny_checkpoint, geometry_images, tmp_path, monkeypatch):
    """One engine for every benchmark (a second vLLM engine in one process would not fit on the GPU)."""
    import verl_tor.evaluate as ev

    buf = io.BytesIO()
    geometry_images[0].save(buf, format="PNG")
    row = {"question": "Find the area.", "answer": "12", "image": {"bytes": buf.getvalue()}, "choices": None}
    for name in ("mathverse", "wemath", "hallusionbench"):
        pd.DataFrame([row]).to_parquet(tmp_path / f"{name}.parquet")
    loads = []

    def counting_loader(model_path):
        loads.append(model_path)
        return ev.load_hf(model_path)

    monkeypatch.setitem(ev.BACKENDS, "hf", counting_loader)
    results = ev.evaluate(tiny_checkpoint, str(tmp_path), backend="hf", k=1, max_new_tokens=2)
    assert sorted(results) == ["hallusionbench", "mathverse", "wemath"]
    assert loads == [tiny_checkpoint]
