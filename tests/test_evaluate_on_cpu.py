"""Evaluation: the rule-based scorer on hand-made answers, and the HF backend on the tiny model for 2 items."""

from __future__ import annotations

import io
import os

import pandas as pd
import pytest

from verl_tor.tools.evaluate import (
    BenchmarkError,
    evaluate,
    extract_answer,
    is_correct,
    is_equivalent,
    load_benchmark,
    summary_table,
)


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
        ("\\$5", "5", None, True),
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


# issue 17 item 9: each pair counted equal before (the matchers strip units and `x=` on their own)
@pytest.mark.parametrize(
    ("pred", "answer", "expected"),
    [
        ("5 kg", "5 g", False),
        ("5 s", "5 h", False),
        ("3 hours", "3 minutes", False),
        ("5 m", "5 min", False),
        ("x=5", "y=5", False),
        ("5 meals", "5 coins", False),  # words outside the unit table are compared as written, not dropped
        ("3 km/h", "3 m/s", False),
        ("3\\pi cm", "3\\pi m", False),
        ("2x", "2", False),  # a letter after a number that is not a unit is a variable
        # equal cases that must stay equal
        ("5 kg", "5 kg", True),
        ("5kg", "5 \\text{kg}", True),
        ("3 hours", "3 h", True),
        ("5 min", "5 minutes", True),
        ("5 coins", "5 coin", True),
        ("5 coins", "5", True),  # a unit on one side only is ignored, known or not
        ("3 km/h", "3 km per hour", True),
        ("3\\pi cm", "3\\pi", True),
        ("x = 5", "x=5", True),
        ("y = 2x + 1", "y = 1 + 2x", True),
        ("x = 5 cm", "5 cm", True),
        ("AB = 5", "5", True),
        ("\\angle A = 30^\\circ", "30", True),
    ],
)
def test_units_must_agree_and_an_equation_keeps_its_variable(pred, answer, expected):
    assert is_equivalent(pred, answer) is expected


def test_a_missing_reference_matches_nothing():
    """A None or empty reference is a defined "not equal" (load_benchmark refuses such rows before scoring)."""
    assert is_equivalent("5", None) is False
    assert is_equivalent("5", "  ") is False
    assert is_correct(boxed("5"), None) is False


def _extract_answer_quadratic(text):
    """The previous implementation (issue 17 item 17), kept as the reference for the linear one."""
    import re

    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for begin in reversed(starts):
        depth, j = 1, begin
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[begin : j - 1].strip()
    return None


def test_extraction_is_linear_and_agrees_with_the_quadratic_reference():
    import random
    import time

    text = "\\boxed{" * 30_000  # 210,000 characters, all unclosed: took minutes before
    start = time.perf_counter()
    assert extract_answer(text) is None
    assert extract_answer(text + "7}") == "7"
    assert time.perf_counter() - start < 1.0
    rng = random.Random(0)
    pieces = ["\\boxed{", "\\fbox{", "\\boxed {", "{", "}", "}", "a", " ", "\\frac{1}{2}"]
    cases = ["\\boxed{1} \\boxed{2", "\\boxed{\\boxed{3}}", "} \\boxed{a}}", "\\boxed{x", "{\\boxed{b}"]
    cases += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(2000)]
    for case in cases:
        assert extract_answer(case) == _extract_answer_quadratic(case), case


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
    # evaluation accepts less: mathruler's 1e-7 integer tolerance, its unit stripping, its dropping of `x=`
    ("0.0000001", "0", 1.0, False),
    ("5.00000001", "5", 1.0, False),
    ("3 hours", "3 minutes", 1.0, False),
    ("x=5", "y=5", 1.0, False),
]


@pytest.mark.parametrize(("pred", "answer", "reward", "correct"), TRAINING_VS_EVALUATION)
def test_evaluation_agrees_with_the_training_reward_except_where_documented(pred, answer, reward, correct):
    from verl.utils.reward_score.geo3k import acc_reward

    assert acc_reward(boxed(pred), answer) == reward
    assert is_correct(boxed(pred), answer) is correct


