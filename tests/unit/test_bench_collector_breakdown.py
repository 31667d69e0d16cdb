"""`scripts/bench collector-breakdown`'s child: each stage it takes out is still there to take
out (a renamed stage fails here, not in a bench run), and every run applies every record.

The counting itself needs valgrind and minutes, so it is left to the bench."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.collector_breakdown import ABLATIONS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", ABLATIONS)
def test_the_child_applies_every_record_with_the_stage_taken_out(stage: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.collector_breakdown", "--child", stage, "--events", "500"],
        cwd=ROOT,
        env={**os.environ, "OUTRIDER_NATIVE": "0" if stage.startswith("upb") else "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_stage_that_is_gone_fails_the_child_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from collector import _totals
    from tests.bench import collector_breakdown

    monkeypatch.delattr(_totals.AgentTotals, "add_rows")
    with pytest.raises(AttributeError):
        collector_breakdown._ablate("totals")
