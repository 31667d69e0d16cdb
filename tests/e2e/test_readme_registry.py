"""The README's "Ship a new version without touching a sidecar", run exactly as written: its
shell block, line by line, from the checkout root, against an `outrider dev` started on ports
picked at run time (the clients find it through `OUTRIDER_ADMIN_ADDR`, `OUTRIDER_SIDECAR_ADDR`
and `OUTRIDER_ADMIN_TOKEN_FILE`, as the stack prints them).

The pushed version must reach the dev stack's sidecar without a restart: once the rollout
naming it runs, new sessions land on it and the simulated provider serves its model.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

import sidecar
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.e2e.test_readme_demo import PORT_SPAN, Block
from tests.support import DevStackProc, free_port_base

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
HEADING = "Ship a new version without touching a sidecar"
VERSION_FILE = ROOT / "examples" / "version-v3.yaml"
SPEC_FILE = ROOT / "examples" / "rollout-v3.yaml"


def readme_block_under(title: str) -> list[str]:
    """The lines of the first ```sh block under the README heading containing `title`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = re.search(rf"^#+ .*{re.escape(title)}.*$", text, re.M)
    assert heading, f'README.md has no heading containing "{title}"'
    block = re.search(r"^```(?:sh|bash|shell)\n(.*?)^```", text[heading.end() :], re.M | re.S)
    assert block, f"no shell block under the {title} heading"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def readme_registry_block() -> list[str]:
    return readme_block_under(HEADING)


def test_readme_registry_block_and_examples_agree() -> None:
    lines = readme_registry_block()
    for line in lines:
        assert line.startswith(".venv/bin/"), f"{line!r}: run from the checkout, no activated venv"
    assert lines[0] == ".venv/bin/outrider version push examples/version-v3.yaml"
    assert ".venv/bin/outrider version list support-bot" in lines
    assert ".venv/bin/outrider rollout start examples/rollout-v3.yaml" in lines
    pushed = sidecar.load_version_file(VERSION_FILE)
    config = sidecar.load_config(ROOT / "examples" / "sidecar.yaml", resolve_secrets=False)
    spec = yaml.safe_load(SPEC_FILE.read_text(encoding="utf-8"))
    assert spec["agent"] == pushed.agent == config.agent
    assert spec["candidate"] == pushed.version_id, "examples/rollout-v3.yaml must name the pushed id"
    assert spec["stable"] == config.version_ids()["v1"]
    assert pushed.version_id not in config.version_ids().values(), "v3 must not be in the sidecar's config"
    assert pushed.version_id in (ROOT / "README.md").read_text(encoding="utf-8")


def _sessions_on(address: str, version_id: str, tries: int = 400) -> int:
    """Open sessions until one lands on `version_id` and chat in it; how many sessions it took."""
    with grpc.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        for n in range(1, tries + 1):
            opened = stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id=f"readme-{n}"), timeout=10)
            if opened.version_id == version_id:
                reply = stub.Chat(
                    sidecar_pb2.ChatRequest(
                        session_id=opened.session_id,
                        messages=[common_pb2.ChatMessage(role="user", content="where is my order 42?")],
                    ),
                    timeout=30,
                )
                assert reply.version_id == version_id
                return n
    raise AssertionError(f"no session landed on {version_id} in {tries} tries")


@pytest.mark.timeout(300)
def test_readme_registry_block_runs_as_written(tmp_path: Path) -> None:
    lines = readme_registry_block()
    pushed = sidecar.load_version_file(VERSION_FILE)
    base = free_port_base(PORT_SPAN)
    state = tmp_path / "dev-state"
    dev = DevStackProc(ROOT, base, state, tmp_path / "dev.log")
    block = Block(base, tmp_path, state)
    outputs: dict[str, str] = {}
    try:
        dev.wait_up()
        for line in lines:
            outputs[line] = block.run(line)
            if "version push" in line:
                assert (
                    f"pushed: support-bot version {pushed.version_id} (v3), model sim-fast" in outputs[line]
                )
                # the same content again: the same id, nothing new
                again = block.run(line)
                assert f"already in the registry: support-bot version {pushed.version_id}" in again
            elif "version list" in line:
                listed = outputs[line]
                assert pushed.version_id in listed and "pushed " in listed and "by token:dev" in listed
                assert "eb2cd9c81498" in listed and "config only" in listed  # v1, as the sidecar reports it
            elif "rollout start" in line:
                assert "running" in outputs[line] and pushed.version_id in outputs[line]
                # the dev sidecar, never restarted, serves the pushed version to new sessions
                _sessions_on(f"127.0.0.1:{base + 2}", pushed.version_id)
                with urllib.request.urlopen(f"http://127.0.0.1:{base}/_sim/stats", timeout=10) as response:
                    stats = json.load(response)
                assert stats["models"]["sim-fast"]["requests"] >= 1, stats
            elif "rollout status" in line:
                assert pushed.version_id in outputs[line] and "running" in outputs[line]
            elif "rollout abort" in line:
                assert "aborted" in outputs[line].lower()
        # the sidecar said where the version came from
        deadline = time.monotonic() + 10
        while "registry: serving version " + pushed.version_id not in dev.output():
            assert time.monotonic() < deadline, dev.output()
            time.sleep(0.1)
    finally:
        assert dev.stop() == 0, dev.output()
