"""examples/client_agent.py (outrider_client with a tool loop) against `outrider dev`, as a
newcomer runs it: the address from OUTRIDER_SIDECAR_ADDR, the tool run through the sidecar,
an answer, a streamed follow-up and feedback; and the README's outrider_client snippet as
written, with only the sidecar's port moved to the stack's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import DevStackProc, free_port_base

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
PORT_SPAN = 6  # devstack._dev_state offsets: simprovider, admin, sidecar, both metrics, openai


def readme_client_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = re.search(r"^### Wire your agent$", text, re.M)
    assert heading, "README.md has no 'Wire your agent' section"
    blocks = re.findall(r"^```python\n(.*?)^```", text[heading.end() :].split("\n## ", 1)[0], re.M | re.S)
    [snippet] = [b for b in blocks if "from outrider_client import" in b]
    assert 'Client("127.0.0.1:50051")' in snippet and len(snippet.splitlines()) < 15
    return snippet


def _python(*args: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "OUTRIDER_SIDECAR_ADDR": address},
    )


def test_client_agent_and_readme_snippet_against_outrider_dev(tmp_path: Path) -> None:
    snippet = readme_client_snippet()
    base = free_port_base(PORT_SPAN)
    dev = DevStackProc(ROOT, base, tmp_path / "state", tmp_path / "dev.log")
    try:
        dev.wait_up()
        address = f"127.0.0.1:{base + 2}"
        assert f"OUTRIDER_SIDECAR_ADDR={address}" in dev.output()
        agent = _python("examples/client_agent.py", "--order", "B7", address=address)
        readme = _python("-c", snippet.replace("127.0.0.1:50051", address), address=address)
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
    assert readme.returncode == 0, readme.stderr
    assert readme.stdout.startswith("Simulated reply") and "A1" in readme.stdout, readme.stdout
