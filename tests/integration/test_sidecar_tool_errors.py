"""CallTool's argument checks and failure statuses, and requests_total, with a real Sidecar on
port 0, the simulated provider, and a real HTTP tool server on loopback that refuses, fails or
stalls on demand: a schema violation names the field's path and sends nothing; a tool's 4xx is
FAILED_PRECONDITION without its body; a 5xx or a timeout is UNAVAILABLE; bytes that do not
decode are INVALID_ARGUMENT; and every RPC is counted by method and status code."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiohttp import web
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from outrider import ERROR_DOMAIN, TOOL_REJECTED
from outrider.v1 import sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from sidecar._config import parse_config
from tests.integration.test_sidecar_api import API_KEY, USER, expect_status, sidecar_config
from tests.integration.test_sidecar_api import sim as sim  # the fixture

SECRET = "card 4111-1111-1111-1111 of Jane Doe"  # what a tool's error body may carry
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "items": {"type": "array", "items": {"type": "object", "properties": {"qty": {"type": "integer"}}}},
    },
    "required": ["order_id"],
    "additionalProperties": False,
}


class ToolServer:
    """Tools on loopback: `refund` answers 422 with a body carrying data, `down` 503, `slow`
    never in time, `ok` echoes; every received body is kept."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base = ""

    async def _handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.received.append((name, await request.json()))
        if name == "refund":
            return web.json_response({"error": SECRET}, status=422)
        if name == "down":
            return web.json_response({"error": SECRET}, status=503)
        if name == "slow":
            await self.release.wait()
        return web.json_response({"ok": True})

    async def __aenter__(self) -> ToolServer:
        app = web.Application()
        app.router.add_post("/tools/{name}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = f"http://127.0.0.1:{port}/tools"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def tools() -> AsyncIterator[ToolServer]:
    async with ToolServer() as server:
        yield server


@pytest.fixture
async def stub(sim: Any, tools: ToolServer) -> AsyncIterator[tuple[sidecar_pb2_grpc.SidecarStub, Sidecar]]:
    data = sidecar_config(sim).model_dump(mode="json")
    for version in data["versions"].values():
        # one attempt, no breaker in the way: each failure maps straight to its status
        version["resilience"] = {"retry": {"max_attempts": 1}, "breaker": {"consecutive_failures": 1000}}
        version["tools"] = [
            {"name": name, "endpoint": f"{tools.base}/{name}", "timeout": "300ms", "parameters": ORDER_SCHEMA}
            for name in ("ok", "refund", "down", "slow")
        ]
    config = parse_config(data, source="t.yaml").load_secrets({"TEST_SIM_KEY": API_KEY})
    async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as channel:
        yield sidecar_pb2_grpc.SidecarStub(channel), sidecar


def _call(sid: str, tool: str, arguments: Any) -> sidecar_pb2.CallToolRequest:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return sidecar_pb2.CallToolRequest(session_id=sid, tool_name=tool, arguments_json=text)


async def test_schema_violations_name_the_path_and_send_nothing(
    stub: tuple[sidecar_pb2_grpc.SidecarStub, Sidecar], tools: ToolServer
) -> None:
    api, _ = stub
    sid = (await api.OpenSession(sidecar_pb2.OpenSessionRequest())).session_id
    bad = grpc.StatusCode.INVALID_ARGUMENT
    details = await expect_status(api.CallTool(_call(sid, "ok", {"order_id": 42})), bad)
    assert details == "arguments.order_id: 42 is not of type 'string'"
    await expect_status(
        api.CallTool(_call(sid, "ok", {"order_id": "A1", "items": [{"qty": 1}, {"qty": "two"}]})),
        bad,
        "arguments.items[1].qty: 'two' is not of type 'integer'",
    )
    await expect_status(
        api.CallTool(_call(sid, "ok", {})), bad, "arguments: 'order_id' is a required property"
    )
    await expect_status(api.CallTool(_call(sid, "ok", {"order_id": "A1", "x": 1})), bad, "arguments:", "'x'")
    await expect_status(api.CallTool(_call(sid, "ok", "{nope")), bad, "arguments_json: not valid JSON")
    await expect_status(api.CallTool(_call(sid, "ok", "[" * 5000 + "]" * 5000)), bad, "arguments_json")
    assert tools.received == []  # nothing was sent
    ok = await api.CallTool(_call(sid, "ok", {"order_id": "A1", "items": [{"qty": 2}]}))
    assert json.loads(ok.result_json) == {"ok": True}
    assert tools.received == [("ok", {"order_id": "A1", "items": [{"qty": 2}]})]


async def test_tool_failures_map_to_statuses(
    stub: tuple[sidecar_pb2_grpc.SidecarStub, Sidecar], tools: ToolServer
) -> None:
    api, _ = stub
    sid = (await api.OpenSession(sidecar_pb2.OpenSessionRequest())).session_id
    args = {"order_id": "A1"}
    details = await expect_status(
        api.CallTool(_call(sid, "refund", args)), grpc.StatusCode.FAILED_PRECONDITION, "refund", "422"
    )
    assert details == "tool refund returned HTTP 422 Unprocessable Entity"  # status and reason, no body
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.CallTool(_call(sid, "refund", args))
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == (TOOL_REJECTED, ERROR_DOMAIN)
    assert dict(info.metadata) == {"tool": "refund", "http_status": "422"}
    details = await expect_status(api.CallTool(_call(sid, "down", args)), grpc.StatusCode.UNAVAILABLE, "503")
    assert SECRET not in details
    await expect_status(api.CallTool(_call(sid, "slow", args)), grpc.StatusCode.UNAVAILABLE, "slow")


async def test_undecodable_requests_are_invalid_argument(
    stub: tuple[sidecar_pb2_grpc.SidecarStub, Sidecar],
) -> None:
    api, sidecar = stub
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        for method in ("Chat", "ChatStream", "CallTool", "OpenSession"):
            for garbage in (b"\xff\xff\xff\xff\x0f", b"\x7b" * 200 + b"\x7c" * 200):  # corrupt; nested groups
                if method == "ChatStream":
                    call: Any = channel.unary_stream(f"/outrider.v1.Sidecar/{method}")(garbage)
                else:
                    call = channel.unary_unary(f"/outrider.v1.Sidecar/{method}")(garbage)
                await expect_status(
                    call, grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode the {method} request"
                )
    # the server still serves
    assert (await api.OpenSession(sidecar_pb2.OpenSessionRequest())).session_id


async def test_requests_total_counts_each_rpc_by_method_and_code(
    stub: tuple[sidecar_pb2_grpc.SidecarStub, Sidecar],
) -> None:
    api, sidecar = stub

    def count(method: str, code: str) -> float:
        value = sidecar.metrics.registry.get_sample_value(
            "outrider_sidecar_requests_total", {"method": f"outrider.v1.Sidecar/{method}", "code": code}
        )
        return value or 0.0

    sid = (await api.OpenSession(sidecar_pb2.OpenSessionRequest())).session_id
    await api.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
    await api.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
    chunks = [c async for c in api.ChatStream(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))]
    assert chunks
    await expect_status(
        api.Chat(sidecar_pb2.ChatRequest(session_id="nope", messages=USER)), grpc.StatusCode.NOT_FOUND
    )
    await expect_status(api.CallTool(_call(sid, "ok", {})), grpc.StatusCode.INVALID_ARGUMENT)
    await expect_status(
        api.CallTool(_call(sid, "refund", {"order_id": "A1"})), grpc.StatusCode.FAILED_PRECONDITION
    )
    expected = {
        ("OpenSession", "OK"): 1,
        ("Chat", "OK"): 2,
        ("ChatStream", "OK"): 1,
        ("Chat", "NOT_FOUND"): 1,
        ("CallTool", "INVALID_ARGUMENT"): 1,
        ("CallTool", "FAILED_PRECONDITION"): 1,
        ("CallTool", "OK"): 0,
    }
    # grpc sends an aborted call's status before the abort returns to the interceptor, so the
    # client may see it a moment before it is counted
    for _ in range(500):
        counts = {key: count(*key) for key in expected}
        if counts == expected:
            break
        await asyncio.sleep(0.01)
    assert counts == expected
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(service=""))
    checks = sidecar.metrics.registry.get_sample_value(
        "outrider_sidecar_requests_total", {"method": "grpc.health.v1.Health/Check", "code": "OK"}
    )
    assert checks == 1  # answered OK: counted before the response is sent
    text = (await _scrape(sidecar)).decode()
    assert 'outrider_sidecar_requests_total{code="OK",method="outrider.v1.Sidecar/Chat"} 2.0' in text


async def _scrape(sidecar: Sidecar) -> bytes:
    return sidecar.metrics.exposition()
