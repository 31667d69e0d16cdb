"""The sidecar's gRPC API with a real grpc.aio client, a real Sidecar on port 0 and the
simulated provider on loopback. Kafka points at a port nobody listens on: the sidecar must
serve anyway (telemetry through a real broker is in test_sidecar_kafka.py)."""

from __future__ import annotations

import asyncio
import atexit
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import outrider
from devstack.broker import free_port
from devstack.simprovider import ModelBehavior, SimProvider, ToolBehavior
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar, SidecarConfig
from sidecar._config import parse_config
from tests.support import TEST_SIGNER

API_KEY = "sk-sim-secret-0123456789"
SYSTEM_PROMPT = "You are a helpful support agent."
USER = [common_pb2.ChatMessage(role="user", content="Where is my order?")]
# every test sidecar spills into its own directory, never the default one under the cwd
_SPILL_ROOT = Path(tempfile.mkdtemp(prefix="outrider-test-spill-"))
atexit.register(shutil.rmtree, _SPILL_ROOT, True)


def fresh_spill_dir() -> str:
    """An empty directory for one sidecar's telemetry spill (removed when the test run ends)."""
    return tempfile.mkdtemp(dir=_SPILL_ROOT)


def sidecar_config(
    sim: SimProvider,
    *,
    kafka: str | None = None,
    good: str = "sim-good",
    bad: str = "sim-bad",
    api_key: bool = True,
    **overrides: Any,
) -> SidecarConfig:
    """Two versions (v1 stable on `good`, v2 on `bad`) against the simulated provider."""

    def version(model: str, prompt: str) -> dict[str, Any]:
        provider: dict[str, Any] = {"name": "openai", "base_url": sim.base_url}
        if api_key:
            provider["api_key_env"] = "TEST_SIM_KEY"
        return {
            "provider": provider,
            "model": model,
            "system_prompt": prompt,
            "parameters": {"temperature": 0.2, "max_tokens": 64},
            "request_timeout": "5s",
            "tools": [
                {
                    "name": "lookup_order",
                    "description": "Look up an order by id",
                    "endpoint": sim.tool_url("lookup_order"),
                    "timeout": "2s",
                    "side_effects": "read",
                    "idempotent": True,
                    "parameters": {
                        "type": "object",
                        "properties": {"order_id": {"type": "string"}},
                        "required": ["order_id"],
                    },
                },
                {"name": "echo", "endpoint": sim.tool_url("echo"), "timeout": "2s"},
            ],
        }

    data: dict[str, Any] = {
        "agent": "support-bot",
        "stable": "v1",
        "listen": "127.0.0.1:0",
        "metrics_port": 0,
        "kafka": {"bootstrap_servers": kafka or f"127.0.0.1:{free_port()}"},
        "shutdown_grace": "5s",
        "telemetry": {"spill_dir": fresh_spill_dir()},
        "versions": {"v1": version(good, SYSTEM_PROMPT), "v2": version(bad, "You are terse.")},
        # trusts the tests' signing key; health does not wait for a control state
        "control": {"public_keys": [TEST_SIGNER.public_text()], "ready_timeout": "0s"},
    }
    data.update(overrides)
    return parse_config(data, source="test.yaml").load_secrets({"TEST_SIM_KEY": API_KEY})


def sim_models(**behaviors: ModelBehavior) -> dict[str, ModelBehavior]:
    return {"sim-good": ModelBehavior(), "sim-bad": ModelBehavior(), **behaviors}


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=1) as provider:
        yield provider


@pytest.fixture
async def sidecar(sim: SimProvider) -> AsyncIterator[Sidecar]:
    async with Sidecar(sidecar_config(sim), sidecar_id="test-sidecar") as s:
        yield s


