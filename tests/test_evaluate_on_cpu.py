"""Evaluation: the rule-based scorer on hand-made answers, and the HF backend on the tiny model for 2 items."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from verl_tor.tools.evaluate import BenchmarkError, evaluate, extract_answer, is_correct, load_benchmark, summary_table


def boxed(answer: str) -> str:
    return f"<think>...</think> so \\boxed{{{answer}}}"


@pytest.mark.parametrize(
    ("pred", "answer", "choices", "expected"),
    [
        # issue 11, counted correct before: plain numbers must be equal, units must agree
        ("101", "100", None, False),
        ("99.5", "100", None, False),
        ("1,5", "15", None, False),
        ("0.0000001", "0", None, False),
        ("5 m", "5 cm", None, False),
        # issue 11, counted wrong before: symbolic equivalence, unicode, rounded decimals, equations, letters
        ("-\\frac{1}{2}", "-0.5", None, True),
        ("\\frac12", "0.5", None, True),
        ("2\\sqrt{3}", "2√3", None, True),
        ("3\\pi", "9.42", None, True),
        ("3\\pi", "9.42477796076938", None, True),
        ("x = 5", "5", None, True),
        ("B. 2", "B", None, True),
        ("B. 2", "B", ["1", "2", "3"], True),
        # more of the protocol
        ("12", "12", None, True),
        ("12.0", "12", None, True),
        ("11.99", "12", None, False),
        ("13", "12", None, False),
        ("1,000", "1000", None, True),
        ("50\\%", "50", None, True),
        ("\\frac{1}{2}", "0.5", None, True),
        ("3/4", "0.75", None, True),
        ("1/3", "0.333", None, True),
        ("2\\sqrt{3}", "3.4641", None, True),
        ("2\\sqrt{3}", "3", None, False),  # an integer reference is exact, not a rounding
        ("9.43", "3\\pi", None, False),
        ("60^\\circ", "60", None, True),
        ("60°", "60 degrees", None, True),
        ("5 cm", "5", None, True),  # a unit on one side only is ignored
        ("\\text{5 cm}", "5", None, True),
        ("4 cm^2", "4 cm", None, False),
        ("Yes", "yes", None, True),
        ("B", "B", ["3", "4", "5"], True),
        ("(C)", "C", ["3", "4", "5"], True),
        ("4", "B", ["3", "4", "5"], True),  # the choice's content instead of its letter
        ("A", "B", ["3", "4", "5"], False),
        ("B", "4", ["3", "4", "5"], True),  # the reference given as the choice's text
    ],
)
def test_answer_matching_protocol(pred, answer, choices, expected):
    assert is_correct(boxed(pred), answer, choices) is expected


def test_extraction_takes_the_last_box_or_fbox_and_nothing_else():
    assert extract_answer("\\boxed{1} then \\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"
    assert extract_answer("the answer is \\fbox{5}.") == "5"
    assert extract_answer("no box, answer: 7") is None
    assert is_correct("\\fbox{5}", "5") and not is_correct("no box, answer: 7", "7") and not is_correct("", "7")


# (boxed answer, reference, verl's Geometry3K accuracy reward, evaluation): where they differ, the module docstring
# says why. Rewards come from verl's own scorer (mathruler), the one the recipes train with.
TRAINING_VS_EVALUATION = [
    ("12", "12", 1.0, True),
    ("12.0", "12", 1.0, True),
    ("\\frac{1}{2}", "0.5", 1.0, True),
    ("x = 5", "5", 1.0, True),
    ("60^\\circ", "60", 1.0, True),
    ("\\text{5 cm}", "5", 1.0, True),
    ("13", "12", 0.0, False),
    ("99.5", "100", 0.0, False),
    ("5 m", "5 cm", 0.0, False),
    # evaluation accepts more: math-verify, unicode, exact values against rounded decimals
    ("2\\sqrt{3}", "2√3", 0.0, True),
    ("3\\pi", "9.42", 0.0, True),
    ("1/3", "0.333", 0.0, True),
    # evaluation accepts less: mathruler's 1e-7 integer tolerance
    ("0.0000001", "0", 1.0, False),
    ("5.00000001", "5", 1.0, False),
]


@pytest.mark.parametrize(("pred", "answer", "reward", "correct"), TRAINING_VS_EVALUATION)
def test_evaluation_agrees_with_the_training_reward_except_where_documented(pred, answer, reward, correct):
    from verl.utils.reward_score.geo3k import acc_reward

    assert acc_reward(boxed(pred), answer) == reward
    assert is_correct(boxed(pred), answer) is correct


def _png(image) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue()}


def test_data_quirks_are_handled_or_refused_naming_file_and_row(geometry_images, tmp_path):
    image = _png(geometry_images[0])
    rows = [
        {"question": "q0", "answer": "B", "image": image, "choices": '["3", "4"]'},  # a JSON list in a string
        {"question": "q1", "answer": "12", "image": image, "choices": None},
        {"question": "q2", "answer": "A", "image": image, "choices": "['1', '2']"},  # a Python list in a string
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "ok.parquet")
    items = load_benchmark(str(tmp_path / "ok.parquet"))
    assert [it.choices for it in items] == [["3", "4"], None, ["1", "2"]]
    assert len(load_benchmark(str(tmp_path / "ok.parquet"), limit=1)) == 1
    with pytest.raises(BenchmarkError, match="limit=0"):
        load_benchmark(str(tmp_path / "ok.parquet"), limit=0)

    bad = {
        "string": ({"question": "q", "answer": "A", "image": image, "choices": "34"}, "row 0: choices '34' is a"),
        "none": ({"question": "q", "answer": None, "image": image, "choices": None}, "row 0: no answer (None)"),
        "nan": ({"question": "q", "answer": float("nan"), "image": image, "choices": None}, "row 0: no answer (nan)"),
        "image": ({"question": "q", "answer": "1", "image": {"bytes": b"not a png"}, "choices": None}, "row 0: the im"),
    }
    for name, (row, message) in bad.items():
        path = tmp_path / f"{name}.parquet"
        pd.DataFrame([row]).to_parquet(path)
        with pytest.raises(BenchmarkError, match="Fix:") as err:
            load_benchmark(str(path))
        assert str(path) in str(err.value) and message in str(err.value), str(err.value)
    pd.DataFrame(columns=["question", "answer", "image"]).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(BenchmarkError, match="empty.parquet: no rows"):
        load_benchmark(str(tmp_path / "empty.parquet"))


def test_hf_backend_on_tiny_model(tiny_checkpoint, geometry_images, tmp_path):
    png = _png
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
    import verl_tor.tools.evaluate as ev

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


def test_one_failing_benchmark_keeps_the_others_and_every_result_is_saved(geometry_images, tmp_path, monkeypatch):
    """A corrupt image, an empty file and a backend crash each fail their own benchmark only; the results file is
    rewritten after each benchmark, so what finished is on disk even if the run dies later."""
    import json

    import verl_tor.tools.evaluate as ev

    def rows(name, n=1, **change):
        row = {"question": name, "answer": "12", "image": _png(geometry_images[0]), "choices": None}
        return pd.DataFrame([row, {**row, "answer": "13"}][:n] + ([{**row, **change}] if change else []))

    rows("mathverse", n=2).to_parquet(tmp_path / "mathverse.parquet")
    rows("mathvision", image={"bytes": b"corrupt"}).to_parquet(tmp_path / "mathvision.parquet")
    pd.DataFrame(columns=["question", "answer", "image"]).to_parquet(tmp_path / "mathvista.parquet")
    rows("wemath").to_parquet(tmp_path / "wemath.parquet")
    rows("hallusionbench").to_parquet(tmp_path / "hallusionbench.parquet")
    out = tmp_path / "results.json"
    on_disk = {}

    def fake_loader(model_path):
        def generate(items, k, max_new_tokens):
            on_disk[items[0].question] = json.loads(out.read_text()) if out.exists() else None
            if items[0].question == "wemath":
                raise RuntimeError("CUDA out of memory (simulated)")
            return [["\\boxed{12}"] * k for _ in items]

        return generate

    monkeypatch.setitem(ev.BACKENDS, "hf", fake_loader)
    results = ev.evaluate("model", str(tmp_path), backend="hf", k=2, out=str(out))
    assert results["mathverse"] == {"accuracy": 50.0, "n": 2, "k": 2, "boxed": 1.0}
    assert "mathvision.parquet row 1: the image cannot be opened" in results["mathvision"]["error"]
    assert "mathvista.parquet: no rows" in results["mathvista"]["error"]
    assert "wemath.parquet: RuntimeError: CUDA out of memory (simulated)" in results["wemath"]["error"]
    assert results["hallusionbench"]["accuracy"] == 100.0
    assert sorted(on_disk) == ["hallusionbench", "mathverse", "wemath"] and on_disk["mathverse"] is None
    assert set(on_disk["wemath"]) == {"mathverse", "mathvision", "mathvista"}  # saved before the crash
    assert json.loads(out.read_text()) == results
    assert summary_table(results, "m").splitlines()[-1] == "| m | 50.0 | error | error | error | 100.0 |"


def test_bad_arguments_and_output_paths_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import verl_tor.tools.evaluate as ev

    loads = []
    monkeypatch.setitem(ev.BACKENDS, "hf", lambda path: loads.append(path))
    pd.DataFrame([{"question": "q", "answer": "1", "image": None}]).to_parquet(tmp_path / "mathverse.parquet")
    for kwargs, message in (
        ({"k": 0}, "k=0"),
        ({"limit": 0}, "limit=0"),
        ({"out": str(tmp_path / "missing" / "r.json")}, "does not exist"),
        ({"out": str(tmp_path)}, "is a folder"),
    ):
        with pytest.raises(BenchmarkError, match=message):
            ev.evaluate("model", str(tmp_path), backend="hf", **kwargs)
    assert loads == []
    for argv, flag in ((["--k", "0"], "--k"), (["--limit", "0"], "--limit"), (["--max-new-tokens", "0"], "--max")):
        with pytest.raises(SystemExit):
            ev.main(["--model", "m", "--data-dir", str(tmp_path), *argv])
        assert f"argument {flag}" in capsys.readouterr().err
    assert ev.main(["--model", "m", "--data-dir", str(tmp_path), "--out", str(tmp_path / "no" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err and loads == []


def test_evaluate_sh_takes_model_path_and_checks_out_first(tiny_checkpoint, geometry_images, tmp_path):
    """`MODEL_PATH=... bash recipes/eval/evaluate.sh` (as its own message offers) scores a HF checkpoint; an OUT in a
    missing folder fails before any model is loaded."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "eval"
    data.mkdir()
    row = {"question": "Find the area.", "answer": "12", "image": _png(geometry_images[0]), "choices": None}
    pd.DataFrame([row]).to_parquet(data / "mathverse.parquet")
    env = {
        **os.environ,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        "MODEL_PATH": tiny_checkpoint,
        "EVAL_DATA_DIR": str(data),
        "BACKEND": "hf",
        "OUT": str(tmp_path / "missing" / "r.json"),
    }
    env.pop("CKPT_DIR", None)
    script = str(root / "recipes" / "eval" / "evaluate.sh")
    bad = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120, cwd=root)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Loading weights" not in bad.stderr
    env["OUT"] = str(tmp_path / "r.json")
    ok = subprocess.run(
        ["bash", script, "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=600, cwd=root
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["mathverse"]["n"] == 1
