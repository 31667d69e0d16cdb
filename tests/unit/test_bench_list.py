"""The README's Benchmarks section and `scripts/bench --list` name the same benchmarks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_benchmarks_are_the_registered_ones() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--list"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    registered = set(listed.split("benchmarks:", 1)[1].split())
    section = ROOT.joinpath("README.md").read_text().split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    in_readme = set(re.findall(r"^scripts/bench ([a-z][\w-]*)", section, re.MULTILINE))
    assert in_readme == registered
