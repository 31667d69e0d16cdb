"""Scripted faults of the simulated provider, observed by real clients on loopback (raw aiohttp
and the official `openai` client) the way real provider failures look, plus property tests of
the pure fault queue."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.http_exceptions import ContentLengthError, TransferEncodingError
from hypothesis import given
from hypothesis import strategies as st
from openai import AsyncOpenAI

from devstack._sim_faults import DEFAULT_BAD_SSE_LINE, FaultQueue
from devstack.simprovider import (
    FAULT_KINDS,
    Fault,
    FaultError,
    ModelBehavior,
    SimProvider,
    ToolBehavior,
    refused_base_url,
    refused_tool_url,
)

USER: Any = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]
CHAT: Any = {"model": "sim-a", "messages": USER}
STREAM: Any = {**CHAT, "stream": True}


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    models = {"sim-a": ModelBehavior(), "sim-b": ModelBehavior()}
    tools = {"echo": ToolBehavior(), "lookup_order": ToolBehavior()}
    async with SimProvider(models, tools=tools, seed=3) as provider:
        yield provider


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def client(sim: SimProvider) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        yield c


def chat_url(sim: SimProvider) -> str:
    return f"{sim.base_url}/chat/completions"


def admin_url(sim: SimProvider, path: str) -> str:
    return f"{sim.base_url.removesuffix('/v1')}{path}"


async def chat_status(http: aiohttp.ClientSession, sim: SimProvider, body: Any = CHAT) -> int:
    async with http.post(chat_url(sim), json=body) as resp:
        await resp.read()
        return resp.status


async def read_sse(resp: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads (and any other non-blank lines) of an SSE body, in order."""
    return [line.decode().rstrip("\n") async for line in resp.content if line.strip()]


# --- error statuses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after_s", "retry_after_ms", "expected"),
    [
        (2, None, {"Retry-After": "2"}),
        (None, 1500, {"retry-after-ms": "1500"}),
        (0.5, 250, {"Retry-After": "0.5", "retry-after-ms": "250"}),
        (None, None, {}),
    ],
)
async def test_429_carries_the_scripted_retry_headers(
    sim: SimProvider,
    http: aiohttp.ClientSession,
    retry_after_s: float | None,
    retry_after_ms: float | None,
    expected: dict[str, str],
) -> None:
    sim.script("sim-a", Fault.rate_limit(retry_after_s=retry_after_s, retry_after_ms=retry_after_ms))
    async with http.post(chat_url(sim), json=CHAT) as resp:
        assert resp.status == 429
        body = await resp.json()
        got = {k: resp.headers[k] for k in ("Retry-After", "retry-after-ms") if k in resp.headers}
    assert got == expected
    assert body["error"]["type"] == "rate_limit_exceeded"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert await chat_status(http, sim) == 200  # times=1: expired


async def test_openai_client_sees_rate_limit_error_with_headers(
    sim: SimProvider, client: AsyncOpenAI
) -> None:
    sim.script("sim-a", Fault.rate_limit(retry_after_s=1, retry_after_ms=1000))
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="sim-a", messages=USER)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.response.headers["retry-after-ms"] == "1000"
    assert "retry after 1s" in info.value.message
    ok = await client.chat.completions.create(model="sim-a", messages=USER)
    assert ok.choices[0].finish_reason == "stop"


async def test_5xx_burst_then_normal(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    sim.script("sim-a", Fault.http_error(503, times=3))
    statuses = [await chat_status(http, sim) for _ in range(5)]
    assert statuses == [503, 503, 503, 200, 200]
    assert sim.requests("sim-a") == 5
    assert sim.errors("sim-a") == 3
    assert sim.fault_counts("sim-a") == {"status": 3}
    assert sim.pending_faults("sim-a") == []


async def test_openai_client_sees_server_errors(sim: SimProvider, client: AsyncOpenAI) -> None:
    sim.script("sim-a", Fault.http_error(502), Fault.http_error(504))
    for status in (502, 504):
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="sim-a", messages=USER)
        assert info.value.status_code == status


