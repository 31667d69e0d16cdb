"""`scripts/bench guards` runs and reports every case (speed itself is the bench's, not a test's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.bench import guards

ROOT = Path(__file__).resolve().parents[2]


def test_guards_bench_reports_every_case_against_its_baseline() -> None:
    out = guards.run(runs=1, scans=2)
    assert set(out) == {
        "baseline_regex_pass_us",
        "scan_output_4kb_us",
        "scan_input_4kb_us",
        "output_vs_baseline",
        "input_vs_baseline",
    }
    assert all(value > 0 for value in out.values())
    assert out["output_vs_baseline"] == out["scan_output_4kb_us"] / out["baseline_regex_pass_us"]


def test_guards_bench_refuses_zero_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench", "guards", "--runs", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--runs and --scans must be at least 1" in result.stderr
