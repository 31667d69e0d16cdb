"""examples/client_agent.py (outrider_client with a tool loop) against `outrider dev`, as a
newcomer runs it: the address from OUTRIDER_SIDECAR_ADDR, the tool run through the sidecar,
an answer, a streamed follow-up and feedback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import DevStackProc, free_port_base

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
PORT_SPAN = 6  # devstack._dev_state offsets: simprovider, admin, sidecar, both metrics, openai


def test_client_agent_runs_a_tool_loop_against_outrider_dev(tmp_path: Path) -> None:
    base = free_port_base(PORT_SPAN)
    dev = DevStackProc(ROOT, base, tmp_path / "state", tmp_path / "dev.log")
    try:
        dev.wait_up()
        address = f"127.0.0.1:{base + 2}"
        assert f"OUTRIDER_SIDECAR_ADDR={address}" in dev.output()
        agent = subprocess.run(
            [sys.executable, "examples/client_agent.py", "--order", "B7"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "OUTRIDER_SIDECAR_ADDR": address},
        )
    finally:
        dev.stop()
    assert agent.returncode == 0, agent.stdout + agent.stderr
    lines = agent.stdout.splitlines()
    assert lines[0].startswith("session ") and " on version " in lines[0]
    [tool] = [line for line in lines if line.startswith("tool ")]
    assert tool.startswith("tool lookup_order (via sidecar) -> ") and "B7" in tool
    [answer] = [line for line in lines if line.startswith("answer: ")]
    assert "Simulated reply" in answer and "tool result" in answer
    [stream] = [line for line in lines if line.startswith("stream: ")]
    assert len(stream) > len("stream: ") + 10
    assert lines[-1] == "feedback sent; tool rounds 2, reopened 0"
