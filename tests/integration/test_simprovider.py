"""The simulated provider on a real loopback port, checked with the official `openai` client
(which proves the wire format) and raw aiohttp requests (status codes, headers, SSE framing)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDictProxy
from openai import AsyncOpenAI

from devstack._sim_openai import parse_chat_request, plan_reply, stream_chunks, word_pieces
from devstack.simprovider import (
    RECEIVED_MAX,
    ModelBehavior,
    SimConfigError,
    SimProvider,
    ToolBehavior,
    load_sim_config,
    serve,
)

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "simprovider.yaml"
USER: Any = [{"role": "user", "content": "Where is my order? It was due on Monday."}]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look up an order",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
        },
    }
]


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    models = {"sim-fast": ModelBehavior(), "sim-slow": ModelBehavior(latency_ms=100)}
    async with SimProvider(models, seed=7) as provider:
        yield provider


@pytest.fixture
async def client(sim: SimProvider) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post_chat(
    http: aiohttp.ClientSession, sim: SimProvider, body: Any, **kwargs: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    data = body if isinstance(body, str) else json.dumps(body)
    async with http.post(f"{sim.base_url}/chat/completions", data=data, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


# --- the wire format, through the official client ---------------------------------------------


async def test_unary_chat_parses_with_openai_client(sim: SimProvider, client: AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model="sim-fast", messages=USER)
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "sim-fast"
    assert abs(resp.created - time.time()) < 60
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert (
        choice.message.content == "Simulated reply from sim-fast to: Where is my order? It was due on Monday."
    )
    assert choice.message.tool_calls is None
    assert resp.usage is not None
    assert resp.usage.completion_tokens == len(choice.message.content.split())
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert sim.requests("sim-fast") == 1
    assert sim.errors("sim-fast") == 0
    last = sim.received[-1]
    assert last.path == "/v1/chat/completions"
    assert last.body["messages"] == USER
    assert last.headers["authorization"] == "Bearer sk-test"  # case-insensitive


async def test_reply_quotes_first_60_chars_of_last_user_message(client: AsyncOpenAI) -> None:
    long = "x" * 50 + " " + "y" * 50
    messages: Any = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": long}]},
    ]
    resp = await client.chat.completions.create(model="sim-fast", messages=messages)
    assert resp.choices[0].message.content == f"Simulated reply from sim-fast to: {long[:60]}"


async def test_streaming_chat_parses_and_matches_unary(client: AsyncOpenAI) -> None:
    unary = await client.chat.completions.create(model="sim-fast", messages=USER)
    stream = await client.chat.completions.create(
        model="sim-fast",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 3  # a few words at a time
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    # include_usage: a last chunk with no choices and the usage; usage is null before it
    assert chunks[-1].choices == []
    assert chunks[-1].usage == unary.usage
    assert all(c.usage is None for c in chunks[:-1])


async def test_streaming_without_include_usage_has_no_usage_chunk(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="sim-fast", messages=USER, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_sse_framing_raw(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    body = {"model": "sim-fast", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    assert events[-1] == ""  # every event ends with a blank line
    events = events[:-1]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"]["total_tokens"] > 0
    assert payloads[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_truncates_with_finish_reason_length(client: AsyncOpenAI, param: str) -> None:
    limit: dict[str, Any] = {param: 3}
    resp = await client.chat.completions.create(model="sim-fast", messages=USER, stream=False, **limit)
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == "Simulated reply from"
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    stream = await client.chat.completions.create(model="sim-fast", messages=USER, stream=True, **limit)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Simulated reply from"
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_models_list(client: AsyncOpenAI) -> None:
    page = await client.models.list()
    assert sorted(m.id for m in page.data) == ["sim-fast", "sim-slow"]
    model = await client.models.retrieve("sim-slow")
    assert model.id == "sim-slow"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-nope")


# --- tool calls ----------------------------------------------------------------------------------


async def test_tool_call_unary_then_tool_result(client: AsyncOpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": '/tool lookup_order {"order_id": "A-17"}'}]
    resp = await client.chat.completions.create(model="sim-fast", messages=messages, tools=TOOLS)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "lookup_order"
    assert json.loads(call.function.arguments) == {"order_id": "A-17"}
    # the agent runs the tool and sends the result back: the model now answers in text
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'})
    resp2 = await client.chat.completions.create(model="sim-fast", messages=messages, tools=TOOLS)
    assert resp2.choices[0].finish_reason == "stop"
    assert (
        resp2.choices[0].message.content
        == 'Simulated reply from sim-fast to tool result: {"status": "shipped"}'
    )


async def test_tool_command_without_tools_is_plain_text(client: AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "/tool lookup_order {}"}]
    resp = await client.chat.completions.create(model="sim-fast", messages=messages)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.tool_calls is None


async def test_tool_call_streamed(client: AsyncOpenAI) -> None:
    args = {"order_id": "B-2", "include_history": True, "note": "a longer argument string"}
    messages: Any = [{"role": "user", "content": f"/tool lookup_order {json.dumps(args)}"}]
    stream = await client.chat.completions.create(
        model="sim-fast", messages=messages, tools=TOOLS, stream=True, stream_options={"include_usage": True}
    )
    calls: dict[int, dict[str, str]] = {}
    finish: list[str] = []
    fragments = 0
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.finish_reason:
                finish.append(choice.finish_reason)
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                if tc.id:
                    entry["id"] = tc.id
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
                    fragments += 1
    assert finish == ["tool_calls"]
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == "lookup_order"
    assert json.loads(calls[0]["arguments"]) == args
    assert fragments > 1  # arguments arrive in pieces
    assert usage is not None and usage.completion_tokens > 0


# --- errors --------------------------------------------------------------------------------------


async def test_unknown_model_is_404_not_found(sim: SimProvider, client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-9", messages=USER)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert info.value.type == "invalid_request_error"
    assert "gpt-9" in info.value.message
    assert sim.requests("gpt-9") == 0


async def test_auth_required_when_api_key_set(http: aiohttp.ClientSession) -> None:
    secret = "sk-sim-secret-123"
    async with SimProvider(api_key=secret) as sim:
        async with AsyncOpenAI(base_url=sim.base_url, api_key="sk-wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as info:
                await bad.chat.completions.create(model="sim-fast", messages=USER)
        assert info.value.status_code == 401
        assert secret not in info.value.response.text
        assert "sk-wrong" not in info.value.response.text
        status, body, _ = await post_chat(http, sim, {"model": "sim-fast", "messages": USER})
        assert status == 401
        assert body["error"]["type"] == "invalid_request_error"
        async with http.get(f"{sim.base_url}/models") as resp:
            assert resp.status == 401
        async with AsyncOpenAI(base_url=sim.base_url, api_key=secret, max_retries=0) as good:
            answer = await good.chat.completions.create(model="sim-fast", messages=USER)
        assert answer.choices[0].message.content


async def test_error_rate_one_answers_with_the_status(sim: SimProvider, client: AsyncOpenAI) -> None:
    sim.set_model("sim-fast", ModelBehavior(error_rate=1.0, error_status=503))
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="sim-fast", messages=USER)
    assert info.value.status_code == 503
    assert info.value.type == "server_error"
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="sim-fast", messages=USER, stream=True)
    assert sim.requests("sim-fast") == 2
    assert sim.errors("sim-fast") == 2


async def test_429_carries_retry_after(
    sim: SimProvider, client: AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    sim.set_model("sim-fast", ModelBehavior(error_rate=1.0, error_status=429))
    status, body, headers = await post_chat(http, sim, {"model": "sim-fast", "messages": USER})
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert body["error"]["type"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="sim-fast", messages=USER)


async def _outcomes(provider: SimProvider, http: aiohttp.ClientSession, n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        status, _, _ = await post_chat(http, provider, {"model": "sim-bad", "messages": USER})
        statuses.append(status)
    return statuses


async def test_error_rate_is_close_to_configured_and_seeded(http: aiohttp.ClientSession) -> None:
    models = {"sim-bad": ModelBehavior(error_rate=0.3, error_status=500)}
    async with SimProvider(models, seed=42) as a:
        statuses = await _outcomes(a, http, 300)
        assert a.requests("sim-bad") == 300
        assert a.errors("sim-bad") == statuses.count(500)
    assert set(statuses) == {200, 500}
    rate = statuses.count(500) / 300
    assert 0.2 <= rate <= 0.4, rate  # ~4 standard deviations either side of 0.3
    async with SimProvider(models, seed=42) as b:  # same seed, same sequence
        assert await _outcomes(b, http, 60) == statuses[:60]


async def test_malformed_and_invalid_requests_are_400(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    cases: list[tuple[Any, str]] = [
        ("{not json", "body"),
        ({"model": "sim-fast"}, "messages"),
        ({"model": "sim-fast", "messages": []}, "messages"),
        ({"messages": USER}, "model"),
        ({"model": "sim-fast", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        (
            {"model": "sim-fast", "messages": [*USER, {"role": "tool", "content": "x"}]},
            "messages[1].tool_call_id",
        ),
        ({"model": "sim-fast", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "sim-fast", "messages": USER, "stream": "yes"}, "stream"),
    ]
    for body, param in cases:
        status, answer, _ = await post_chat(http, sim, body)
        assert status == 400, body
        assert answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["param"] == param
        assert param.split("[")[0] in answer["error"]["message"]
    assert sim.requests("sim-fast") == 0


# --- behavior: latency, chunk delay, run-time changes --------------------------------------------


async def test_latency_and_chunk_delay(sim: SimProvider, client: AsyncOpenAI) -> None:
    t0 = time.perf_counter()
    await client.chat.completions.create(model="sim-slow", messages=USER)
    assert time.perf_counter() - t0 >= 0.1
    sim.set_model("sim-fast", ModelBehavior(chunk_delay_ms=20))
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(model="sim-fast", messages=USER, stream=True)
    n = len([c async for c in stream])
    assert n >= 5
    assert time.perf_counter() - t0 >= (n - 1) * 0.02


async def test_runtime_behavior_change_via_put_and_patch(
    sim: SimProvider, http: aiohttp.ClientSession
) -> None:
    ok, _, _ = await post_chat(http, sim, {"model": "sim-fast", "messages": USER})
    assert ok == 200
    url = f"{sim.base_url.removesuffix('/v1')}/_sim/models/sim-fast"
    async with http.put(url, json={"latency_ms": 1, "error_rate": 1.0, "error_status": 502}) as resp:
        assert resp.status == 200
        assert (await resp.json())["behavior"]["error_status"] == 502
    status, _, _ = await post_chat(http, sim, {"model": "sim-fast", "messages": USER})
    assert status == 502
    async with http.patch(url, json={"error_rate": 0}) as resp:  # PATCH keeps the other fields
        assert resp.status == 200
    assert sim.models["sim-fast"] == ModelBehavior(latency_ms=1, error_rate=0, error_status=502)
    status, _, _ = await post_chat(http, sim, {"model": "sim-fast", "messages": USER})
    assert status == 200
    # PUT creates a model too, and a bad field is refused by name
    new_url = url.replace("sim-fast", "sim-new")
    async with http.put(new_url, json={}) as resp:
        assert resp.status == 200
    assert "sim-new" in sim.models
    async with http.put(url, json={"error_rate": 2}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "error_rate"
    async with http.put(url, json={"latency": 5}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "latency"
    tool_url = url.replace("models/sim-fast", "tools/echo")
    async with http.put(tool_url, json={"error_rate": 1, "error_status": 504}) as resp:
        assert resp.status == 200
    async with http.post(sim.tool_url("echo"), json={}) as resp:
        assert resp.status == 504
    async with http.get(f"{sim.base_url.removesuffix('/v1')}/_sim/stats") as resp:
        stats = await resp.json()
    assert stats["models"]["sim-fast"]["requests"] == 3
    assert stats["models"]["sim-fast"]["errors"] == 1
    assert stats["models"]["sim-fast"]["behavior"]["error_status"] == 502
    assert stats["tools"]["echo"] == {
        "requests": 1,
        "errors": 1,
        "faults": {},
        "pending_faults": [],
        "behavior": {"latency_ms": 0.0, "error_rate": 1, "error_status": 504},
    }
    assert sim.stats == stats


async def test_client_leaving_mid_stream_does_not_hurt_the_server(
    sim: SimProvider, http: aiohttp.ClientSession
) -> None:
    sim.set_model("sim-fast", ModelBehavior(chunk_delay_ms=50))
    body = {"model": "sim-fast", "messages": USER, "stream": True}
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
    sim.set_model("sim-fast", ModelBehavior())
    status, answer, _ = await post_chat(http, sim, {"model": "sim-fast", "messages": USER})
    assert status == 200
    assert answer["choices"][0]["message"]["content"]


# --- tool services -------------------------------------------------------------------------------


async def test_tool_endpoints(sim: SimProvider, http: aiohttp.ClientSession) -> None:
    assert sim.tool_url("echo") == f"http://127.0.0.1:{sim.port}/tools/echo"
    async with http.post(sim.tool_url("lookup_order"), json={"order_id": "A-17"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"order_id": "A-17", "status": "shipped", "eta_days": 2}
    async with http.post(sim.tool_url("lookup_order"), json={"id": "A-17"}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["param"] == "order_id"
        assert "order_id" in error["message"]
    async with http.post(sim.tool_url("echo"), json={"a": [1, 2], "b": None}) as resp:
        assert await resp.json() == {"a": [1, 2], "b": None}
    async with http.post(sim.tool_url("echo"), data="{oops") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "body"
    async with http.post(sim.tool_url("nope"), json={}) as resp:
        assert resp.status == 404
        assert "nope" in (await resp.json())["error"]["message"]
    sim.set_tool("lookup_order", ToolBehavior(error_rate=1.0, error_status=429))
    async with http.post(sim.tool_url("lookup_order"), json={"order_id": "A"}) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
    sim.set_tool("search", ToolBehavior(latency_ms=30))  # no built-in logic: acknowledges its input
    t0 = time.perf_counter()
    async with http.post(sim.tool_url("search"), json={"q": "x"}) as resp:
        assert await resp.json() == {"tool": "search", "ok": True, "input": {"q": "x"}}
    assert time.perf_counter() - t0 >= 0.03
    assert sim.tool_requests("lookup_order") == 3
    assert sim.tool_errors("lookup_order") == 1
    assert sim.tool_requests("nope") == 0


# --- lifecycle, bookkeeping, serve() -------------------------------------------------------------


async def test_start_stop_idempotent_and_received_bounded(http: aiohttp.ClientSession) -> None:
    provider = SimProvider()
    with pytest.raises(RuntimeError):
        _ = provider.port
    await provider.start()
    await provider.start()
    try:
        assert provider.base_url == f"http://127.0.0.1:{provider.port}/v1"
        for i in range(RECEIVED_MAX + 5):
            await post_chat(
                http, provider, {"model": "sim-fast", "messages": [{"role": "user", "content": str(i)}]}
            )
        received = provider.received
        assert len(received) == RECEIVED_MAX
        assert received[-1].body["messages"][0]["content"] == str(RECEIVED_MAX + 4)
        assert received[0].body["messages"][0]["content"] == "5"
        provider.reset_stats()
        assert provider.received == [] and provider.requests("sim-fast") == 0
    finally:
        await provider.stop()
        await provider.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_chat(http, provider, {"model": "sim-fast", "messages": USER})


async def test_serve_runs_until_cancelled(port: int, http: aiohttp.ClientSession) -> None:
    ready: asyncio.Future[SimProvider] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve("127.0.0.1", port, EXAMPLE_CONFIG, on_ready=ready.set_result))
    try:
        provider = await asyncio.wait_for(ready, 5)
        assert provider.port == port
        async with http.get(f"http://127.0.0.1:{port}/v1/models") as resp:
            ids = {m["id"] for m in (await resp.json())["data"]}
        assert {"sim-good", "sim-bad", "sim-fast"} <= ids
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(f"http://127.0.0.1:{port}/v1/models")


# --- behaviors and the config file ---------------------------------------------------------------


def test_example_config_loads() -> None:
    models, tools = load_sim_config(EXAMPLE_CONFIG)
    assert models["sim-good"] == ModelBehavior(latency_ms=20, latency_jitter_ms=5)
    assert models["sim-bad"] == ModelBehavior(latency_ms=20, error_rate=0.3, error_status=500)
    assert models["sim-fast"] == ModelBehavior(latency_ms=0)
    assert set(tools) >= {"lookup_order", "echo"}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("models:\n  sim-bad: {error_rate: 1.5}\n", "models.sim-bad.error_rate"),
        ("models:\n  m: {latency_ms: -1}\n", "models.m.latency_ms"),
        ("models:\n  m: {latency_ms: fast}\n", "models.m.latency_ms"),
        ("models:\n  m: {error_status: 200}\n", "models.m.error_status"),
        ("models:\n  m: {chunk_delay: 5}\n", "models.m.chunk_delay"),
        ("tools:\n  t: {chunk_delay_ms: 5}\n", "tools.t.chunk_delay_ms"),
        ("tools:\n  t: {error_rate: true}\n", "tools.t.error_rate"),
        ("models:\n  m: [1, 2]\n", "models.m"),
        ("models: [a, b]\n", "models"),
        ("model:\n  m: {}\n", "model"),
        ("- just a list\n", "top level"),
        ("models: {m: {latency_ms: 1}\n", "not valid YAML"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(text)
    with pytest.raises(SimConfigError) as info:
        load_sim_config(path)
    assert str(path) in str(info.value)
    assert where in str(info.value)


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(SimConfigError, match=r"nope\.yaml"):
        load_sim_config(tmp_path / "nope.yaml")


def test_empty_config_and_empty_entries_mean_defaults(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("models:\n  m:\n")
    assert load_sim_config(path) == ({"m": ModelBehavior()}, {})
    path.write_text("")
    assert load_sim_config(path) == ({}, {})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"latency_ms": -1}, "latency_ms"),
        ({"latency_jitter_ms": float("nan")}, "latency_jitter_ms"),
        ({"error_rate": 1.01}, "error_rate"),
        ({"error_rate": -0.1}, "error_rate"),
        ({"error_status": 200}, "error_status"),
        ({"error_status": 500.0}, "error_status"),
        ({"chunk_delay_ms": True}, "chunk_delay_ms"),
    ],
)
def test_behavior_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelBehavior(**kwargs)
    if field in ("latency_ms", "error_rate", "error_status"):
        with pytest.raises(ValueError, match=field):
            ToolBehavior(**kwargs)


# --- the pure wire-format functions --------------------------------------------------------------


@given(
    text=st.text(alphabet=st.sampled_from("ab \n\t{}\"'é"), max_size=80),
    max_tokens=st.none() | st.integers(min_value=1, max_value=20),
)
def test_stream_and_unary_agree(text: str, max_tokens: int | None) -> None:
    assert "".join(word_pieces(text)) == text
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    reply = plan_reply(parse_chat_request(body), "call_1")
    assert reply.content is not None
    if max_tokens is not None:
        assert reply.completion_tokens <= max_tokens
    assert reply.completion_tokens == len(reply.content.split())
    chunks = stream_chunks("id", 0, "m", reply, include_usage=True)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == reply.content
    assert chunks[-1]["usage"] == reply.usage()
