"""The README's "Shadow a version before any user sees it", run exactly as written: its shell
block, line by line, from the checkout root, against an `outrider dev` on ports picked at run
time (the clients find it through the addresses the stack prints).

While the rollout is in its shadow phase the agent's sessions all stay on v1 and the sidecar
mirrors their calls to v4; the shadow gates pass and the controller opens the first canary
step by itself, with the shadow figures in the status.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import sidecar
from tests.e2e.test_readme_demo import PORT_SPAN, Block
from tests.e2e.test_readme_registry import readme_block_under
from tests.support import DevStackProc, free_port_base

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
HEADING = "Shadow a version before any user sees it"
VERSION_FILE = ROOT / "examples" / "version-v4.yaml"
SPEC_FILE = ROOT / "examples" / "shadow-rollout.yaml"
STATUS = ".venv/bin/outrider rollout status support-bot"
POLL_S = 2.0
# the shadow phase takes 30 s and 200 pairs by the spec; a loaded CI machine gets this long
OPEN_WITHIN_S = 150.0


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_readme_shadow_block_and_examples_agree() -> None:
    lines = readme_block_under(HEADING)
    for line in lines:
        assert line.startswith((".venv/bin/", "sleep ")), (
            f"{line!r}: run from the checkout, no activated venv"
        )
    assert ".venv/bin/outrider version push examples/version-v4.yaml" in lines
    assert ".venv/bin/outrider rollout start examples/shadow-rollout.yaml" in lines
    pushed = sidecar.load_version_file(VERSION_FILE)
    config = sidecar.load_config(ROOT / "examples" / "sidecar.yaml", resolve_secrets=False)
    spec = yaml.safe_load(SPEC_FILE.read_text(encoding="utf-8"))
    assert spec["candidate"] == pushed.version_id and spec["stable"] == config.version_ids()["v1"]
    assert spec["shadow"]["sample"] == 100 and spec["steps"], "shadow first, then canary steps"
    assert pushed.version_id in (ROOT / "README.md").read_text(encoding="utf-8")
    assert config.shadow.judge is not None and config.shadow.judge.model == "sim-judge"


@pytest.mark.timeout(420)
# its agent writes .outrider/agent.log in the checkout, as the README says: one at a time
@pytest.mark.xdist_group("readme-agent-log")
def test_readme_shadow_block_runs_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = readme_block_under(HEADING)
    pushed = sidecar.load_version_file(VERSION_FILE)
    base = free_port_base(PORT_SPAN)
    state = tmp_path / "dev-state"
    dev = DevStackProc(ROOT, base, state, tmp_path / "dev.log")
    block = Block(base, tmp_path, state)
    started_at: float | None = None
    opened_after: float | None = None
    statuses: list[str] = []
    metrics = ""

    def opened(status: str) -> bool:
        return bool(re.search(r"^phase\s+running\s+step 1/", status, re.M))

    try:
        dev.wait_up()
        for line in lines:
            if line.endswith("&"):
                block.start(line)
            elif line.startswith("sleep "):
                until = time.monotonic() + float(line.split()[1])
                while time.monotonic() < until:  # the time passes as written, the status polled
                    if started_at is not None and opened_after is None and opened(block.run(STATUS)):
                        opened_after = time.monotonic() - started_at
                    time.sleep(min(POLL_S, max(0.0, until - time.monotonic())))
                # a loaded machine: the status after the sleep waits for the phase to pass
                while started_at is not None and opened_after is None:
                    assert time.monotonic() - started_at < OPEN_WITHIN_S, block.run(STATUS)
                    if opened(block.run(STATUS)):
                        opened_after = time.monotonic() - started_at
                    else:
                        time.sleep(POLL_S)
            elif "rollout abort" in line:
                with urllib.request.urlopen(f"http://127.0.0.1:{base + 3}/metrics", timeout=10) as response:
                    metrics = response.read().decode()
                assert "aborted" in block.run(line).lower()
            else:
                out = block.run(line)
                if "version push" in line:
                    assert f"support-bot version {pushed.version_id} (v4)" in out, out
                elif "rollout start" in line:
                    started_at = time.monotonic()
                    assert re.search(r"^phase\s+shadow\b", out, re.M), out
                elif "rollout status" in line:
                    statuses.append(out)
        agent_log = (ROOT / ".outrider" / "agent.log").read_text()
    finally:
        block.stop()
        code = dev.stop()
    with capsys.disabled():
        print(f"\nREADME shadow demo: canary opened {opened_after}s after `rollout start`")
    assert code == 0, dev.output()
    first, last = statuses
    assert re.search(r"^phase\s+shadow\b", first, re.M) and "pairs of " + pushed.version_id in first, first
    assert opened(last), last
    assert "shadow phase passed" in last and "every shadow gate passed" in last, last
    # the shadow figures stay in the status: every pair agreed on its tools, the judge scored some
    assert "tool agreement 100.0%" in last, last
    judged = re.search(r"judge: (\d+) pairs", last)
    assert judged and int(judged.group(1)) > 0, last
    # the sidecar mirrored calls, none of them on a user's path, and the agent saw only v1
    # until the canary opened
    assert _metric(metrics, "outrider_sidecar_shadow_calls_total") > 0, metrics
    assert _metric(metrics, 'outrider_sidecar_judge_calls_total{kind="pair",result="parsed"}') > 0, metrics
    assert "stable eb2cd9c81498" in agent_log, agent_log
