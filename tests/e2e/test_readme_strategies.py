"""The README's release strategies, each section's shell block run exactly as written, from the
checkout root, one after the other on ONE `outrider dev` (ports picked at run time; the clients
find it through the addresses the stack prints), as a user reading down the README would.

Each block ends its rollout (abort, switch-back) and its background agent is stopped before
the next block starts (a user's `kill %1`), so the blocks also work on a fresh `scripts/dev`.
One stack for all of them keeps the suite's time down: starting `outrider dev` costs ~10 s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import sidecar
from tests.e2e.test_readme_demo import PORT_SPAN, Block
from tests.e2e.test_readme_registry import readme_block_under
from tests.support import DevStackProc, free_port_base

# the blocks' agents write .outrider/agent.log in the checkout, as the other README demos do:
# one xdist group runs them one at a time (and keeps this module's one stack on one worker)
pytestmark = [pytest.mark.e2e, pytest.mark.broker, pytest.mark.xdist_group("readme-agent-log")]

ROOT = Path(__file__).resolve().parents[2]
STATUS = ".venv/bin/outrider rollout status support-bot"


@dataclass
class Stack:
    dev: DevStackProc
    base: int
    state: Path
    logs: Path

    def block(self, name: str) -> Block:
        logs = self.logs / name
        logs.mkdir()
        return Block(self.base, logs, self.state)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("readme-strategies")
    base = free_port_base(PORT_SPAN)
    state = tmp / "dev-state"
    dev = DevStackProc(ROOT, base, state, tmp / "dev.log")
    try:
        dev.wait_up()
        yield Stack(dev, base, state, tmp)
    finally:
        code = dev.stop()
    assert code == 0, dev.output()


def run_block(block: Block, lines: list[str]) -> list[tuple[str, str]]:
    """Every line as written (background lines started, sleeps slept); (line, output) of the rest."""
    outputs: list[tuple[str, str]] = []
    try:
        for line in lines:
            if line.endswith("&"):
                block.start(line)
            elif line.startswith("sleep "):
                time.sleep(float(line.split()[1]))
            else:
                outputs.append((line, block.run(line)))
    finally:
        block.stop()
    return outputs


def version_id(name: str) -> str:
    return sidecar.load_version_file(ROOT / "examples" / name).version_id


def test_readme_strategy_blocks_run_from_the_checkout() -> None:
    for heading in ("Per-tenant canaries", "Blue-green", "A/B test", "Feature flags"):
        for line in readme_block_under(heading):
            assert line.startswith((".venv/bin/", "sleep ")), f"{line!r}: run from the checkout"


def test_readme_tenant_canary_block_runs_as_written(stack: Stack) -> None:
    v3 = version_id("version-v3.yaml")
    outputs = run_block(stack.block("tenants"), readme_block_under("Per-tenant canaries"))
    started = next(out for line, out in outputs if "rollout start" in line)
    assert re.search(r"^phase\s+running\b", started, re.M), started
    status = next(out for line, out in outputs if line == STATUS)
    assert "*** time_scale 0.01: a scaled demo, durations are 1/100 of the plan ***" in status, status
    groups = {
        (m.group(1), m.group(2)): int(m.group(3))
        for m in re.finditer(r"^group\s+(\S+)\s+\S+\s+(\w+)\s+(\d+) requests", status, re.M)
    }
    opt_in = {v: n for (g, v), n in groups.items() if g == "opt-in"}
    excluded = {v: n for (g, v), n in groups.items() if g == "excluded"}
    split = {v: n for (g, v), n in groups.items() if g == "split"}
    # the agent's 20 tenants: 2 opt in (all on v3), 1 excluded (never on it), the rest split at 1 %
    assert set(opt_in) == {v3} and opt_in[v3] > 0, status
    assert excluded and v3 not in excluded, status
    assert sum(split.values()) > 0 and split.get(v3, 0) <= 0.2 * sum(split.values()), status
    aborted = next(out for line, out in outputs if "rollout abort" in line)
    assert "aborted" in aborted.lower(), aborted


def test_readme_blue_green_block_runs_as_written(stack: Stack) -> None:
    v4 = version_id("version-v4.yaml")
    outputs = run_block(stack.block("blue-green"), readme_block_under("Blue-green"))
    started = next(out for line, out in outputs if "rollout start" in line)
    assert re.search(r"^phase\s+smoke test\b", started, re.M), started
    status = next(out for line, out in outputs if line == STATUS)
    assert re.search(r"^phase\s+switched\b", status, re.M), status
    passed = r"^reason\s+switched: green passed all 2 smoke tests on sidecar .*order-lookup"
    assert re.search(passed, status, re.M), status
    assert "blue warm until" in status and v4 in status, status
    back = next(out for line, out in outputs if "switch-back" in line)
    assert "rolled back" in back.lower() and "blue-green demo done" in back, back


def test_readme_ab_test_block_runs_as_written(stack: Stack) -> None:
    v1, v4 = "eb2cd9c81498", version_id("version-v4.yaml")
    outputs = run_block(stack.block("ab-test"), readme_block_under("A/B test"))
    simulated = next(out for line, out in outputs if "rollout simulate" in line)
    assert "B" in simulated and "%" in simulated, simulated
    started = next(out for line, out in outputs if "rollout start" in line)
    assert re.search(r"^phase\s+running\b", started, re.M), started
    status = next(out for line, out in outputs if line == STATUS)
    # the plan up front, each variant's figures, the verdict still running
    assert re.search(
        r"^a/b test\s+task_success, fixed: running; planned \d+ samples per variant", status, re.M
    )
    assert re.search(rf"^control\s+A\s+{v1}\s+weight 50%", status, re.M), status
    assert re.search(rf"^variant\s+B\s+{v4}\s+weight 50%", status, re.M), status
    aborted = next(out for line, out in outputs if "rollout abort" in line)
    assert "aborted" in aborted.lower(), aborted


def test_readme_feature_flag_block_runs_as_written(stack: Stack) -> None:
    outputs = run_block(stack.block("flags"), readme_block_under("Feature flags"))
    listed = next(out for line, out in outputs if "flag list" in line)
    assert re.search(r"^concise-replies: 10% of tenants \+ tenants tenant-0", listed, re.M), listed
    arms = {
        m.group(1): (int(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"^\s+(on|off)\s+requests\s+(\d+).*sessions (\d+)", listed, re.M)
    }
    # tenant-0 (1 of the agent's 20 tenants) and the hashed 10 % have it on; the rest off
    assert arms["on"][0] > 0 and arms["off"][0] > arms["on"][0], listed
    cleared = next(out for line, out in outputs if "flag clear" in line)
    assert "concise-replies" in cleared, cleared


def test_readme_wire_your_agent_snippet_runs_against_the_dev_sidecar(stack: Stack) -> None:
    """The "Wire your agent" snippet, as written, with only the port of `base_url` moved to the
    stack's (`outrider dev` prints that URL): its tool loop runs through the sidecar's endpoint."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = re.search(r"^### Wire your agent$", text, re.M)
    assert heading, "README.md has no 'Wire your agent' section"
    code = re.search(r"^```python\n(.*?)^```", text[heading.end() :], re.M | re.S)
    assert code and 'base_url="http://127.0.0.1:8001/v1"' in code.group(1), "the snippet's base_url"
    assert len(code.group(1).splitlines()) < 20, "the snippet stays short"
    snippet = code.group(1).replace("127.0.0.1:8001", f"127.0.0.1:{stack.base + 5}")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    done = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the agent printed no answer"
