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
