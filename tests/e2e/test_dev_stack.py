"""`outrider dev` as a newcomer runs it: up with one command, usable, down with Ctrl-C.

On ports picked at run time (`OUTRIDER_DEV_PORT_BASE`) and a run directory of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import openai
import pytest
import yaml

from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.support import DevStackProc, free_port_base

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]


def _outrider(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
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
    base = free_port_base(6)
    dev = DevStackProc(ROOT, base, tmp_path / "state", tmp_path / "dev.log")
    admin = {
        "OUTRIDER_ADMIN_ADDR": f"127.0.0.1:{base + 1}",
        "OUTRIDER_ADMIN_TOKEN_FILE": str(tmp_path / "state" / "admin-token"),
    }
    try:
        dev.wait_up()
        pids = dev.child_pids()
        assert len(pids) == 4, dev.output()  # broker, simprovider, collector, sidecar
        assert f"OUTRIDER_SIDECAR_ADDR=127.0.0.1:{base + 2}" in dev.output()

        with grpc.insecure_channel(f"127.0.0.1:{base + 2}") as channel:
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
            assert not reply.degraded  # the moved provider URL is the one called

        # an openai-SDK agent changes base_url only
        assert f"openai http://127.0.0.1:{base + 5}/v1" in dev.output()
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{base + 5}/v1",
            api_key="unused",
            http_client=openai.DefaultHttpxClient(trust_env=False),
        ) as agent:
            answer = agent.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content

        started = _outrider("rollout", "start", "examples/rollout.yaml", env=admin)
        assert started.returncode == 0, started.stderr
        assert "running" in started.stdout
        # the CLI found the operator token `outrider dev` wrote; decided_by is that identity
        assert "(by token:dev)" in started.stdout, started.stdout
        assert (tmp_path / "state" / "control.pub").is_file()
        status = _outrider("rollout", "status", "support-bot", env=admin)
        assert status.returncode == 0 and "support-bot" in status.stdout, status.stderr
        again = _outrider("rollout", "start", "examples/rollout.yaml", env=admin)
        assert again.returncode != 0 and "ALREADY_EXISTS" in again.stderr

        assert dev.stop() == 0, dev.output()
        assert "outrider dev stopped." in dev.output()
        assert not [pid for pid in pids if _alive(pid)], f"left running:\n{dev.output()}"
    finally:
        dev.stop()
