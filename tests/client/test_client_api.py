"""outrider_client against a real Sidecar (port 0) and the simulated provider on loopback:
the sync client runs in a worker thread (the sidecar serves on the test's event loop), the
asyncio client on the loop itself."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import outrider
from devstack.simprovider import SimProvider
from outrider.clock import ManualClock
from outrider.v1 import common_pb2, control_pb2
from outrider_client import (
    AsyncClient,
    Client,
    InvalidArgumentError,
    NotFoundError,
    QuotaExceededError,
    SessionEndedError,
    ToolLoopError,
)
from sidecar import Sidecar
from tests.integration.test_sidecar_api import API_KEY, sidecar_config, sim_models

ORDER_TOOL = '/tool lookup_order {"order_id": "A1"}'


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=1) as provider:
        yield provider


@pytest.fixture
async def sidecar(sim: SimProvider) -> AsyncIterator[Sidecar]:
    async with Sidecar(sidecar_config(sim), sidecar_id="client-test") as s:
        yield s


def tool_posts(sim: SimProvider, tool: str) -> list[Any]:
    return [r.body for r in sim.received if r.path == f"/tools/{tool}"]


# --- the blocking client ----------------------------------------------------------------------


async def test_sync_chat_stream_call_tool_feedback(sidecar: Sidecar, sim: SimProvider) -> None:
    def agent() -> dict[str, Any]:
        with Client(sidecar.address) as client, client.session(user_id="u1", tenant_id="acme") as s:
            reply = s.chat([{"role": "user", "content": "Where is my order?"}])
            chunks = list(s.stream("And when does it arrive?"))
            tool = s.call_tool("lookup_order", {"order_id": "A1"})
            s.feedback("thumbs_up")
            s.feedback("score", 0.75)
            return {"reply": reply, "chunks": chunks, "tool": tool, "session": s.id, "version": s.version()}

    got = await asyncio.to_thread(agent)
    assert got["reply"].message.content.startswith("Simulated reply from sim-good")
    assert got["reply"].version_id and got["reply"].role == common_pb2.ROLE_STABLE
    *deltas, last = got["chunks"]
    assert deltas and all(c.content_delta for c in deltas)
    assert last.HasField("final") and last.final.message.content == "".join(c.content_delta for c in deltas)
    assert got["tool"].status_code == 200 and "A1" in json.dumps(got["tool"].result)
    assert tool_posts(sim, "lookup_order") == [{"order_id": "A1"}]
    assert got["version"].model == "sim-good"
    assert [t.name for t in got["version"].tools] == ["lookup_order", "echo"]
    bodies = [r.body for r in sim.received if r.path.endswith("/chat/completions")]
    assert bodies[0]["messages"][0]["role"] == "system"  # the version's prompt, not the agent's


async def test_sync_tool_loop_through_the_sidecar_and_local_tools(sidecar: Sidecar, sim: SimProvider) -> None:
    seen: list[dict[str, Any]] = []

    def local_lookup(args: dict[str, Any]) -> dict[str, Any]:
        seen.append(args)
        return {"order_id": args["order_id"], "status": "shipped"}

    def agent() -> tuple[Any, Any]:
        with Client(sidecar.address) as client, client.session(user_id="u2") as s:
            remote = s.run_tools(ORDER_TOOL)
            local = s.run_tools(ORDER_TOOL, tools={"lookup_order": local_lookup})
            return remote, local

    remote, local = await asyncio.to_thread(agent)
    assert remote.rounds == 2 and [r.name for r in remote.tool_results] == ["lookup_order"]
    assert not remote.tool_results[0].local and "A1" in json.dumps(remote.tool_results[0].result)
    assert remote.content.startswith("Simulated reply from sim-good to tool result")
    assert [m.role for m in remote.messages] == ["user", "assistant", "tool", "assistant"]
    assert remote.messages[2].tool_call_id == remote.messages[1].tool_calls[0].id
    assert tool_posts(sim, "lookup_order") == [{"order_id": "A1"}]  # the local run posted nothing
    assert seen == [{"order_id": "A1"}] and local.tool_results[0].local
    assert "shipped" in local.content


async def test_tool_loop_tells_the_model_about_bad_arguments_and_is_bounded(sidecar: Sidecar) -> None:
    def agent() -> tuple[Any, BaseException]:
        with Client(sidecar.address) as client, client.session() as s:
            fixed = s.run_tools('/tool lookup_order {"order_id": 5}')
            with pytest.raises(ToolLoopError) as bounded:
                s.run_tools(ORDER_TOOL, max_rounds=1)
            return fixed, bounded.value

    fixed, bounded = await asyncio.to_thread(agent)
    [result] = fixed.tool_results
    assert result.error and "order_id" in result.error  # the schema check names the field
    assert json.loads(fixed.messages[2].content) == {"error": result.error}
    assert fixed.content.startswith("Simulated reply")
    assert "no final answer after 1 rounds" in str(bounded)


async def test_errors_name_the_rpc_and_what_was_wrong(sidecar: Sidecar) -> None:
    def agent() -> tuple[BaseException, BaseException]:
        with Client(sidecar.address) as client, client.session() as s:
            with pytest.raises(NotFoundError) as missing:
                s.call_tool("launch_missiles", {})
            with pytest.raises(InvalidArgumentError) as bad:
                s.call_tool("lookup_order", {"order_id": 5})
            return missing.value, bad.value

    missing, bad = await asyncio.to_thread(agent)
    assert str(missing).startswith("CallTool: NOT_FOUND:") and "launch_missiles" in str(missing)
    assert str(bad).startswith("CallTool: INVALID_ARGUMENT:") and "order_id" in str(bad)


# --- asyncio ----------------------------------------------------------------------------------


async def test_async_chat_stream_tools_feedback(sidecar: Sidecar, sim: SimProvider) -> None:
    async def lookup(args: dict[str, Any]) -> str:
        return f"order {args['order_id']} is on its way"

    async with AsyncClient(sidecar.address) as client, await client.session(user_id="u3") as s:
        reply = await s.chat("Where is my order?")
        chunks = [c async for c in s.stream("When?")]
        tool = await s.call_tool("echo", {"x": [1, 2]})
        loop = await s.run_tools(ORDER_TOOL)
        local = await s.run_tools(ORDER_TOOL, tools={"lookup_order": lookup})
        await s.feedback("task_success")
    assert reply.message.content.startswith("Simulated reply from sim-good")
    assert chunks[-1].final.finish_reason == "stop" and chunks[0].content_delta
    assert tool.status_code == 200 and tool_posts(sim, "echo") == [{"x": [1, 2]}]
    assert loop.rounds == 2 and loop.content.startswith("Simulated reply from sim-good to tool result")
    assert local.tool_results[0].result == "order A1 is on its way" and "on its way" in local.content


async def test_an_abandoned_stream_ends_its_call(sidecar: Sidecar) -> None:
    async with AsyncClient(sidecar.address) as client, await client.session() as s:
        stream = s.stream("tell me a long story " * 5)
        async for chunk in stream:
            assert chunk.content_delta
            break
        await stream.aclose()  # type: ignore[attr-defined]
        assert (await s.chat("still there?")).message.content  # the session is usable


# --- quotas: retry-after within the deadline ----------------------------------------------------


@pytest.fixture
async def limited(sim: SimProvider) -> AsyncIterator[tuple[Sidecar, ManualClock]]:
    """Two requests per minute per user, on a clock the test moves: a refusal asks for 30 s."""
    clock = ManualClock(time.time())
    cfg = sidecar_config(sim, user_quotas={"requests_per_minute": 2})
    async with Sidecar(cfg, sidecar_id="client-quota", clock=clock) as s:
        yield s, clock


async def test_retry_after_is_honoured_within_the_deadline(limited: tuple[Sidecar, ManualClock]) -> None:
    sidecar, clock = limited
    waits: list[float] = []

    def wait(seconds: float) -> None:  # the client's sleep, on the sidecar's clock
        waits.append(seconds)
        clock.advance(seconds)

    def agent() -> Any:
        with Client(sidecar.address, timeout=60) as client, client.session(user_id="busy") as s:
            client._sleep = wait
            s.chat("one")
            s.chat("two")
            return s.chat("three")  # refused once, waited, answered

    reply = await asyncio.to_thread(agent)
    assert reply.message.content
    assert len(waits) == 1 and 20.0 <= waits[0] <= 31.0  # the sidecar's retry-after-ms


async def test_a_wait_past_the_deadline_gives_up_with_the_refusal(
    limited: tuple[Sidecar, ManualClock],
) -> None:
    sidecar, _ = limited
    waits: list[float] = []
    async with AsyncClient(sidecar.address, timeout=5) as client, await client.session(user_id="busy") as s:

        async def wait(seconds: float) -> None:
            waits.append(seconds)

        client._sleep = wait
        await s.chat("one")
        await s.chat("two")
        with pytest.raises(QuotaExceededError) as refused:
            await s.chat("three")
        with pytest.raises(QuotaExceededError):
            [c async for c in s.stream("four")]
    assert waits == []  # 30 s would pass the 5 s deadline: no wait, the original error
    error = refused.value
    assert error.retry_after_s is not None and 20.0 <= error.retry_after_s <= 31.0
    assert "user requests per minute" in str(error) and str(error).startswith("Chat: RESOURCE_EXHAUSTED")


# --- a drained session reopens at the next turn -------------------------------------------------


def rollout(sidecar: Sidecar, generation: int, phase: int, **fields: Any) -> None:
    ids = sidecar.config.version_ids()
    state = control_pb2.RolloutState(
        agent=sidecar.config.agent,
        generation=generation,
        rollout_id="r-client",
        stable_version_id=ids["v1"],
        candidate_version_id=ids["v2"],
        phase=phase,  # type: ignore[arg-type]
        **fields,
    )
    assert sidecar.router.apply(state)


async def test_a_drained_session_reopens_at_the_next_turn(sidecar: Sidecar) -> None:
    ids = sidecar.config.version_ids()
    rollout(sidecar, 1, control_pb2.ROLLOUT_PHASE_RUNNING, candidate_weight=1.0)
    async with AsyncClient(sidecar.address) as client, await client.session(user_id="u", tenant_id="t") as s:
        assert s.version_id == ids["v2"] and s.role == common_pb2.ROLE_CANARY
        first = s.id
        await s.chat("hello")
        retired = control_pb2.RetiredVersion(
            version_id=ids["v2"], drain_deadline_unix_nano=1, reason="rolled_back", rollout_id="r-client"
        )
        rollout(sidecar, 2, control_pb2.ROLLOUT_PHASE_ROLLED_BACK, retired=[retired])
        with pytest.raises(SessionEndedError) as ended:  # mid-turn: the caller decides
            await s.call_tool("echo", {})
        assert ended.value.reason == outrider.SESSION_DRAINED
        assert ended.value.metadata["version_id"] == ids["v2"]
        reply = await s.chat("hello again")  # the next turn: a new session, on stable
    assert s.reopened == 1 and s.id != first
    assert s.version_id == ids["v1"] and reply.version_id == ids["v1"]
    assert (s.info.session_id, s._request.user_id, s._request.tenant_id) == (s.id, "u", "t")


async def test_a_drained_sync_session_reopens_inside_chat(sidecar: Sidecar) -> None:
    ids = sidecar.config.version_ids()
    rollout(sidecar, 1, control_pb2.ROLLOUT_PHASE_RUNNING, candidate_weight=1.0)
    retired = control_pb2.RetiredVersion(version_id=ids["v2"], drain_deadline_unix_nano=1)

    def agent() -> tuple[str, Any, Any]:
        with Client(sidecar.address) as client, client.session(user_id="u") as s:
            before = s.version_id
            rollout(sidecar, 2, control_pb2.ROLLOUT_PHASE_ROLLED_BACK, retired=[retired])
            chunks = list(s.stream("hello"))  # refused before its first chunk: reopened, sent again
            return before, chunks[-1].final, s

    before, final, s = await asyncio.to_thread(agent)
    assert before == ids["v2"] and final.version_id == ids["v1"] and s.reopened == 1


# --- trace context ------------------------------------------------------------------------------


async def test_traceparent_from_the_current_span_parents_the_sidecars_spans(sidecar: Sidecar) -> None:
    exporter = InMemorySpanExporter()
    assert sidecar.tracer_provider is not None
    sidecar.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    agent_tracer = TracerProvider().get_tracer("test-agent")  # the agent's own, not the global one
    async with AsyncClient(sidecar.address) as client, await client.session() as s:
        with agent_tracer.start_as_current_span("agent turn") as turn:
            await s.chat("hello")
        await s.chat("untraced")
    ctx = turn.get_span_context()
    traced = [sp for sp in exporter.get_finished_spans() if sp.context.trace_id == ctx.trace_id]
    assert traced, [sp.name for sp in exporter.get_finished_spans()]
    assert any(sp.parent is not None and sp.parent.span_id == ctx.span_id for sp in traced)
    assert {sp.context.trace_id for sp in exporter.get_finished_spans()} - {ctx.trace_id}  # the other call