def _call_in_a_thread(fn, limit_s):
    """``fn()`` in a daemon thread; its result, or a failure when it is still running after ``limit_s``."""
    import threading

    result = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still running after {limit_s} s"
    return result[0]


def test_equivalence_has_a_timeout_off_the_main_thread(monkeypatch):
    """math-verify's timeout is signal.alarm, which only the main thread may set: off it, the comparison runs in a
    worker process that is killed when it overruns (issue 17 item 18: this froze the process before)."""
    import verl_tor.tools.evaluate as ev

    monkeypatch.setattr(ev, "EQUIVALENCE_TIMEOUT_S", 1, raising=False)
    assert _call_in_a_thread(lambda: ev.is_equivalent("10^{10^{10}}", "5"), limit_s=60) is False
    assert _call_in_a_thread(lambda: ev.is_equivalent("\\frac12", "0.5"), limit_s=60) is True
    assert _call_in_a_thread(lambda: ev.is_equivalent("5 kg", "5 g"), limit_s=60) is False


def test_a_worker_that_overruns_is_killed_and_replaced(monkeypatch, caplog):
    import sys

    import verl_tor.tools.evaluate as ev

    stuck = ev.EquivalenceWorker([sys.executable, "-c", "print('ready', flush=True); import time; time.sleep(600)"])
    monkeypatch.setattr(ev, "_WORKER", stuck)
    monkeypatch.setattr(ev, "WORKER_LIMIT_S", 1)
    assert _call_in_a_thread(lambda: ev.is_equivalent("1+1", "2"), limit_s=30) is False
    assert stuck.process is None  # killed; the next call starts a fresh one
    assert "counted as not equal" in caplog.text
    stuck.close()


def test_math_verify_logs_at_most_a_line_of_the_input(monkeypatch, caplog):
    """math-verify logs its whole input on a timeout (a 1 MB line before, issue 17 item 24)."""
    import logging

    import verl_tor.tools.evaluate as ev

    monkeypatch.setattr(ev, "EQUIVALENCE_TIMEOUT_S", 1, raising=False)
    caplog.set_level(logging.WARNING)
    huge = "1+" * 300_000 + "1"  # 600,001 characters; math-verify's parse times out on it
    assert ev.is_equivalent(huge, "7") is False
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("math_verify")]
    assert any("Timeout during parsing" in m for m in messages)
    assert max(len(m) for m in messages) <= 300, max(len(m) for m in messages)


