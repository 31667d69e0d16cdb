"""LangChain's `ChatOpenAI` on the sidecar's OpenAI-compatible endpoint, against a real in-process
Sidecar and the simulated provider on loopback: invoke, stream, and a `bind_tools` tool loop.

tiktoken stays off these paths: its encodings are downloaded on first use, which a machine
without internet cannot do. The test points TIKTOKEN_CACHE_DIR at an empty directory and makes
every way of loading an encoding fail, so a call that needed one would fail here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from devstack.simprovider import SimProvider
from tests.integration.test_openai_http import openai_config, serving
from tests.integration.test_sidecar_api import API_KEY, sim_models

ASK_TOOL = '/tool lookup_order {"order_id": "A1"}'


@tool
def lookup_order(order_id: str) -> dict[str, Any]:
    """Look up an order by id."""
    return {"order_id": order_id, "status": "shipped"}


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=1) as provider:
        yield provider


@pytest.fixture(autouse=True)
def no_tiktoken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError(f"a tiktoken encoding was loaded: {args[:1]}")

    for module, name in [
        (tiktoken, "get_encoding"),
        (tiktoken, "encoding_for_model"),
        (tiktoken.registry, "get_encoding"),
        (tiktoken.load, "read_file"),
        (tiktoken.load, "read_file_cached"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    yield cache
    assert not any(cache.iterdir()), "something wrote tiktoken's cache"


@asynccontextmanager
async def chat_model(provider: SimProvider) -> AsyncIterator[ChatOpenAI]:
    """ChatOpenAI on a sidecar's endpoint; the sidecar stopped and the HTTP client closed after."""
    async with serving(openai_config(provider)) as (sidecar, _):
        assert sidecar.openai is not None
        http = openai.DefaultAsyncHttpxClient(trust_env=False)  # no proxy for loopback
        try:
            # the one change from calling OpenAI: the base_url (and a dummy key the sidecar ignores)
            yield ChatOpenAI(
                base_url=sidecar.openai.base_url,
                api_key="unused",  # type: ignore[arg-type]
                model="ignored",
                max_retries=0,
                stream_usage=True,
                http_async_client=http,
            )
        finally:
            await http.aclose()


async def test_langchain_openai_http_invoke_and_stream(sim: SimProvider) -> None:
    async with chat_model(sim) as llm:
        reply = await llm.ainvoke([HumanMessage("Where is my order?")])
        assert isinstance(reply, AIMessage)
        assert str(reply.content).startswith("Simulated reply from sim-good to: Where is my order?")
        assert reply.usage_metadata is not None and reply.usage_metadata["total_tokens"] > 0
        assert reply.response_metadata["model_name"] == "sim-good"  # the version's model, not ours

        chunks: list[AIMessageChunk] = [c async for c in llm.astream([HumanMessage("Where is my order?")])]
        assert len(chunks) > 2, "the answer came in one piece, not streamed"
        total = chunks[0]
        for chunk in chunks[1:]:
            total = total + chunk
        assert total.content == reply.content
        assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] > 0
    assert sim.requests("sim-good") == 2


async def test_langchain_openai_http_bind_tools_loop(sim: SimProvider) -> None:
    async with chat_model(sim) as llm:
        model = llm.bind_tools([lookup_order])
        messages: list[Any] = [HumanMessage(ASK_TOOL)]
        reply = await model.ainvoke(messages)
        assert reply.tool_calls and reply.tool_calls[0]["name"] == "lookup_order"
        assert reply.tool_calls[0]["args"] == {"order_id": "A1"}
        assert reply.response_metadata["finish_reason"] == "tool_calls"
        # the agent runs its tool and sends the result back: the model then answers in text
        result = await lookup_order.ainvoke(reply.tool_calls[0])
        assert isinstance(result, ToolMessage) and result.tool_call_id == reply.tool_calls[0]["id"]
        messages += [reply, result]
        final = await model.ainvoke(messages)
        assert not final.tool_calls
        assert "to tool result" in str(final.content)
        assert json.loads(str(final.content).split("tool result: ", 1)[1]) == {
            "order_id": "A1",
            "status": "shipped",
        }

        # streamed, the tool call arrives in chunks that sum to the same call
        total: Any = None
        async for chunk in model.astream([HumanMessage(ASK_TOOL)]):
            total = chunk if total is None else total + chunk
        assert total is not None and total.tool_calls[0]["name"] == "lookup_order"
        assert total.tool_calls[0]["args"] == {"order_id": "A1"}
