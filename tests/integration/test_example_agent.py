"""examples/agent.py against a scripted sidecar on a free port: it finds the sidecar through
OUTRIDER_SIDECAR_ADDR, runs sessions concurrently, and replaces a session the sidecar retired
(FAILED_PRECONDITION, as after a rollback's drain) with a new one instead of stopping; with
--tenants and --feedback it spreads sessions over tenants and reports each task's outcome."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import grpc

from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


class ScriptedSidecar(sidecar_pb2_grpc.SidecarServicer):
    """Sessions s0, s1, ...; every session opened on the canary is retired at its first Chat."""

    def __init__(self) -> None:
        self.opened = 0
        self.tenants: set[str] = set()
        self.feedback: dict[str, int] = {}  # session id -> FeedbackKind
        self.in_flight = 0
        self.most_in_flight = 0

    async def OpenSession(
        self, request: sidecar_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sidecar_pb2.OpenSessionResponse:
        n, self.opened = self.opened, self.opened + 1
        self.tenants.add(request.tenant_id)
        role = common_pb2.ROLE_CANARY if n % 2 == 0 else common_pb2.ROLE_STABLE
        return sidecar_pb2.OpenSessionResponse(session_id=f"s{n}", version_id=f"v{n % 2}", role=role)

    async def Feedback(
        self, request: sidecar_pb2.FeedbackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sidecar_pb2.FeedbackResponse:
        self.feedback[request.session_id] = request.kind
        return sidecar_pb2.FeedbackResponse()

    async def Chat(
        self, request: sidecar_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sidecar_pb2.ChatResponse:
        if int(request.session_id[1:]) % 2 == 0:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "session drained: open a new session")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)
        finally:
            self.in_flight -= 1
        return sidecar_pb2.ChatResponse(message=common_pb2.ChatMessage(role="assistant", content="ok"))


async def test_agent_runs_concurrently_and_survives_retired_sessions() -> None:
    server = grpc.aio.server()
    scripted = ScriptedSidecar()  # type: ignore[abstract]  # the agent calls only these two
    sidecar_pb2_grpc.add_SidecarServicer_to_server(scripted, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        agent = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / "agent.py"),
            "--concurrency",
            "4",
            "--sessions",
            "40",
            "--turns",
            "2",
            "--tenants",
            "3",
            "--feedback",
            cwd=ROOT,
            env={**os.environ, "OUTRIDER_SIDECAR_ADDR": f"127.0.0.1:{port}"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(agent.communicate(), 60)
        finally:
            if agent.returncode is None:
                agent.kill()
                await agent.wait()
    finally:
        await server.stop(None)
    text = out.decode()
    assert agent.returncode == 0, text
    done = text.strip().splitlines()[-1]
    assert done.startswith("done:"), text
    # 20 canary sessions retired at their first turn; every stable one ran both turns
    assert "canary v0: FAILED_PRECONDITION 20 sessions 20" in done, done
    assert "stable v1: ok 40 sessions 20" in done, done
    assert scripted.opened == 40
    assert scripted.most_in_flight > 1, "the agent's sessions ran one at a time"
    assert scripted.tenants == {"tenant-0", "tenant-1", "tenant-2"}
    # only sessions that answered every turn report success; retired ones report nothing
    assert set(scripted.feedback.values()) == {sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS}
    assert len(scripted.feedback) == 20, scripted.feedback