def _fake_checkpoint(folder) -> str:
    """A folder that passes the checkpoint check (config.json of a supported family, a weights file)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


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
    results = ev.evaluate(_fake_checkpoint(tmp_path / "model"), str(tmp_path), backend="hf", k=2, out=str(out))
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
    model = _fake_checkpoint(tmp_path / "model")
    for kwargs, message in (
        ({"k": 0}, "k=0"),
        ({"limit": 0}, "limit=0"),
        ({"out": str(tmp_path / "missing" / "r.json")}, "does not exist"),
        ({"out": str(tmp_path)}, "is a folder"),
    ):
        with pytest.raises(BenchmarkError, match=message):
            ev.evaluate(model, str(tmp_path), backend="hf", **kwargs)
    assert loads == []
    for argv, flag in ((["--k", "0"], "--k"), (["--limit", "0"], "--limit"), (["--max-new-tokens", "0"], "--max")):
        with pytest.raises(SystemExit):
            ev.main(["--model", model, "--data-dir", str(tmp_path), *argv])
        assert f"argument {flag}" in capsys.readouterr().err
    assert ev.main(["--model", model, "--data-dir", str(tmp_path), "--out", str(tmp_path / "no" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err and loads == []


def test_a_missing_or_wrong_checkpoint_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    """issue 17 item 13: transformers tracebacks before; now the check `verl-tor inspect` makes, rc 2."""
    import json

    import verl_tor.tools.evaluate as ev

    loads = []
    monkeypatch.setitem(ev.BACKENDS, "hf", lambda path: loads.append(path))
    pd.DataFrame([{"question": "q", "answer": "1", "image": None}]).to_parquet(tmp_path / "mathverse.parquet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    for model, message in (
        ("/nonexistent", "--model '/nonexistent': no config.json there. Fix:"),
        (str(tmp_path / "empty"), "no config.json there. Fix:"),
        (str(tmp_path / "llama"), "is a 'llama' checkpoint, not Qwen2-VL/Qwen2.5-VL/Qwen3-VL"),
        (str(tmp_path / "no_weights"), "no weights (*.safetensors or *.bin) there. Fix:"),
    ):
        assert ev.main(["--model", model, "--data-dir", str(tmp_path), "--backend", "hf"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert loads == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_unwritable_out_is_refused_before_generation_and_an_existing_one_kept(tmp_path, monkeypatch):
    """issue 17 item 14: /proc passes os.access as root, so the run went on and failed at the end."""
    import verl_tor.tools.evaluate as ev

    loads = []
    monkeypatch.setitem(ev.BACKENDS, "hf", lambda path: loads.append(path))
    pd.DataFrame([{"question": "q", "answer": "1", "image": None}]).to_parquet(tmp_path / "mathverse.parquet")
    model = _fake_checkpoint(tmp_path / "model")
    with pytest.raises(BenchmarkError, match="--out '/proc/x.json' cannot be written"):
        ev.evaluate(model, str(tmp_path), backend="hf", out="/proc/x.json")
    assert loads == []
    before = set(os.listdir(tmp_path))
    ev.check_output_path(str(tmp_path / "new.json"))  # created, then removed
    existing = tmp_path / "old.json"
    existing.write_text('{"kept": true}')
    ev.check_output_path(str(existing))
    assert existing.read_text() == '{"kept": true}' and set(os.listdir(tmp_path)) == before | {"old.json"}


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


def test_evaluate_sh_writes_results_outside_the_model_by_default(tmp_path):
    """issue 17 item 26: on the shipped model the results went into verl_tor/assets/figure_reader/ (inside the
    installed package). The default is now ./eval_results/<model name>.json under the caller's directory. A stub
    ``python3`` records the commands, so this tests the script's path logic only."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = str(root / "recipes" / "eval" / "evaluate.sh")
    model = root / "verl_tor" / "assets" / "figure_reader"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "python3").write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    (bin_dir / "python3").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "CKPT_DIR", "MODEL_PATH", "MERGED_DIR")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"

    def run(**extra):
        calls.write_text("")
        proc = subprocess.run(["bash", script], capture_output=True, text=True, env={**env, **extra}, cwd=work)
        assert proc.returncode == 0, proc.stderr
        return calls.read_text().splitlines()

    before = sorted(os.listdir(model))
    (line,) = run(MODEL_PATH=str(model))
    assert f"--model {model} " in line and line.endswith(f"--out {work}/eval_results/figure_reader.json")
    assert (work / "eval_results").is_dir() and sorted(os.listdir(model)) == before
    (line,) = run(MODEL_PATH=f"{model}/")  # a trailing slash keeps the model's name
    assert line.endswith(f"--out {work}/eval_results/figure_reader.json")

    actor = tmp_path / "checkpoints" / "geo3k" / "grpo_tor" / "global_step_300" / "actor"
    actor.mkdir(parents=True)
    merge, line = run(CKPT_DIR=str(actor))
    assert merge.startswith("-m verl.model_merger merge") and f"--target_dir {actor}/huggingface_merged" in merge
    assert line.endswith(f"--out {work}/eval_results/grpo_tor_global_step_300.json")
    (line,) = run(MODEL_PATH=str(model), OUT=str(tmp_path / "mine.json"))  # OUT still wins
    assert line.endswith(f"--out {tmp_path}/mine.json")
