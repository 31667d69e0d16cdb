"""`outrider dev` as a newcomer runs it: up with one command, usable, down with Ctrl-C.

It binds the fixed development ports of the example config (see devstack/stack.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml

from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 60.0


def _outrider(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it has exited all the same
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def test_example_rollout_names_the_example_versions() -> None:
    listed = _outrider("versions", "--config", "examples/sidecar.yaml")
    assert listed.returncode == 0, listed.stderr
    ids = dict(line.split("\t")[:2] for line in listed.stdout.splitlines())
    spec = yaml.safe_load((ROOT / "examples" / "rollout.yaml").read_text())
    assert spec["stable"] == ids["v1"].split()[0]
    assert spec["candidate"] == ids["v2"].split()[0]


def test_outrider_dev_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    log = tmp_path / "dev.log"
    with open(log, "w") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "devstack", "dev"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while "outrider dev is up" not in log.read_text():
            assert dev.poll() is None, f"outrider dev exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"outrider dev not up:\n{log.read_text()}"
            time.sleep(0.1)
        pids = [int(p) for p in re.findall(r"pid (\d+)", log.read_text())]
        assert len(pids) == 4, log.read_text()  # broker, simprovider, collector, sidecar

        with grpc.insecure_channel("127.0.0.1:50051") as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            opened = stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="newcomer"), timeout=10)
            assert opened.role == common_pb2.ROLE_STABLE
            reply = stub.Chat(
                sidecar_pb2.ChatRequest(
                    session_id=opened.session_id,
                    messages=[common_pb2.ChatMessage(role="user", content="hello")],
                ),
                timeout=10,
            )
            assert reply.message.content and reply.version_id == opened.version_id

        started = _outrider("rollout", "start", "examples/rollout.yaml")
        assert started.returncode == 0, started.stderr
        assert "running" in started.stdout
        # the CLI found the operator token `outrider dev` wrote; decided_by is that identity
        assert "(by token:dev)" in started.stdout, started.stdout
        assert (ROOT / ".outrider" / "dev" / "control.pub").is_file()
        status = _outrider("rollout", "status", "support-bot")
        assert status.returncode == 0 and "support-bot" in status.stdout, status.stderr
        again = _outrider("rollout", "start", "examples/rollout.yaml")
        assert again.returncode != 0 and "ALREADY_EXISTS" in again.stderr

        dev.send_signal(signal.SIGINT)
        assert dev.wait(30) == 0, log.read_text()
        assert "outrider dev stopped." in log.read_text()
        assert not [pid for pid in pids if _alive(pid)], f"left running:\n{log.read_text()}"
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
