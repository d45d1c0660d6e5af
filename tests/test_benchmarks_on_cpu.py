"""Every benchmark still runs (at toy sizes) and prints its table; the numbers themselves live in
benchmarks/README.md, measured at full size, not here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TOY = {
    "bench_select.py": ["--prompts", "4", "--n", "3", "--response-length", "64", "--repeats", "1"],
    "bench_entropy.py": ["--tokens", "64", "--vocab", "2048", "--repeats", "1"],
    "bench_entropy_agreement.py": [],
    "bench_entropy_exactness.py": ["--scale", "0.05", "--max-vocab", "4096"],
    "bench_stage.py": [
        "--sizes",
        "tiny",
        "--rollouts",
        "4",
        "--response-length",
        "16",
        "--image-size",
        "112",
        "--repeats",
        "1",
    ],
    "bench_driver.py": ["--rows", "2", "--response-length", "32", "--image-size", "112", "--repeats", "1"],
    "bench_grounding.py": ["--problems", "4", "--n", "2"],
    "bench_informative.py": [
        "--prompts",
        "2",
        "--n",
        "2",
        "--response-length",
        "8",
        "--image-size",
        "112",
        "--repeats",
        "1",
    ],
}
ELSEWHERE = {
    # two main_ppo runs of its own would cost CI ~3 min: its summary runs on the loop tests' stock and ToR runs
    "bench_loop.py": "tests/test_main_ppo_stock_on_cpu.py::test_bench_loop_summarises_a_stock_and_a_tor_run",
    "bench_gpu.py": "tests/test_benchmarks_on_cpu.py::test_bench_gpu_runs_every_section_at_tiny_size",
}


def test_every_benchmark_is_covered():
    assert sorted([*TOY, *ELSEWHERE]) == sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
    for test in ELSEWHERE.values():
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test


@pytest.mark.parametrize("script", sorted(TOY))
def test_benchmark_runs_and_prints_a_table(script):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *TOY[script]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) >= 3, proc.stdout[-3000:]  # header, rule, at least one measured row


def test_bench_gpu_runs_every_section_at_tiny_size(tmp_path):
    """The GPU benchmark at its CPU sizes (automatic without a GPU): every section runs and reports, a failing section
    is recorded without stopping the others, and both top-p methods keep the exactness checks on the device."""
    import json

    out = tmp_path / "bench_gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--out", str(out),
         "--sections", "exactness,entropy,no_such_section,models"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": ""},  # torch + transformers + this checkout only: no verl needed
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert "error" in sections["no_such_section"]  # recorded; the next section still ran
    assert sorted(sections["exactness"]) == sorted(["escalate", "bracket", "radix", "radix, bins at every V"])
    for method, exact in sections["exactness"].items():
        assert exact["one_token_rows_above_zero"] == 0 and exact["boundary_rows_not_exact"] == 0, (method, exact)
        assert abs(exact["issue_row_H"] - 0.66156) < 1e-4, (method, exact)
    paths = sections["entropy"]["rows"]
    assert len(paths) == 34 and all("ms" in r for r in paths), [r for r in paths if "ms" not in r]
    radix = [r for r in paths if "radix" in r["path"]]
    assert len(radix) == 8 and all(r["max_abs_diff_vs_before"] < 1e-5 for r in radix), radix
    assert all(r["max_abs_diff_vs_before"] < 1e-5 for r in paths if r["path"].startswith("top-p after"))
    for family in ("qwen2_5_vl", "qwen3_vl"):
        model = sections["models"]["models"][family]
        assert "error" not in model, model.get("traceback", model)
        for head in ("random head", "head x8"):
            assert all("ms" in r for r in model[head].values()), model[head]
        assert "ms" in model["forward + backward (checkpointing)"], model
    assert sum(line.startswith("| ") for line in proc.stdout.splitlines()) > 40