@pytest.fixture
async def channel(sidecar: Sidecar) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(sidecar.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> sidecar_pb2_grpc.SidecarStub:
    return sidecar_pb2_grpc.SidecarStub(channel)


async def open_session(stub: sidecar_pb2_grpc.SidecarStub, **kw: str) -> sidecar_pb2.OpenSessionResponse:
    return await stub.OpenSession(sidecar_pb2.OpenSessionRequest(**kw))


async def expect_status(call: Any, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        result = call
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    for fragment in fragments:
        assert fragment in details, details
    assert API_KEY not in details
    return details


# happy paths


async def test_open_session_pins_the_stable_version(
    stub: sidecar_pb2_grpc.SidecarStub, sidecar: Sidecar
) -> None:
    before = time.time()
    session = await open_session(stub, user_id="u1")
    assert session.version_id == sidecar.config.stable_version_id
    assert session.role == common_pb2.ROLE_STABLE
    assert session.rollout_id == ""
    assert before + 3500 < session.expires_at_unix_nano / 1e9 < time.time() + 3601
    again = await open_session(stub, agent="support-bot")
    assert again.session_id != session.session_id


async def test_chat_sends_the_versions_model_prompt_parameters_and_key(
    stub: sidecar_pb2_grpc.SidecarStub, sim: SimProvider, sidecar: Sidecar
) -> None:
    session = await open_session(stub)
    response = await stub.Chat(sidecar_pb2.ChatRequest(session_id=session.session_id, messages=USER))
    assert response.message.role == "assistant"
    assert "Where is my order?" in response.message.content
    assert response.finish_reason == "stop"
    assert response.version_id == session.version_id
    assert response.role == common_pb2.ROLE_STABLE
    assert response.served_by == "primary"
    assert not response.degraded
    assert response.model == "sim-good"
    assert response.response_id
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.cost_usd == 0

    received = sim.received[-1]
    assert received.path == "/v1/chat/completions"
    body = received.body
    assert body["model"] == "sim-good"
    assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert body["messages"][1] == {"role": "user", "content": "Where is my order?"}
    assert body["temperature"] == 0.2 and body["max_tokens"] == 64
    assert [t["function"]["name"] for t in body["tools"]] == ["lookup_order", "echo"]
    assert body["tools"][0]["type"] == "function"
    assert body["tools"][0]["function"]["parameters"]["required"] == ["order_id"]
    assert "stream" not in body
    assert received.headers["Authorization"] == f"Bearer {API_KEY}"


async def test_chat_returns_tool_calls(stub: sidecar_pb2_grpc.SidecarStub) -> None:
    session = await open_session(stub)
    messages = [common_pb2.ChatMessage(role="user", content='/tool lookup_order {"order_id": "A1"}')]
    response = await stub.Chat(sidecar_pb2.ChatRequest(session_id=session.session_id, messages=messages))
    assert response.finish_reason == "tool_calls"
    [call] = response.message.tool_calls
    assert call.name == "lookup_order"
    assert json.loads(call.arguments_json) == {"order_id": "A1"}
    assert call.id


async def test_chat_stream_yields_deltas_then_final(
    stub: sidecar_pb2_grpc.SidecarStub, sim: SimProvider
) -> None:
    session = await open_session(stub)
    chunks = [
        c
        async for c in stub.ChatStream(sidecar_pb2.ChatRequest(session_id=session.session_id, messages=USER))
    ]
    deltas = [c.content_delta for c in chunks[:-1]]
    assert len(deltas) >= 2 and all(deltas)
    final = chunks[-1].final
    assert chunks[-1].HasField("final")
    assert final.message.content == "".join(deltas)
    assert final.finish_reason == "stop"
    assert final.usage.output_tokens > 0
    assert final.version_id == session.version_id
    body = sim.received[-1].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"][0]["role"] == "system"


async def test_chat_stream_assembles_tool_calls(stub: sidecar_pb2_grpc.SidecarStub) -> None:
    session = await open_session(stub)
    args = json.dumps({"order_id": "B-" + "7" * 60})
    messages = [common_pb2.ChatMessage(role="user", content=f"/tool lookup_order {args}")]
    chunks = [
        c
        async for c in stub.ChatStream(
            sidecar_pb2.ChatRequest(session_id=session.session_id, messages=messages)
        )
    ]
    final = chunks[-1].final
    assert final.finish_reason == "tool_calls"
    [call] = final.message.tool_calls
    assert call.name == "lookup_order" and json.loads(call.arguments_json) == json.loads(args)
    assert [c.name for c in chunks[-2].tool_calls] == ["lookup_order"]


async def test_call_tool_posts_arguments(stub: sidecar_pb2_grpc.SidecarStub, sim: SimProvider) -> None:
    session = await open_session(stub)
    response = await stub.CallTool(
        sidecar_pb2.CallToolRequest(
            session_id=session.session_id, tool_name="echo", arguments_json='{"x": [1, 2]}'
        )
    )
    assert response.status_code == 200
    assert response.version_id == session.version_id
    assert response.latency_ms > 0
    assert json.loads(response.result_json)  # the echo tool answers with JSON
    received = sim.received[-1]
    assert received.path == "/tools/echo"
    assert received.body == {"x": [1, 2]}

    order = await stub.CallTool(
        sidecar_pb2.CallToolRequest(
            session_id=session.session_id, tool_name="lookup_order", arguments_json='{"order_id": "A1"}'
        )
    )
    assert "A1" in order.result_json


async def test_feedback_and_get_version(stub: sidecar_pb2_grpc.SidecarStub, sidecar: Sidecar) -> None:
    session = await open_session(stub)
    await stub.Feedback(
        sidecar_pb2.FeedbackRequest(session_id=session.session_id, kind=sidecar_pb2.FEEDBACK_KIND_THUMBS_UP)
    )
    await stub.Feedback(
        sidecar_pb2.FeedbackRequest(
            session_id=session.session_id, kind=sidecar_pb2.FEEDBACK_KIND_SCORE, score=0.75
        )
    )
    info = await stub.GetVersion(sidecar_pb2.GetVersionRequest(session_id=session.session_id))
    assert info.version_id == session.version_id
    assert info.agent == "support-bot" and info.name == "v1"
    assert info.model == "sim-good" and info.provider == "openai"
    assert info.system_prompt == SYSTEM_PROMPT
    assert json.loads(info.parameters_json["temperature"]) == 0.2
    assert [t.name for t in info.tools] == ["lookup_order", "echo"]
    assert (
        info.tools[0].side_effects == "read" and info.tools[0].idempotent and info.tools[0].timeout_s == 2.0
    )
    assert json.loads(info.tools[0].parameters_json_schema)["required"] == ["order_id"]
    v2 = await stub.GetVersion(sidecar_pb2.GetVersionRequest(version_id=sidecar.config.version_ids()["v2"]))
    assert v2.name == "v2" and v2.model == "sim-bad"


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "outrider.v1.Sidecar"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in reflection.ServerReflectionInfo(iter([request])):
        names = {s.name for s in answer.list_services_response.service}
        assert {"outrider.v1.Sidecar", "grpc.health.v1.Health"} <= names
        break


async def test_metrics_endpoint(sidecar: Sidecar, stub: sidecar_pb2_grpc.SidecarStub) -> None:
    assert sidecar.metrics_port
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{sidecar.metrics_port}/metrics") as resp,
    ):
        text = await resp.text()
    assert resp.status == 200
    assert "outrider_sidecar_telemetry_queue_depth" in text
    assert "outrider_sidecar_telemetry_dropped_total" in text


# errors


async def test_session_errors(stub: sidecar_pb2_grpc.SidecarStub, sim: SimProvider) -> None:
    await expect_status(
        stub.OpenSession(sidecar_pb2.OpenSessionRequest(agent="other-bot")),
        grpc.StatusCode.NOT_FOUND,
        "agent",
        "other-bot",
    )
    await expect_status(
        stub.Chat(sidecar_pb2.ChatRequest(session_id="", messages=USER)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "session_id",
    )
    await expect_status(
        stub.Chat(sidecar_pb2.ChatRequest(session_id="garbage", messages=USER)),
        grpc.StatusCode.NOT_FOUND,
        "unknown session",
    )
    session = await open_session(stub)
    body, mac = session.session_id.split(".")
    forged = body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + mac
    await expect_status(
        stub.Chat(sidecar_pb2.ChatRequest(session_id=forged, messages=USER)),
        grpc.StatusCode.NOT_FOUND,
        "unknown session",
    )
    # a token signed by another sidecar's key
    other = Sidecar(sidecar_config(sim))
    token, _ = other.codec.issue(nonce="n", version_id=session.version_id, role=1, rollout_id="")
    await expect_status(
        stub.CallTool(sidecar_pb2.CallToolRequest(session_id=token, tool_name="echo")),
        grpc.StatusCode.NOT_FOUND,
        "unknown session",
    )


async def test_expired_session(sim: SimProvider) -> None:
    from sidecar import ManualClock

    clock = ManualClock()
    async with (
        Sidecar(sidecar_config(sim, session_ttl="10m", metrics_port=None), clock=clock) as sidecar,
        grpc.aio.insecure_channel(sidecar.address) as channel,
    ):
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        session = await open_session(stub)
        clock.advance(599)
        await stub.Chat(sidecar_pb2.ChatRequest(session_id=session.session_id, messages=USER))
        clock.advance(2)
        await expect_status(
            stub.Chat(sidecar_pb2.ChatRequest(session_id=session.session_id, messages=USER)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "session expired; open a new one",
        )
        await expect_status(
            stub.ChatStream(sidecar_pb2.ChatRequest(session_id=session.session_id, messages=USER)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "session expired",
        )
        # late feedback on a genuine session still counts
        await stub.Feedback(
            sidecar_pb2.FeedbackRequest(
                session_id=session.session_id, kind=sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS
            )
        )


async def test_request_validation(stub: sidecar_pb2_grpc.SidecarStub, sidecar: Sidecar) -> None:
    sid = (await open_session(stub)).session_id
    await expect_status(
        stub.Chat(sidecar_pb2.ChatRequest(session_id=sid)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages: must not be empty",
    )
    await expect_status(
        stub.ChatStream(sidecar_pb2.ChatRequest(session_id=sid)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages: must not be empty",
    )
    bad_role = [common_pb2.ChatMessage(role="robot", content="hi")]
    await expect_status(
        stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=bad_role)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].role",
    )
    await expect_status(
        stub.CallTool(sidecar_pb2.CallToolRequest(session_id=sid, tool_name="launch_missiles")),
        grpc.StatusCode.NOT_FOUND,
        "tool_name",
        "launch_missiles",
    )
    await expect_status(
        stub.CallTool(sidecar_pb2.CallToolRequest(session_id=sid, tool_name="")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tool_name",
    )
    await expect_status(
        stub.CallTool(sidecar_pb2.CallToolRequest(session_id=sid, tool_name="echo", arguments_json="{nope")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "arguments_json",
    )
    await expect_status(
        stub.CallTool(sidecar_pb2.CallToolRequest(session_id=sid, tool_name="echo", arguments_json="[1]")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "arguments_json: must be a JSON object",
    )
    await expect_status(
        stub.Feedback(sidecar_pb2.FeedbackRequest(session_id=sid)), grpc.StatusCode.INVALID_ARGUMENT, "kind"
    )
    await expect_status(
        stub.Feedback(
            sidecar_pb2.FeedbackRequest(session_id=sid, kind=sidecar_pb2.FEEDBACK_KIND_SCORE, score=1.5)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "score",
    )
    await expect_status(
        stub.GetVersion(sidecar_pb2.GetVersionRequest()), grpc.StatusCode.INVALID_ARGUMENT, "version_id"
    )
    await expect_status(
        stub.GetVersion(sidecar_pb2.GetVersionRequest(version_id="feedfacecafe")),
        grpc.StatusCode.NOT_FOUND,
        "version_id",
        "feedfacecafe",
    )


async def test_oversized_requests(stub: sidecar_pb2_grpc.SidecarStub, sidecar: Sidecar) -> None:
    sid = (await open_session(stub)).session_id
    limit = sidecar.config.max_request_bytes
    just_over = [common_pb2.ChatMessage(role="user", content="x" * (limit + 10))]
    await expect_status(
        stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=just_over)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages",
        "max_request_bytes",
    )
    way_over = [common_pb2.ChatMessage(role="user", content="x" * (limit * 2))]
    await expect_status(
        stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=way_over)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    big_args = json.dumps({"blob": "y" * (limit + 10)})
    await expect_status(
        stub.CallTool(sidecar_pb2.CallToolRequest(session_id=sid, tool_name="echo", arguments_json=big_args)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "arguments_json",
    )


async def test_upstream_failures_map_to_statuses(sim: SimProvider) -> None:
    # without retries or a breaker in the way: each failure maps straight to its status
    data = sidecar_config(sim).model_dump(mode="json")
    for version in data["versions"].values():
        version["resilience"] = {"retry": {"max_attempts": 1}, "breaker": {"consecutive_failures": 1000}}
    config = parse_config(data, source="t.yaml").load_secrets({"TEST_SIM_KEY": API_KEY})
    async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as channel:
        await _upstream_failures(sidecar_pb2_grpc.SidecarStub(channel), sim)


async def _upstream_failures(stub: sidecar_pb2_grpc.SidecarStub, sim: SimProvider) -> None:
    sid = (await open_session(stub)).session_id
    request = sidecar_pb2.ChatRequest(session_id=sid, messages=USER)
    sim.set_model("sim-good", ModelBehavior(error_rate=1.0, error_status=503))
    details = await expect_status(stub.Chat(request), grpc.StatusCode.UNAVAILABLE, "503")
    assert "openai" in details
    await expect_status(stub.ChatStream(request), grpc.StatusCode.UNAVAILABLE, "503")
    sim.set_model("sim-good", ModelBehavior(error_rate=1.0, error_status=400))
    await expect_status(stub.Chat(request), grpc.StatusCode.INTERNAL, "400")
    sim.set_model("sim-good", ModelBehavior(latency_ms=2000))
    await expect_status(stub.Chat(request, timeout=0.3), grpc.StatusCode.DEADLINE_EXCEEDED)
    sim.set_model("sim-good", ModelBehavior())
    sim.set_tool("echo", ToolBehavior(error_rate=1.0, error_status=404))
    await expect_status(
        stub.CallTool(sidecar_pb2.CallToolRequest(session_id=sid, tool_name="echo")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "echo",
        "404",
    )
    sim.set_tool("echo", ToolBehavior(latency_ms=3000))
    await expect_status(
        stub.CallTool(sidecar_pb2.CallToolRequest(session_id=sid, tool_name="echo")),
        grpc.StatusCode.UNAVAILABLE,
        "echo",
    )


async def test_wrong_key_and_unreachable_provider(sim: SimProvider) -> None:
    config = parse_config(sidecar_config(sim).model_dump(mode="json"), source="t.yaml").load_secrets(
        {"TEST_SIM_KEY": "sk-wrong"}
    )
    async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        sid = (await open_session(stub)).session_id
        details = await expect_status(
            stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER)), grpc.StatusCode.INTERNAL, "401"
        )
        assert "sk-wrong" not in details
    data = sidecar_config(sim).model_dump(mode="json")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    for v in data["versions"].values():
        v["provider"]["base_url"] = dead
    config = parse_config(data, source="t.yaml").load_secrets({"TEST_SIM_KEY": API_KEY})
    async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        sid = (await open_session(stub)).session_id
        await expect_status(
            stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER)),
            grpc.StatusCode.UNAVAILABLE,
            "connect",
        )


# lifecycle


async def test_graceful_stop_finishes_in_flight_calls(sim: SimProvider) -> None:
    sim.set_model("sim-good", ModelBehavior(latency_ms=500))
    sidecar = Sidecar(sidecar_config(sim, metrics_port=None))
    await sidecar.start()
    try:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="outrider.v1.Sidecar"))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            sid = (await open_session(stub)).session_id
            in_flight = asyncio.ensure_future(
                stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
            )
            await asyncio.sleep(0.1)  # the call is at the provider now
            stopping = asyncio.ensure_future(sidecar.stop(grace=5))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            response = await in_flight
            assert response.finish_reason == "stop"
            await asyncio.wait_for(stopping, 5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.OpenSession(sidecar_pb2.OpenSessionRequest(), timeout=1)
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        await sidecar.stop()
    await sidecar.stop()  # idempotent


async def test_unix_socket_listen(sim: SimProvider, tmp_path: Path) -> None:
    path = tmp_path / "sidecar.sock"
    config = sidecar_config(sim, listen=f"unix://{path}", metrics_port=None)
    async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as channel:
        assert sidecar.address == f"unix://{path}"
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        sid = (await open_session(stub)).session_id
        response = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
        assert response.message.content


async def test_run_stops_on_sigterm(sim: SimProvider, tmp_path: Path) -> None:
    import os
    import signal

    from sidecar import run

    path = tmp_path / "run.sock"
    config = sidecar_config(sim, listen=f"unix://{path}", metrics_port=None)
    task = asyncio.create_task(run(config))
    try:
        for _ in range(200):
            if path.exists():
                break
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        task.cancel()


async def _broken_provider(mode: str) -> aiohttp.web.AppRunner:
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(text="<html>not json</html>", content_type="text/html")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        first = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "partial "}}]}
        await resp.write(f"data: {json.dumps(first)}\n\n".encode())
        if mode == "malformed":
            await resp.write(b"data: {oops\n\n")
        await resp.write_eof()  # cut short: no finish_reason, no [DONE]
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@pytest.mark.parametrize("mode", ["truncated", "malformed"])
async def test_broken_provider_responses_are_errors(sim: SimProvider, mode: str) -> None:
    runner = await _broken_provider(mode)
    try:
        port = runner.addresses[0][1]
        data = sidecar_config(sim).model_dump(mode="json")
        for v in data["versions"].values():
            v["provider"]["base_url"] = f"http://127.0.0.1:{port}/v1"
        config = parse_config(data, source="t.yaml").load_secrets({"TEST_SIM_KEY": API_KEY})
        async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            sid = (await open_session(stub)).session_id
            request = sidecar_pb2.ChatRequest(session_id=sid, messages=USER)
            await expect_status(stub.Chat(request), grpc.StatusCode.INTERNAL, "malformed")
            deltas: list[str] = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for c in stub.ChatStream(request):
                    deltas.append(c.content_delta)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "stream" in (info.value.details() or "")
            assert deltas == ["partial "]  # what arrived was passed on, then the error, never a clean end
            telemetry = sidecar.telemetry
            spill = telemetry._spill  # what waits there, by topic
            assert spill is not None
            topics: list[str] = []
            for _ in range(200):  # Kafka is unreachable: events and spans move on to the spill
                topics = [r.topic for r in (await asyncio.to_thread(spill.peek, 100)).records]
                if topics.count(outrider.EVENTS_TOPIC) >= 2 and outrider.SPANS_TOPIC in topics:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)  # and no more than one event per call
            topics = [r.topic for r in (await asyncio.to_thread(spill.peek, 100)).records]
            assert topics.count(outrider.EVENTS_TOPIC) == 2, topics  # one event per failed call
            assert outrider.SPANS_TOPIC in topics  # and their spans
    finally:
        await runner.cleanup()


async def test_without_a_session_key_one_clear_warning(
    sim: SimProvider, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="sidecar._app"):
        Sidecar(sidecar_config(sim))
    warned = [r for r in caplog.records if "no session key" in r.getMessage()]
    assert len(warned) == 1 and "will not survive a restart" in warned[0].getMessage()
    caplog.clear()
    key_file = tmp_path / "session-key"
    key_file.write_text("k" * 64 + "\n")
    config = sidecar_config(sim).load_secrets(
        {"TEST_SIM_KEY": API_KEY, "OUTRIDER_SESSION_KEY_FILE": str(key_file)}
    )
    with caplog.at_level(logging.WARNING, logger="sidecar._app"):
        sidecar = Sidecar(config)
    assert not [r for r in caplog.records if "no session key" in r.getMessage()]
    assert sidecar.config.session_key() == b"k" * 64
