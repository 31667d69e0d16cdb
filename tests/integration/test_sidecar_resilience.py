"""Breakers, retries, fallback tiers and deadlines: a real Sidecar, real gRPC client, the
simulated provider with scripted faults on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from devstack.broker import free_port
from devstack.simprovider import Fault, ModelBehavior, SimProvider, refused_base_url
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from sidecar._config import parse_config
from tests.integration.test_sidecar_api import fresh_spill_dir
from tests.support import TEST_SIGNER

USER = [common_pb2.ChatMessage(role="user", content="Where is my order?")]
FAST_RETRY = {"max_attempts": 3, "base": "10ms", "cap": "50ms", "retry_after_cap": "2s"}


def config(
    sim: SimProvider,
    *,
    base_url: str | None = None,
    fallback: list[dict[str, Any]] | None = None,
    resilience: dict[str, Any] | None = None,
    tools_idempotent: bool = True,
    **top: Any,
) -> Any:
    version: dict[str, Any] = {
        "provider": {"name": "openai", "base_url": base_url or sim.base_url},
        "model": "primary",
        "parameters": {"max_tokens": 64},
        "request_timeout": "2s",
        "resilience": resilience or {"retry": FAST_RETRY},
        "fallback": fallback if fallback is not None else [],
        "tools": [
            {
                "name": "lookup_order",
                "endpoint": sim.tool_url("lookup_order"),
                "idempotent": tools_idempotent,
            },
        ],
    }
    data = {
        "agent": "bot",
        "stable": "v1",
        "listen": "127.0.0.1:0",
        "metrics_port": None,
        "kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}"},
        "telemetry": {"spill_dir": fresh_spill_dir()},
        "versions": {"v1": version},
        "control": {"public_keys": [TEST_SIGNER.public_text()], "ready_timeout": "0s"},
        **top,
    }
    return parse_config(data, source="t.yaml").load_secrets({})


LIGHT = {"provider": {"name": "openai", "base_url": "SIM"}, "model": "light"}
STATIC = {"static_response": "Sorry, try again later."}


def tiers(sim: SimProvider, *names: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in names:
        if name == "light":
            out.append({"provider": {"name": "openai", "base_url": sim.base_url}, "model": "light"})
        else:
            out.append(STATIC)
    return out


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    models = {"primary": ModelBehavior(), "light": ModelBehavior()}
    async with SimProvider(models, seed=3) as provider:
        yield provider


@asynccontextmanager
async def running(cfg: Any) -> AsyncIterator[tuple[Sidecar, sidecar_pb2_grpc.SidecarStub, str]]:
    async with Sidecar(cfg, sidecar_id="sc-1") as sidecar, grpc.aio.insecure_channel(sidecar.address) as ch:
        stub = sidecar_pb2_grpc.SidecarStub(ch)
        sid = (await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="u1"))).session_id
        yield sidecar, stub, sid


async def stream_all(stub: sidecar_pb2_grpc.SidecarStub, sid: str) -> tuple[str, sidecar_pb2.ChatResponse]:
    text, final = "", None
    async for chunk in stub.ChatStream(sidecar_pb2.ChatRequest(session_id=sid, messages=USER)):
        text += chunk.content_delta
        if chunk.HasField("final"):
            final = chunk.final
    assert final is not None
    return text, final


async def test_429_retry_after_is_honoured(sim: SimProvider) -> None:
    sim.script("primary", Fault.rate_limit(retry_after_s=0.3))
    async with running(config(sim)) as (_, stub, sid):
        start = time.monotonic()
        reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
        elapsed = time.monotonic() - start
    assert elapsed >= 0.3
    assert reply.attempts == 2 and reply.served_by == "primary" and not reply.degraded
    assert sim.requests("primary") == 2


async def test_5xx_burst_retried_then_success(sim: SimProvider) -> None:
    sim.script("primary", Fault.http_error(503, times=2))
    async with running(config(sim)) as (_, stub, sid):
        reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
    assert reply.attempts == 3 and reply.fallback_tier == 0
    assert "primary" in reply.message.content


async def test_refused_connection_retried_then_fallback(sim: SimProvider) -> None:
    cfg = config(sim, base_url=refused_base_url(), fallback=tiers(sim, "light"))
    async with running(cfg) as (_, stub, sid):
        reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
    assert reply.served_by == "fallback-1" and reply.degraded and reply.fallback_tier == 1
    assert reply.attempts == 4  # three on the refused primary, one on the light tier
    assert reply.model == "light"


async def test_timeout_falls_back_and_static_tier_answers(sim: SimProvider) -> None:
    resilience = {"retry": {**FAST_RETRY, "max_attempts": 1}}
    sim.script("primary", Fault.hang(5.0))
    cfg = config(sim, fallback=tiers(sim, "static"), resilience=resilience)
    data = cfg.model_dump(mode="json")
    data["versions"]["v1"]["request_timeout"] = "200ms"
    cfg = parse_config(data, source="t.yaml").load_secrets({})
    async with running(cfg) as (_, stub, sid):
        reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
    assert reply.message.content == "Sorry, try again later."
    assert reply.served_by == "fallback-1" and reply.degraded


async def test_slow_first_byte_within_deadline_is_fine(sim: SimProvider) -> None:
    sim.script("primary", Fault.slow_first_byte(0.3))
    async with running(config(sim)) as (_, stub, sid):
        text, final = await stream_all(stub, sid)
    assert final.served_by == "primary" and final.attempts == 1 and text


async def test_stream_cut_before_first_delta_falls_back(sim: SimProvider) -> None:
    sim.script("primary", Fault.cut_stream(1))  # the first chunk holds only the role
    async with running(config(sim, fallback=tiers(sim, "light"))) as (_, stub, sid):
        text, final = await stream_all(stub, sid)
    assert final.served_by == "fallback-1" and "light" in text


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault.cut_stream(4), grpc.StatusCode.INTERNAL),
        (Fault.stall(4, 3.0), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Fault.malformed_sse(4), grpc.StatusCode.INTERNAL),
    ],
)
async def test_stream_failure_after_first_delta_is_an_explicit_error(
    sim: SimProvider, fault: Fault, code: grpc.StatusCode
) -> None:
    sim.script("primary", fault)
    resilience = {"retry": FAST_RETRY, "stream_idle_timeout": "300ms"}
    async with running(config(sim, fallback=tiers(sim, "light"), resilience=resilience)) as (_, stub, sid):
        deltas = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for chunk in stub.ChatStream(sidecar_pb2.ChatRequest(session_id=sid, messages=USER)):
                deltas.append(chunk.content_delta)
    assert deltas, "some deltas reached the agent before the failure"
    assert info.value.code() == code
    assert "after the first delta" in (info.value.details() or "")
    assert sim.requests("light") == 0


async def test_malformed_json_falls_back(sim: SimProvider) -> None:
    sim.script("primary", Fault.malformed_json())
    async with running(config(sim, fallback=tiers(sim, "light"))) as (_, stub, sid):
        reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
    assert reply.served_by == "fallback-1" and sim.requests("primary") == 1


async def test_breaker_opens_then_skips_upstream_then_half_open_probe_closes(sim: SimProvider) -> None:
    resilience = {
        "retry": {**FAST_RETRY, "max_attempts": 1},
        "breaker": {"consecutive_failures": 3, "cooldown": "300ms", "half_open_probes": 1},
    }
    sim.set_model("primary", ModelBehavior(error_rate=1.0, error_status=503))
    cfg = config(sim, fallback=tiers(sim, "static"), resilience=resilience)
    async with running(cfg) as (sidecar, stub, sid):
        request = sidecar_pb2.ChatRequest(session_id=sid, messages=USER)
        for _ in range(3):
            await stub.Chat(request)
        assert sim.requests("primary") == 3
        assert sidecar.upstreams.state("provider:openai/primary").value == "open"
        for _ in range(5):
            reply = await stub.Chat(request)
            assert reply.served_by == "fallback-1"
        assert sim.requests("primary") == 3  # open: answered without touching the upstream
        gauge = sidecar.metrics.breaker_state.labels("provider:openai/primary")._value.get()
        assert gauge == 2
        sim.set_model("primary", ModelBehavior())
        await asyncio.sleep(0.35)
        reply = await stub.Chat(request)
        assert reply.served_by == "primary"
        assert sidecar.upstreams.state("provider:openai/primary").value == "closed"


async def test_deadline_respected_against_a_hanging_provider(sim: SimProvider) -> None:
    sim.script("primary", Fault.hang(10.0, times=None))
    async with running(config(sim)) as (_, stub, sid):
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER), timeout=0.3)
        elapsed = time.monotonic() - start
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 0.6
    assert sim.requests("primary") == 1


async def test_retry_budget_caps_amplification(sim: SimProvider) -> None:
    resilience = {
        "retry": {"max_attempts": 5, "base": "20ms", "cap": "20ms"},
        "retry_budget": {"ratio": 0.1, "min_retries": 1},
        "breaker": {"consecutive_failures": 1000, "min_requests": 1000},
    }
    sim.set_model("primary", ModelBehavior(error_rate=1.0, error_status=503, latency_ms=20))
    async with running(config(sim, resilience=resilience)) as (_, stub, sid):
        request = sidecar_pb2.ChatRequest(session_id=sid, messages=USER)
        calls = 20
        results = await asyncio.gather(*(stub.Chat(request) for _ in range(calls)), return_exceptions=True)
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
    # without a budget: 20 x 5 = 100 attempts
    assert sim.requests("primary") < calls * 2


async def test_tool_retried_only_when_idempotent(sim: SimProvider) -> None:
    sim.script_tool("lookup_order", Fault.http_error(503))
    async with running(config(sim)) as (_, stub, sid):
        reply = await stub.CallTool(
            sidecar_pb2.CallToolRequest(
                session_id=sid, tool_name="lookup_order", arguments_json='{"order_id": "1"}'
            )
        )
    assert reply.attempts == 2
    sim.script_tool("lookup_order", Fault.http_error(503))
    async with running(config(sim, tools_idempotent=False)) as (_, stub, sid):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CallTool(
                sidecar_pb2.CallToolRequest(
                    session_id=sid, tool_name="lookup_order", arguments_json='{"order_id": "1"}'
                )
            )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