async def test_faults_apply_in_order_each_for_its_times(
    sim: SimProvider, http: aiohttp.ClientSession
) -> None:
    sim.script("sim-a", Fault.http_error(500, times=2), Fault.rate_limit(times=1))
    sim.script("sim-a", Fault.http_error(502))  # a second call queues after the first
    assert [f.times for f in sim.pending_faults("sim-a")] == [2, 1, 1]
    assert await chat_status(http, sim) == 500
    assert sim.pending_faults("sim-a")[0] == Fault.http_error(500, times=1)  # uses left
    statuses = [await chat_status(http, sim) for _ in range(4)]
    assert statuses == [500, 429, 502, 200]


async def test_faults_are_per_model(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    sim.script("sim-b", Fault.http_error(503, times=2))
    assert await chat_status(http, sim) == 200  # sim-a untouched
    assert await chat_status(http, sim, {**CHAT, "model": "sim-b"}) == 503
    assert sim.pending_faults("sim-b") == [Fault.http_error(503, times=1)]
    assert sim.fault_counts("sim-a") == {}


async def test_times_none_lasts_until_cleared(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    sim.script("sim-a", Fault.http_error(500, times=None))
    assert [await chat_status(http, sim) for _ in range(4)] == [500] * 4
    assert sim.pending_faults("sim-a") == [Fault.http_error(500, times=None)]
    sim.clear_faults("sim-a")
    assert await chat_status(http, sim) == 200
    sim.script("sim-a", Fault.http_error(500, times=None))
    sim.clear_faults()  # all models and tools
    assert await chat_status(http, sim) == 200


async def test_scripted_fault_replaces_the_random_error_draw(http: aiohttp.ClientSession) -> None:
    async with SimProvider({"m": ModelBehavior(error_rate=1.0, error_status=500)}) as sim:
        sim.script("m", Fault.rate_limit(retry_after_s=3))
        async with http.post(chat_url(sim), json={**CHAT, "model": "m"}) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "3"
        assert await chat_status(http, sim, {**CHAT, "model": "m"}) == 500  # back to the behavior
        assert sim.errors("m") == 2


# --- hangs and slowness -------------------------------------------------------------------------


async def test_hang_times_out_the_client_and_the_server_lets_go(
    sim: SimProvider, http: aiohttp.ClientSession
) -> None:
    sim.script("sim-a", Fault.hang(0.8))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with http.post(chat_url(sim), json=CHAT, timeout=aiohttp.ClientTimeout(total=0.15)):
            pass
    assert 0.15 <= time.monotonic() - started < 0.6
    assert await chat_status(http, sim) == 200  # expired; the next answers at once
    assert sim.fault_counts("sim-a") == {"hang": 1}
    assert sim.errors("sim-a") == 0  # a hang delays a correct answer; only the client gives up


async def test_hang_then_answers_a_patient_client(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    sim.script("sim-a", Fault.hang(0.2))
    started = time.monotonic()
    async with http.post(chat_url(sim), json=STREAM) as resp:
        headers_at = time.monotonic() - started
        lines = await read_sse(resp)
    assert headers_at >= 0.2  # a hang holds even the headers back
    assert lines[-1] == "data: [DONE]"


async def test_openai_client_timeout_on_hang(sim: SimProvider) -> None:
    sim.script("sim-a", Fault.hang(0.8))
    async with AsyncOpenAI(base_url=sim.base_url, api_key="k", max_retries=0, timeout=0.15) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="sim-a", messages=USER)


async def test_slow_first_byte_unary(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    sim.script("sim-a", Fault.slow_first_byte(0.3))
    started = time.monotonic()
    async with http.post(chat_url(sim), json=CHAT) as resp:
        elapsed = time.monotonic() - started
        body = await resp.json()
    assert resp.status == 200
    assert 0.3 <= elapsed < 1.5
    assert body["object"] == "chat.completion"
    assert sim.errors("sim-a") == 0
    started = time.monotonic()
    assert await chat_status(http, sim) == 200
    assert time.monotonic() - started < 0.2  # expired


async def test_slow_first_byte_stream_sends_headers_then_waits(
    sim: SimProvider, http: aiohttp.ClientSession
) -> None:
    sim.script("sim-a", Fault.slow_first_byte(0.3))
    started = time.monotonic()
    async with http.post(chat_url(sim), json=STREAM) as resp:
        headers_at = time.monotonic() - started
        first = await resp.content.readline()
        first_at = time.monotonic() - started
        rest = await read_sse(resp)
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert headers_at < 0.2
    assert 0.3 <= first_at < 1.5
    assert first.startswith(b"data: {")
    assert rest[-1] == "data: [DONE]"


# --- streams cut, stalled, malformed -----------------------------------------------------------


@pytest.mark.parametrize("after", [0, 2, 100])
async def test_cut_stream_raises_payload_error_without_done(
    sim: SimProvider, http: aiohttp.ClientSession, after: int
) -> None:
    async with http.post(chat_url(sim), json=STREAM) as resp:
        whole = await read_sse(resp)  # unfaulted, to know how many chunks there are
    n_chunks = len(whole) - 1
    sim.script("sim-a", Fault.cut_stream(after))
    got: list[bytes] = []
    async with http.post(chat_url(sim), json=STREAM) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError) as info:
            async for line in resp.content:
                got.append(line)
    # The chunked body ends without its terminating chunk: aiohttp says so precisely.
    assert isinstance(info.value.__cause__, TransferEncodingError)
    data = [line.decode().rstrip("\n") for line in got if line.strip()]
    assert len(data) == min(after, n_chunks)
    choices = [json.loads(line.removeprefix("data: "))["choices"] for line in data]
    assert choices == [json.loads(line.removeprefix("data: "))["choices"] for line in whole[: len(data)]]
    assert "data: [DONE]" not in data
    assert sim.errors("sim-a") == 1
    assert sim.fault_counts("sim-a") == {"cut_stream": 1}


async def test_openai_client_raises_on_cut_stream(sim: SimProvider, client: AsyncOpenAI) -> None:
    sim.script("sim-a", Fault.cut_stream(2))
    received = []
    stream = await client.chat.completions.create(model="sim-a", messages=USER, stream=True)
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 2
    assert received[1].choices[0].delta.content


async def test_stream_faults_wait_for_a_stream_request(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    sim.script("sim-a", Fault.cut_stream(1), Fault.http_error(500))
    assert await chat_status(http, sim) == 200  # unary passes; the stream fault stays at the head
    assert [f.kind for f in sim.pending_faults("sim-a")] == ["cut_stream", "status"]
    async with http.post(chat_url(sim), json=STREAM) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert await chat_status(http, sim) == 500
    sim.script("sim-a", Fault.cut_body())
    async with http.post(chat_url(sim), json=STREAM) as resp:  # cut_body waits for a unary request
        assert (await read_sse(resp))[-1] == "data: [DONE]"
    assert [f.kind for f in sim.pending_faults("sim-a")] == ["cut_body"]


async def test_cut_body_unary(sim: SimProvider, http: aiohttp.ClientSession, client: AsyncOpenAI) -> None:
    sim.script("sim-a", Fault.cut_body(times=2))
    async with http.post(chat_url(sim), json=CHAT) as resp:
        assert resp.status == 200
        declared = int(resp.headers["Content-Length"])
        with pytest.raises(aiohttp.ClientPayloadError) as info:
            await resp.read()
    assert isinstance(info.value.__cause__, ContentLengthError)
    assert f"of {declared} bytes" in str(info.value.__cause__)
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="sim-a", messages=USER)


async def test_stall_keeps_the_connection_open_then_resumes(
    sim: SimProvider, http: aiohttp.ClientSession
) -> None:
    sim.script("sim-a", Fault.stall(after_chunks=1, delay_s=0.5))
    async with http.post(chat_url(sim), json=STREAM) as resp:
        first = await resp.content.readline()
        assert first.startswith(b"data: {")
        assert await resp.content.readline() == b"\n"
        stalled_at = time.monotonic()
        with pytest.raises(TimeoutError):  # nothing within the stall window...
            await asyncio.wait_for(resp.content.readline(), timeout=0.25)
        rest = await read_sse(resp)  # ...then the rest, on the same connection
        resumed_after = time.monotonic() - stalled_at
    assert 0.25 <= resumed_after < 1.5
    assert rest[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in rest)
    assert sim.errors("sim-a") == 0
    assert sim.fault_counts("sim-a") == {"stall": 1}


async def test_malformed_sse_default_line_then_the_rest(
    sim: SimProvider, http: aiohttp.ClientSession
) -> None:
    sim.script("sim-a", Fault.malformed_sse(after_chunks=2))
    async with http.post(chat_url(sim), json=STREAM) as resp:
        lines = await read_sse(resp)
    assert lines[2] == DEFAULT_BAD_SSE_LINE
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[2].removeprefix("data: "))
    good = [json.loads(line.removeprefix("data: ")) for line in lines[:2] + lines[3:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in good)
    assert lines[-1] == "data: [DONE]"
    assert sim.errors("sim-a") == 1


async def test_malformed_sse_garbage_line(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    sim.script("sim-a", Fault.malformed_sse(after_chunks=1, body="<html>502 Bad Gateway</html>"))
    async with http.post(chat_url(sim), json=STREAM) as resp:
        lines = await read_sse(resp)
    assert lines[1] == "<html>502 Bad Gateway</html>"
    assert lines[0].startswith("data: {") and lines[2].startswith("data: {")


async def test_openai_client_raises_on_malformed_sse(sim: SimProvider, client: AsyncOpenAI) -> None:
    sim.script("sim-a", Fault.malformed_sse(after_chunks=1))
    stream = await client.chat.completions.create(model="sim-a", messages=USER, stream=True)
    received = []
    with pytest.raises(json.JSONDecodeError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 1
    await stream.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_malformed_json(sim: SimProvider, http: aiohttp.ClientSession, stream: bool) -> None:
    sim.script("sim-a", Fault.malformed_json())
    async with http.post(chat_url(sim), json={**CHAT, "stream": stream}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        text = await resp.text()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert text.startswith('{"id": "chatcmpl-')  # the real answer, truncated
    assert sim.fault_counts("sim-a") == {"malformed_json": 1}


async def test_malformed_json_custom_body_and_openai(sim: SimProvider, client: AsyncOpenAI) -> None:
    sim.script("sim-a", Fault.malformed_json("not json at all"))
    with pytest.raises(json.JSONDecodeError):
        await client.chat.completions.create(model="sim-a", messages=USER)
    assert sim.received[-1].path == "/v1/chat/completions"


# --- refused connections ---------------------------------------------------------------------


async def test_refused_url_is_a_real_refused_connection(http: aiohttp.ClientSession) -> None:
    base = refused_base_url()
    assert base.startswith("http://127.0.0.1:") and base.endswith("/v1")
    with pytest.raises(aiohttp.ClientConnectorError) as info:
        async with http.post(f"{base}/chat/completions", json=CHAT):
            pass
    assert isinstance(info.value.os_error, ConnectionRefusedError)
    with pytest.raises(aiohttp.ClientConnectorError):
        async with http.post(refused_tool_url("echo"), json={}):
            pass
    assert SimProvider.refused_url().endswith("/v1")
    async with AsyncOpenAI(base_url=SimProvider.refused_url(), api_key="k", max_retries=0) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="sim-a", messages=USER)


# --- tools ----------------------------------------------------------------------------------


async def test_tool_faults(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    url = sim.tool_url("lookup_order")
    args = {"order_id": "A1"}
    sim.script_tool(
        "lookup_order",
        Fault.rate_limit(retry_after_s=1, retry_after_ms=900),
        Fault.http_error(503, times=2),
        Fault.malformed_json(),
        Fault.cut_body(),
    )
    async with http.post(url, json=args) as resp:
        assert resp.status == 429
        assert (resp.headers["Retry-After"], resp.headers["retry-after-ms"]) == ("1", "900")
    for _ in range(2):
        async with http.post(url, json=args) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["type"] == "server_error"
    async with http.post(url, json=args) as resp:
        assert resp.status == 200
        with pytest.raises(json.JSONDecodeError):
            await resp.json()
    async with http.post(url, json=args) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    async with http.post(url, json=args) as resp:
        assert await resp.json() == {"order_id": "A1", "status": "shipped", "eta_days": 2}
    assert sim.tool_requests("lookup_order") == 6
    assert sim.tool_errors("lookup_order") == 5
    assert sim.tool_fault_counts("lookup_order") == {"status": 3, "malformed_json": 1, "cut_body": 1}
    async with http.post(sim.tool_url("echo"), json={"x": 1}) as resp:  # other tools untouched
        assert await resp.json() == {"x": 1}


async def test_tool_hang_and_slow_first_byte(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    sim.script_tool("echo", Fault.hang(0.8), Fault.slow_first_byte(0.2))
    with pytest.raises(TimeoutError):
        async with http.post(sim.tool_url("echo"), json={}, timeout=aiohttp.ClientTimeout(total=0.15)):
            pass
    started = time.monotonic()
    async with http.post(sim.tool_url("echo"), json={"y": 2}) as resp:
        assert await resp.json() == {"y": 2}
    assert 0.2 <= time.monotonic() - started < 1.5
    assert sim.tool_fault_counts("echo") == {"hang": 1, "slow_first_byte": 1}
    assert sim.tool_errors("echo") == 0


async def test_tool_faults_clear(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    sim.script_tool("echo", Fault.http_error(500, times=None))
    sim.script("sim-a", Fault.http_error(500, times=None))
    sim.clear_tool_faults("echo")
    assert sim.pending_tool_faults("echo") == []
    assert len(sim.pending_faults("sim-a")) == 1  # models untouched
    sim.script_tool("echo", Fault.http_error(500, times=None))
    sim.clear_tool_faults()
    async with http.post(sim.tool_url("echo"), json={}) as resp:
        assert resp.status == 200


# --- the HTTP control API ---------------------------------------------------------------------


async def test_faults_over_http(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    script = [
        {"kind": "status", "status": 429, "retry_after_ms": 200, "times": 2},
        {"kind": "cut_stream", "after_chunks": 1},
    ]
    async with http.post(admin_url(sim, "/_sim/faults/models/sim-a"), json=script) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["model"] == "sim-a"
    assert [f["kind"] for f in answer["pending_faults"]] == ["status", "cut_stream"]
    assert sim.pending_faults("sim-a") == [
        Fault.rate_limit(retry_after_ms=200, times=2),
        Fault.cut_stream(1),
    ]
    async with http.post(
        admin_url(sim, "/_sim/faults/tools/echo"), json={"kind": "hang", "delay_s": 5}
    ) as resp:
        assert resp.status == 200  # one object is a list of one
    async with http.get(admin_url(sim, "/_sim/faults")) as resp:
        listing = await resp.json()
    assert set(listing["models"]) == {"sim-a"} and set(listing["tools"]) == {"echo"}
    async with http.post(chat_url(sim), json=CHAT) as resp:
        assert resp.status == 429
        assert resp.headers["retry-after-ms"] == "200"
    async with http.get(admin_url(sim, "/_sim/stats")) as resp:
        stats = await resp.json()
    entry = stats["models"]["sim-a"]
    assert entry["faults"] == {"status": 1}
    assert entry["errors"] == 1
    assert [(f["kind"], f["times"]) for f in entry["pending_faults"]] == [("status", 1), ("cut_stream", 1)]
    async with http.delete(admin_url(sim, "/_sim/faults/tools/echo")) as resp:
        assert resp.status == 200
    assert sim.pending_tool_faults("echo") == []
    async with http.delete(admin_url(sim, "/_sim/faults/models/sim-a")) as resp:
        assert await resp.json() == {"model": "sim-a", "pending_faults": []}
    assert await chat_status(http, sim) == 200
    sim.script("sim-b", Fault.http_error(500))
    async with http.delete(admin_url(sim, "/_sim/faults")) as resp:
        assert await resp.json() == {"models": {}, "tools": {}}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/_sim/faults/models/sim-a", [{"kind": "status"}], 400, "[0].status"),
        ("/_sim/faults/models/sim-a", [{"kind": "hang", "delay_s": 1}, {"kind": "boom"}], 400, "[1].kind"),
        ("/_sim/faults/models/sim-a", [{"kind": "stall", "delay_s": 1, "colour": 1}], 400, "[0].colour"),
        ("/_sim/faults/models/sim-a", [{"status": 500}], 400, "[0].kind"),
        ("/_sim/faults/models/sim-a", [7], 400, "[0].(fault)"),
        ("/_sim/faults/models/nope", [{"kind": "status", "status": 500}], 404, "model"),
        ("/_sim/faults/tools/nope", [{"kind": "status", "status": 500}], 404, "tool"),
        ("/_sim/faults/tools/echo", [{"kind": "stall", "delay_s": 1}], 400, "kind"),
    ],
)
async def test_bad_faults_over_http_name_the_field(
    sim: SimProvider, http: aiohttp.ClientSession, path: str, body: Any, status: int, param: str
) -> None:
    async with http.post(admin_url(sim, path), json=body) as resp:
        assert resp.status == status
        error = (await resp.json())["error"]
    assert error["param"] == param
    assert sim.pending_faults("sim-a") == [] and sim.pending_tool_faults("echo") == []
    async with http.post(admin_url(sim, path), data="{not json") as resp:
        assert resp.status == 400


# --- lifecycle --------------------------------------------------------------------------------


async def test_stop_does_not_wait_out_a_hang(http: aiohttp.ClientSession) -> None:
    sim = SimProvider({"sim-a": ModelBehavior()})
    await sim.start()
    sim.script("sim-a", Fault.hang(30))

    async def call() -> None:
        async with http.post(chat_url(sim), json=CHAT) as resp:
            await resp.read()

    task = asyncio.create_task(call())
    for _ in range(200):  # until the server holds the request
        if sim.requests("sim-a"):
            break
        await asyncio.sleep(0.01)
    assert sim.fault_counts("sim-a") == {"hang": 1}
    started = time.monotonic()
    await sim.stop()
    assert time.monotonic() - started < 1.0
    with pytest.raises(aiohttp.ClientError):  # the server went away mid-request
        await asyncio.wait_for(task, timeout=2)


async def test_reset_stats_keeps_scripted_faults(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    sim.script("sim-a", Fault.http_error(500, times=2))
    assert await chat_status(http, sim) == 500
    sim.reset_stats()
    assert sim.fault_counts("sim-a") == {}
    assert sim.pending_faults("sim-a") == [Fault.http_error(500, times=1)]
    assert await chat_status(http, sim) == 500
    assert sim.fault_counts("sim-a") == {"status": 1}


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "refuse"}, "kind"),
        ({"kind": "explode"}, "kind"),
        ({"kind": "status"}, "status"),
        ({"kind": "status", "status": 200}, "status"),
        ({"kind": "status", "status": 600}, "status"),
        ({"kind": "status", "status": True}, "status"),
        ({"kind": "hang", "delay_s": 1, "status": 500}, "status"),
        ({"kind": "status", "status": 429, "retry_after_s": -1}, "retry_after_s"),
        ({"kind": "status", "status": 429, "retry_after_ms": float("nan")}, "retry_after_ms"),
        ({"kind": "hang", "delay_s": 1, "retry_after_s": 1}, "retry_after_s"),
        ({"kind": "hang"}, "delay_s"),
        ({"kind": "stall", "delay_s": float("inf")}, "delay_s"),
        ({"kind": "cut_stream", "delay_s": 1}, "delay_s"),
        ({"kind": "cut_stream", "after_chunks": -1}, "after_chunks"),
        ({"kind": "cut_stream", "after_chunks": 1.5}, "after_chunks"),
        ({"kind": "malformed_json", "after_chunks": 1}, "after_chunks"),
        ({"kind": "status", "status": 500, "body": "x"}, "body"),
        ({"kind": "malformed_sse", "body": "two\nlines"}, "body"),
        ({"kind": "malformed_json", "body": 3}, "body"),
        ({"kind": "cut_body", "times": 0}, "times"),
        ({"kind": "cut_body", "times": 1.0}, "times"),
    ],
)
def test_fault_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: ") as info:
        Fault(**kwargs)
    assert isinstance(info.value, FaultError)
    assert info.value.field == field


async def test_script_checks_names_and_order(sim: SimProvider) -> None:
    with pytest.raises(FaultError) as info:
        sim.script("nope", Fault.http_error(500))
    assert info.value.field == "model"
    with pytest.raises(FaultError) as info:
        sim.script_tool("nope", Fault.http_error(500))
    assert info.value.field == "tool"
    with pytest.raises(FaultError) as info:
        sim.script_tool("echo", Fault.cut_stream(1))
    assert info.value.field == "kind"
    with pytest.raises(FaultError) as info:
        sim.script("sim-a", Fault.http_error(500, times=None), Fault.http_error(502))
    assert info.value.field == "times"
    assert sim.pending_faults("sim-a") == []  # nothing queued from a refused script
    sim.script("sim-a", Fault.http_error(500, times=None))
    with pytest.raises(FaultError):
        sim.script("sim-a", Fault.http_error(502))  # would never be reached


def test_every_kind_has_a_shorthand() -> None:
    made = {
        Fault.http_error(500).kind,
        Fault.rate_limit().kind,
        Fault.hang(1).kind,
        Fault.slow_first_byte(1).kind,
        Fault.cut_stream(0).kind,
        Fault.stall(0, 1).kind,
        Fault.malformed_json().kind,
        Fault.malformed_sse().kind,
        Fault.cut_body().kind,
    }
    assert made == set(FAULT_KINDS)


# --- the pure queue, property-tested -------------------------------------------------------------

_KINDS_FOR_QUEUE = [
    Fault.http_error(500),
    Fault.cut_stream(1),
    Fault.cut_body(),
    Fault.hang(1),
    Fault.malformed_sse(),
]


@given(
    st.lists(st.tuples(st.sampled_from(_KINDS_FOR_QUEUE), st.integers(1, 4)), max_size=6),
    st.lists(st.booleans(), max_size=40),
)
def test_queue_applies_each_fault_times_in_order(spec: list[tuple[Fault, int]], streams: list[bool]) -> None:
    """Against a reference model: the head applies iff it fits the request kind, each fault
    exactly `times` times, in order; pending() always reports the uses left."""
    queue = FaultQueue()
    faults = [dataclasses.replace(f, times=n) for f, n in spec]
    queue.push(faults)
    model: list[tuple[Fault, int]] = [(f, n) for f, (_, n) in zip(faults, spec, strict=True)]
    for stream in streams:
        got = queue.take(stream)
        expected = None
        if model and model[0][0].applies_to(stream):
            expected, left = model[0]
            if left == 1:
                model.pop(0)
            else:
                model[0] = (expected, left - 1)
        assert got == expected
        assert [(f.kind, f.times) for f in queue.pending()] == [(f.kind, n) for f, n in model]
    assert len(queue) == len(model)


@given(st.integers(1, 5), st.integers(0, 8))
def test_queue_forever_fault_never_expires(before: int, requests: int) -> None:
    queue = FaultQueue()
    queue.push([Fault.http_error(503, times=before), Fault.http_error(500, times=None)])
    statuses = [f.status if (f := queue.take(False)) is not None else None for _ in range(before + requests)]
    assert statuses == [503] * before + [500] * requests
    assert queue.pending() == [Fault.http_error(500, times=None)]
