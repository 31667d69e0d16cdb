"""Shadow mode end to end: a real Sidecar on port 0, the embedded broker carrying its signed
control state and its events, the simulated provider (sim-fast as stable, sim-divergent as the
candidate, sim-judge as the judge) and its tool server on loopback.

- in SHADOW, users get stable only; a sampled (sticky) share of stable sessions has each call
  mirrored to the candidate in the background, compared into ShadowRecord events;
- mirroring stops the moment the rollout leaves its shadow phase; a full queue drops and counts;
- a whole-trajectory shadow session (OpenSession shadow_of) runs read tools and intercepts write
  tools, which never reach the tool server;
- the judge scores pairs and stable answers only with content capture on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

import outrider
from devstack.broker import EmbeddedBroker
from devstack.simprovider import ModelBehavior, SimProvider, ToolBehavior
from outrider.v1 import common_pb2, control_pb2, events_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar, SidecarConfig
from sidecar._config import parse_config
from sidecar.shadow import arguments_sha256
from sidecar.telemetry._semconv import CAPTURE_CONTENT_ENV
from tests.integration.test_sidecar_api import API_KEY, expect_status, fresh_spill_dir
from tests.integration.test_sidecar_tracing import attrs, read_spans
from tests.support import TEST_SIGNER, signed_control

pytestmark = pytest.mark.broker

AGENT = "support-bot"
ROLLOUT = "r-shadow"
JUDGE_KEY_ENV = "TEST_JUDGE_KEY"
TOOL_ASK = [common_pb2.ChatMessage(role="user", content='/tool lookup_order {"order_id": "A1"}')]
QUESTION = [common_pb2.ChatMessage(role="user", content="Where is my order? It was due on Monday.")]
REFUND_RESPONSE = {"refund_id": "simulated", "status": "pending"}
TOOLS = {name: ToolBehavior() for name in ("lookup_order", "echo", "refund_order", "cancel_order")}


def _version(sim: SimProvider, model: str, prompt: str) -> dict[str, Any]:
    def tool(name: str, side_effects: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "endpoint": sim.tool_url(name),
            "timeout": "2s",
            "side_effects": side_effects,
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
            **extra,
        }

    return {
        "provider": {"name": "openai", "base_url": sim.base_url, "api_key_env": "TEST_SIM_KEY"},
        "model": model,
        "system_prompt": prompt,
        "parameters": {"temperature": 0.2, "max_tokens": 64},
        "request_timeout": "5s",
        "tools": [
            tool("lookup_order", "read", idempotent=True),
            tool("refund_order", "write", shadow_response=REFUND_RESPONSE),
            tool("cancel_order", "write"),
        ],
    }


def shadow_config(
    sim: SimProvider,
    kafka: str,
    *,
    top: dict[str, Any] | None = None,
    guards: dict[str, list[dict[str, str]]] | None = None,
    **shadow: Any,
) -> SidecarConfig:
    """v1 (stable) on sim-fast, v2 (the candidate) on sim-divergent, both with a read tool and
    two write tools (one with a scripted shadow_response)."""
    data: dict[str, Any] = {
        "agent": AGENT,
        "stable": "v1",
        "listen": "127.0.0.1:0",
        "metrics_port": None,  # never the fixed default: tests run side by side (xdist)
        "kafka": {"bootstrap_servers": kafka},
        "shutdown_grace": "2s",
        "telemetry": {"spill_dir": fresh_spill_dir()},
        "versions": {
            "v1": _version(sim, "sim-fast", "You are a helpful support agent."),
            "v2": _version(sim, "sim-divergent", "You are terse."),
        },
        "control": {"public_keys": [TEST_SIGNER.public_text()], "ready_timeout": "0s"},
        "shadow": shadow,
        **(top or {}),
    }
    for name, rules in (guards or {}).items():
        data["versions"][name]["guards"] = rules
    return parse_config(data, source="test.yaml").load_secrets({"TEST_SIM_KEY": API_KEY})


def judge_settings(sim: SimProvider) -> dict[str, Any]:
    return {
        "base_url": sim.base_url,
        "model": "sim-judge",
        "provider": "sim",
        "api_key_env": JUDGE_KEY_ENV,
        "pair_sample": 1.0,
        "evaluation_share": 1.0,
        "timeout_s": 5.0,
    }


def rollout(
    config: SidecarConfig,
    phase: int,
    generation: int,
    *,
    sample: float = 1.0,
    weight: float = 0.0,
) -> control_pb2.ControlMessage:
    ids = config.version_ids()
    return control_pb2.ControlMessage(
        rollout=control_pb2.RolloutState(
            agent=AGENT,
            epoch=1,
            generation=generation,
            rollout_id=ROLLOUT,
            stable_version_id=ids["v1"],
            candidate_version_id=ids["v2"],
            candidate_weight=weight,
            shadow_sample=sample,
            phase=phase,  # type: ignore[arg-type]
        )
    )


async def publish(sidecar: Sidecar, message: control_pb2.ControlMessage) -> None:
    """Publish a signed state on the control topic and wait until the sidecar applied it."""
    producer = AIOKafkaProducer(
        bootstrap_servers=sidecar.config.kafka.bootstrap_servers, enable_idempotence=False
    )
    await producer.start()
    try:
        key, value, headers = signed_control(message)
        await producer.send_and_wait(outrider.CONTROL_TOPIC, value, key=key, headers=headers)
    finally:
        await producer.stop()
    generation = message.rollout.generation
    await eventually(lambda: sidecar.router.generation == generation, what=f"generation {generation}")


async def eventually(predicate: Callable[[], bool], within: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    return sidecar.metrics.registry.get_sample_value(name, labels or None) or 0.0


class EventTail:
    """Everything on `outrider.events`, read from the start (the sidecars' version reports left out)."""

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self._consumer: AIOKafkaConsumer | None = None
        self.events: list[events_pb2.Event] = []

    async def poll(self) -> None:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                outrider.EVENTS_TOPIC,
                bootstrap_servers=self._bootstrap,
                group_id=None,
                auto_offset_reset="earliest",
                metadata_max_age_ms=500,
            )
            await consumer.start()
            self._consumer = consumer
        batches = await self._consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for record in records:
                event = outrider.decode_event(record.value, list(record.headers))
                if event.WhichOneof("body") != "versions_report":
                    self.events.append(event)

    def of(self, body: str) -> list[events_pb2.Event]:
        return [e for e in self.events if e.WhichOneof("body") == body]

    async def until(
        self, predicate: Callable[[EventTail], bool], within: float = 15.0, what: str = "events"
    ) -> None:
        deadline = time.monotonic() + within
        while not predicate(self):
            if time.monotonic() > deadline:
                kinds = [e.WhichOneof("body") for e in self.events]
                raise AssertionError(f"timed out waiting for {what}; have {kinds}")
            await self.poll()

    async def settle(self, seconds: float = 0.8) -> None:
        """Read whatever else arrives in the next `seconds` (to check nothing more does)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await self.poll()

    async def aclose(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(api_key=API_KEY, tools=TOOLS, seed=12) as provider:  # default models
        yield provider


@pytest.fixture
async def tail(broker: EmbeddedBroker) -> AsyncIterator[EventTail]:
    events = EventTail(broker.bootstrap_servers)
    try:
        yield events
    finally:
        await events.aclose()


async def sim_stats(sim: SimProvider) -> dict[str, Any]:
    """The sim's own call counts, over its HTTP API."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(sim.base_url.removesuffix("/v1") + "/_sim/stats") as r,
    ):
        assert r.status == 200
        stats: dict[str, Any] = await r.json()
        return stats


def requests_of(stats: dict[str, Any], section: str, name: str) -> int:
    entry = stats[section].get(name)
    return int(entry["requests"]) if entry else 0


async def chat(stub: sidecar_pb2_grpc.SidecarStub, sid: str, messages: Any) -> sidecar_pb2.ChatResponse:
    return await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=messages))


async def chat_stream(
    stub: sidecar_pb2_grpc.SidecarStub, sid: str, messages: Any
) -> sidecar_pb2.ChatResponse:
    chunks = [c async for c in stub.ChatStream(sidecar_pb2.ChatRequest(session_id=sid, messages=messages))]
    assert chunks[-1].HasField("final")
    return chunks[-1].final


class Running:
    """A started sidecar, a stub on it, and the v1/v2 version ids."""

    def __init__(self, sidecar: Sidecar, stub: sidecar_pb2_grpc.SidecarStub) -> None:
        self.sidecar = sidecar
        self.stub = stub
        ids = sidecar.config.version_ids()
        self.v1, self.v2 = ids["v1"], ids["v2"]


@asynccontextmanager
async def running(config: SidecarConfig) -> AsyncIterator[Running]:
    async with (
        Sidecar(config, sidecar_id="sc-shadow") as sidecar,
        grpc.aio.insecure_channel(sidecar.address) as channel,
    ):
        yield Running(sidecar, sidecar_pb2_grpc.SidecarStub(channel))


# mirrored calls


async def test_shadow_mirrors_each_stable_call_and_users_get_stable_only(
    broker: EmbeddedBroker, sim: SimProvider, tail: EventTail
) -> None:
    config = shadow_config(sim, broker.bootstrap_servers)
    async with running(config) as run:
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1))
        assert run.sidecar.router.shadow_target() is not None
        sessions = [await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest()) for _ in range(5)]
        assert {(s.version_id, s.role, s.rollout_id) for s in sessions} == {
            (run.v1, common_pb2.ROLE_STABLE, ROLLOUT)
        }
        sid = sessions[0].session_id
        unary = await chat(run.stub, sid, TOOL_ASK)
        streamed = await chat_stream(run.stub, sid, TOOL_ASK)
        for response in (unary, streamed):  # the user's answer is stable's, untouched
            assert response.model == "sim-fast" and response.version_id == run.v1
            assert response.role == common_pb2.ROLE_STABLE
            assert [c.name for c in response.message.tool_calls] == ["lookup_order"]
        await tail.until(lambda t: len(t.of("shadow")) >= 2, what="two ShadowRecords")
        await tail.settle()
        stats = await sim_stats(sim)

    assert requests_of(stats, "models", "sim-divergent") == 2  # the mirrored calls, nothing else
    assert requests_of(stats, "models", "sim-fast") == 2
    chats = tail.of("call")
    assert len(chats) == 2 and {e.version_id for e in chats} == {run.v1}
    assert {e.role for e in chats} == {common_pb2.ROLE_STABLE}
    shadows = tail.of("shadow")
    assert len(shadows) == 2
    assert sorted(e.shadow.operation for e in shadows) == ["chat", "chat_stream"]
    for event in shadows:
        record = event.shadow
        assert event.role == common_pb2.ROLE_SHADOW
        assert event.version_id == run.v2
        assert event.rollout_id == ROLLOUT
        assert event.session_id == chats[0].session_id  # the stable session's
        assert record.stable_version_id == run.v1
        assert record.outcome == events_pb2.OUTCOME_OK and record.stable_outcome == events_pb2.OUTCOME_OK
        assert not record.tools_agree
        assert "tool_calls[0].name" in record.differing_fields
        assert record.stable_tool_calls == 1 and record.candidate_tool_calls == 1
        assert record.candidate_latency_ms > 0 and record.candidate_input_tokens > 0
        assert record.pair_id
    assert not tail.of("judge")  # no judge configured


async def test_shadow_sample_zero_mirrors_nothing(
    broker: EmbeddedBroker, sim: SimProvider, tail: EventTail
) -> None:
    config = shadow_config(sim, broker.bootstrap_servers)
    async with running(config) as run:
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1, sample=0.0))
        for _ in range(4):
            session = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest())
            assert session.version_id == run.v1
            await chat(run.stub, session.session_id, QUESTION)
        await tail.until(lambda t: len(t.of("call")) >= 4, what="four ChatRecords")
        await tail.settle()
        assert run.sidecar.shadow is not None and run.sidecar.shadow.work.depth == 0
    assert sim.requests("sim-divergent") == 0
    assert not tail.of("shadow")


async def test_shadow_sampling_is_sticky_per_session(
    broker: EmbeddedBroker, sim: SimProvider, tail: EventTail
) -> None:
    config = shadow_config(sim, broker.bootstrap_servers, queue_size=128)
    sessions, calls = 16, 3
    async with running(config) as run:
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1, sample=0.5))
        for _ in range(sessions):
            session = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest())
            for _ in range(calls):
                await chat(run.stub, session.session_id, QUESTION)
        await tail.until(lambda t: len(t.of("call")) >= sessions * calls, what="every ChatRecord")
        shadow = run.sidecar.shadow
        assert shadow is not None
        await eventually(lambda: shadow.work.depth == 0 and shadow.work.running == 0, what="idle")
        mirrored = int(sample(run.sidecar, "outrider_sidecar_shadow_calls_total", outcome="ok"))
        await tail.until(lambda t: len(t.of("shadow")) >= mirrored, what="every ShadowRecord")
        await tail.settle(0.5)
    per_session: dict[str, int] = {}
    for event in tail.of("shadow"):
        per_session[event.session_id] = per_session.get(event.session_id, 0) + 1
    # a session sampled in is mirrored on every call; the others on none (2**-15 odds of all or none)
    assert set(per_session.values()) == {calls}, per_session
    assert 0 < len(per_session) < sessions
    assert sim.requests("sim-divergent") == calls * len(per_session)


@pytest.mark.parametrize(
    "phase",
    [control_pb2.ROLLOUT_PHASE_RUNNING, control_pb2.ROLLOUT_PHASE_ABORTED],
    ids=["running", "aborted"],
)
async def test_shadow_mirroring_stops_when_the_rollout_leaves_shadow(
    broker: EmbeddedBroker, sim: SimProvider, tail: EventTail, phase: int
) -> None:
    sim.set_model(
        "sim-divergent",
        ModelBehavior(latency_ms=3000, tool_rename={"lookup_order": "search_orders"}, reply_style="reworded"),
    )
    config = shadow_config(sim, broker.bootstrap_servers, concurrency=1, queue_size=8)
    async with running(config) as run:
        shadow = run.sidecar.shadow
        assert shadow is not None
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1))
        session = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest())
        for _ in range(4):
            await chat(run.stub, session.session_id, QUESTION)
        await eventually(lambda: shadow.work.running == 1, what="one mirrored call running")
        await eventually(lambda: sim.requests("sim-divergent") == 1, what="it reached the candidate")
        assert shadow.work.depth == 3
        await publish(run.sidecar, rollout(config, phase, 2))
        # the listener ran with the state: nothing waits any more, the running call is cancelled
        assert shadow.work.depth == 0
        assert sample(run.sidecar, "outrider_sidecar_shadow_dropped_total", reason="rollout_ended") == 4
        await eventually(lambda: shadow.work.running == 0, within=2.0, what="the running call cancelled")
        assert run.sidecar.router.shadow_target() is None
        # the old stable session keeps being served by stable, and is not mirrored any more
        response = await chat(run.stub, session.session_id, QUESTION)
        assert response.version_id == run.v1 and response.model == "sim-fast"
        await tail.until(lambda t: len(t.of("call")) >= 5, what="five ChatRecords")
        await tail.settle()
        assert shadow.work.depth == 0 and shadow.work.running == 0
    assert sim.requests("sim-divergent") == 1  # the one cancelled on its way
    assert not tail.of("shadow")
    assert sample(run.sidecar, "outrider_sidecar_shadow_calls_total", outcome="ok") == 0


async def test_shadow_full_queue_drops_and_counts_without_slowing_users(
    broker: EmbeddedBroker, sim: SimProvider
) -> None:
    slow_ms = 2500.0
    sim.set_model("sim-divergent", ModelBehavior(latency_ms=slow_ms, reply_style="reworded"))
    config = shadow_config(sim, broker.bootstrap_servers, concurrency=1, queue_size=1)
    async with running(config) as run:
        shadow = run.sidecar.shadow
        assert shadow is not None
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1))
        session = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest())
        await chat(run.stub, session.session_id, QUESTION)
        await eventually(lambda: shadow.work.running == 1, what="the first mirrored call running")
        latencies = []
        for _ in range(5):
            began = time.monotonic()
            response = await chat(run.stub, session.session_id, QUESTION)
            latencies.append(time.monotonic() - began)
            assert response.model == "sim-fast"
        # one waits in the queue of one, the other four are dropped and counted
        assert shadow.work.depth == 1
        assert sample(run.sidecar, "outrider_sidecar_shadow_dropped_total", reason="queue_full") == 4
        # no user call waited for the slow candidate
        assert max(latencies) < slow_ms / 1000.0, latencies


async def test_shadow_calls_beyond_their_global_quota_share_are_dropped(
    broker: EmbeddedBroker, sim: SimProvider, tail: EventTail
) -> None:
    """The candidate's model has a global quota: mirrored calls get at most `max_tpm_share` of
    it, the rest are dropped and counted as quota (no ShadowRecord), users never notice."""
    quota = {"openai/sim-divergent": {"safe_share_tpm": 10000, "usage_window": "60s"}}
    config = shadow_config(sim, broker.bootstrap_servers, top={"global_quotas": quota}, max_tpm_share=0.01)
    async with running(config) as run:
        shadow = run.sidecar.shadow
        assert shadow is not None
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1))
        session = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest())
        for _ in range(4):
            response = await chat(run.stub, session.session_id, QUESTION)
            assert response.model == "sim-fast"
            await eventually(lambda: shadow.work.depth == 0 and shadow.work.running == 0, what="idle")
        refused = sample(run.sidecar, "outrider_sidecar_shadow_dropped_total", reason="quota")
        mirrored = sample(run.sidecar, "outrider_sidecar_shadow_calls_total", outcome="ok")
        # 1 % of 10000 tokens: a mirrored call (~80 tokens estimated, settled to what it used)
        # fits, then the budget is spent and the others are refused
        assert mirrored >= 1 and refused >= 1 and mirrored + refused == 4
        await tail.until(lambda t: len(t.of("call")) >= 4 and len(t.of("shadow")) >= mirrored, what="events")
        await tail.settle(0.5)
    assert sim.requests("sim-divergent") == mirrored
    assert len(tail.of("shadow")) == mirrored


async def test_shadow_candidate_failure_is_recorded_and_the_user_is_unaffected(
    broker: EmbeddedBroker, sim: SimProvider, tail: EventTail
) -> None:
    sim.set_model("sim-divergent", ModelBehavior(error_rate=1.0, error_status=400))
    config = shadow_config(sim, broker.bootstrap_servers)
    async with running(config) as run:
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1))
        session = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest())
        response = await chat(run.stub, session.session_id, QUESTION)
        assert response.model == "sim-fast" and response.finish_reason == "stop"
        await tail.until(lambda t: len(t.of("shadow")) >= 1, what="a ShadowRecord")
        assert sample(run.sidecar, "outrider_sidecar_shadow_calls_total", outcome="error") == 1
    [event] = tail.of("shadow")
    record = event.shadow
    assert record.outcome == events_pb2.OUTCOME_ERROR and record.error_class
    assert record.stable_outcome == events_pb2.OUTCOME_OK
    assert record.divergent
    assert [e.call.outcome for e in tail.of("call")] == [events_pb2.OUTCOME_OK]


async def test_shadow_session_skips_user_quotas(broker: EmbeddedBroker, sim: SimProvider) -> None:
    config = shadow_config(sim, broker.bootstrap_servers, top={"user_quotas": {"requests_per_minute": 1}})
    async with running(config) as run:
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1, sample=0.0))
        stable = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="u1"))
        await chat(run.stub, stable.session_id, QUESTION)
        await expect_status(
            chat(run.stub, stable.session_id, QUESTION), grpc.StatusCode.RESOURCE_EXHAUSTED, "user"
        )
        shadow = await run.stub.OpenSession(
            sidecar_pb2.OpenSessionRequest(user_id="u1", shadow_of=stable.session_id)
        )
        for _ in range(3):  # not the user's calls: not the user's quota
            assert (await chat(run.stub, shadow.session_id, QUESTION)).model == "sim-divergent"
        # and they took nothing from it either: the user is still refused, not more so
        await expect_status(
            chat(run.stub, stable.session_id, QUESTION), grpc.StatusCode.RESOURCE_EXHAUSTED, "user"
        )


# whole-trajectory shadow sessions


@pytest.mark.parametrize("capture", [False, True], ids=["no-capture", "capture"])
async def test_shadow_session_intercepts_write_tools_and_runs_read_tools(
    broker: EmbeddedBroker, sim: SimProvider, tail: EventTail, monkeypatch: pytest.MonkeyPatch, capture: bool
) -> None:
    if capture:
        monkeypatch.setenv(CAPTURE_CONTENT_ENV, "true")
    else:
        monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
    config = shadow_config(sim, broker.bootstrap_servers)
    refund_args = '{"order_id": "A1",  "amount": 12}'
    async with running(config) as run:
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1, sample=0.0))
        stable = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="u1"))
        shadow = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest(shadow_of=stable.session_id))
        assert shadow.role == common_pb2.ROLE_SHADOW
        assert shadow.version_id == run.v2 and shadow.rollout_id == ROLLOUT
        sid = shadow.session_id

        replied = await chat(run.stub, sid, TOOL_ASK)  # the candidate answers the shadow session
        assert replied.model == "sim-divergent" and replied.role == common_pb2.ROLE_SHADOW
        streamed = await chat_stream(run.stub, sid, TOOL_ASK)
        assert streamed.model == "sim-divergent" and streamed.version_id == run.v2
        refund = await run.stub.CallTool(
            sidecar_pb2.CallToolRequest(session_id=sid, tool_name="refund_order", arguments_json=refund_args)
        )
        assert refund.intercepted and refund.status_code == 200
        assert json.loads(refund.result_json) == REFUND_RESPONSE
        assert refund.version_id == run.v2
        cancel = await run.stub.CallTool(
            sidecar_pb2.CallToolRequest(
                session_id=sid, tool_name="cancel_order", arguments_json='{"order_id": "A1"}'
            )
        )
        assert cancel.intercepted and cancel.result_json == "{}"
        lookup = await run.stub.CallTool(
            sidecar_pb2.CallToolRequest(
                session_id=sid, tool_name="lookup_order", arguments_json='{"order_id": "A1"}'
            )
        )
        assert not lookup.intercepted and json.loads(lookup.result_json)["status"] == "shipped"
        stats = await sim_stats(sim)
        assert requests_of(stats, "tools", "refund_order") == 0
        assert requests_of(stats, "tools", "cancel_order") == 0
        assert requests_of(stats, "tools", "lookup_order") == 1

        # the same write tool in the stable session runs
        ran = await run.stub.CallTool(
            sidecar_pb2.CallToolRequest(
                session_id=stable.session_id, tool_name="refund_order", arguments_json=refund_args
            )
        )
        assert not ran.intercepted and json.loads(ran.result_json)["tool"] == "refund_order"
        assert sim.tool_requests("refund_order") == 1
        assert sample(run.sidecar, "outrider_sidecar_shadow_intercepted_total", tool="refund_order") == 1
        assert sample(run.sidecar, "outrider_sidecar_shadow_intercepted_total", tool="cancel_order") == 1
        await tail.until(lambda t: len(t.of("tool")) >= 4, what="four ToolRecords")
        await tail.settle(0.5)

    tools = tail.of("tool")
    by_name = {(e.tool.tool_name, e.role): e for e in tools}
    intercepted = by_name["refund_order", common_pb2.ROLE_SHADOW]
    record = intercepted.tool
    assert record.intercepted and record.side_effects == "write"
    assert intercepted.version_id == run.v2 and intercepted.rollout_id == ROLLOUT
    assert record.arguments_sha256 == arguments_sha256(refund_args)
    assert len(record.arguments_sha256) == 64
    assert record.arguments_json == (refund_args if capture else "")
    assert by_name["cancel_order", common_pb2.ROLE_SHADOW].tool.intercepted
    read = by_name["lookup_order", common_pb2.ROLE_SHADOW].tool
    assert not read.intercepted and read.arguments_sha256 == "" and read.arguments_json == ""
    executed = by_name["refund_order", common_pb2.ROLE_STABLE].tool
    assert not executed.intercepted and executed.arguments_sha256 == ""
    # a shadow session's own chat is not mirrored again
    assert not tail.of("shadow")
    # the tool spans say what happened: simulate for the intercepted writes, execute otherwise
    spans, _ = await read_spans(broker.bootstrap_servers, 256, within=4.0)
    dispositions = sorted(
        (a.get("gen_ai.tool.name"), a.get("gen_ai.tool.call.disposition"), a.get("outrider.tool.intercepted"))
        for a in map(attrs, spans)
        if "gen_ai.tool.call.disposition" in a
    )
    assert dispositions == [
        ("cancel_order", "simulate", True),
        ("lookup_order", "execute", None),
        ("refund_order", "execute", None),
        ("refund_order", "simulate", True),
    ]


async def test_shadow_of_without_a_shadow_rollout_or_with_a_bad_token_is_refused(
    broker: EmbeddedBroker, sim: SimProvider
) -> None:
    config = shadow_config(sim, broker.bootstrap_servers)
    async with running(config) as run:
        stable = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest())
        await expect_status(
            run.stub.OpenSession(sidecar_pb2.OpenSessionRequest(shadow_of=stable.session_id)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "shadow_of",
            "shadow phase",
        )
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_RUNNING, 1, weight=0.5))
        await expect_status(
            run.stub.OpenSession(sidecar_pb2.OpenSessionRequest(shadow_of=stable.session_id)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "shadow_of",
        )
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 2))
        for garbage in ("not-a-token", stable.session_id[:-4] + "AAAA", "a.b.c"):
            await expect_status(
                run.stub.OpenSession(sidecar_pb2.OpenSessionRequest(shadow_of=garbage)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "shadow_of",
            )
        opened = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest(shadow_of=stable.session_id))
        assert opened.role == common_pb2.ROLE_SHADOW


# the judge


async def test_judge_scores_mirrored_pairs_and_stable_answers(
    broker: EmbeddedBroker, sim: SimProvider, tail: EventTail, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "true")
    monkeypatch.setenv(JUDGE_KEY_ENV, API_KEY)
    config = shadow_config(sim, broker.bootstrap_servers, judge=judge_settings(sim))
    async with running(config) as run:
        assert run.sidecar.shadow is not None and run.sidecar.shadow.judge is not None
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1))
        session = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest())
        for _ in range(2):
            response = await chat(run.stub, session.session_id, QUESTION)
            assert response.model == "sim-fast"
        await tail.until(
            lambda t: len(t.of("shadow")) >= 2 and len(t.of("judge")) >= 4, what="2 pairs and 2 singles"
        )
        await tail.settle()

    assert sim.requests("sim-judge") == 4
    shadows = {e.shadow.pair_id: e for e in tail.of("shadow")}
    judged = tail.of("judge")
    pairs = [e for e in judged if e.judge.kind == "pair"]
    singles = [e for e in judged if e.judge.kind == "single"]
    assert len(pairs) == 2 and len(singles) == 2
    for event in pairs:
        verdict = event.judge
        assert event.version_id == run.v2 and event.role == common_pb2.ROLE_SHADOW
        assert event.rollout_id == ROLLOUT
        assert verdict.parsed and verdict.outcome == events_pb2.OUTCOME_OK
        assert verdict.judge == "sim/sim-judge"
        assert verdict.score == pytest.approx(0.3) and verdict.stable_score == pytest.approx(0.8)
        assert verdict.preference == "stable"
        assert verdict.pair_id in shadows  # the pair's ShadowRecord carries the same id
        assert event.session_id == shadows[verdict.pair_id].session_id
    for event in singles:
        assert event.version_id == run.v1 and event.role == common_pb2.ROLE_STABLE
        assert event.judge.parsed and event.judge.score == pytest.approx(0.8)
        assert not event.judge.pair_id
    assert sample(run.sidecar, "outrider_sidecar_judge_calls_total", kind="pair", result="parsed") == 2
    assert sample(run.sidecar, "outrider_sidecar_judge_calls_total", kind="single", result="parsed") == 2


async def test_judge_always_scores_divergent_pairs(
    broker: EmbeddedBroker, sim: SimProvider, tail: EventTail, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pair_sample 0 and no continuous evaluation: only the divergent pair (tools differ) is judged."""
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "true")
    monkeypatch.setenv(JUDGE_KEY_ENV, API_KEY)
    judge = judge_settings(sim) | {"pair_sample": 0.0, "evaluation_share": 0.0}
    # a candidate that answers like stable (same words, same tools) but for the tool command
    sim.set_model("sim-divergent", ModelBehavior(tool_rename={"lookup_order": "search_orders"}))
    config = shadow_config(sim, broker.bootstrap_servers, judge=judge)
    async with running(config) as run:
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1))
        session = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest())
        await chat(run.stub, session.session_id, TOOL_ASK)
        await tail.until(lambda t: len(t.of("shadow")) >= 1 and len(t.of("judge")) >= 1, what="a verdict")
        shadow = run.sidecar.shadow
        assert shadow is not None
        await eventually(lambda: shadow.work.running == 0, what="idle")
        await tail.settle(0.5)
    [pair] = tail.of("shadow")
    assert pair.shadow.divergent and not pair.shadow.tools_agree
    [verdict] = tail.of("judge")
    assert verdict.judge.kind == "pair" and verdict.judge.divergent
    assert verdict.judge.pair_id == pair.shadow.pair_id
    assert sim.requests("sim-judge") == 1


async def test_judge_sees_answers_only_as_each_versions_guards_leave_them(
    broker: EmbeddedBroker, sim: SimProvider, tail: EventTail, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both versions redact e-mail addresses and the candidate blocks secrets: the judge gets no
    answer with an address in it, and a candidate answer its guards block is the candidate's error (as it
    would be for a user), not an empty success, and is not judged."""
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "true")
    monkeypatch.setenv(JUDGE_KEY_ENV, API_KEY)
    sim.set_model("sim-divergent", ModelBehavior(reply_prefix="Sure. "))  # echoes like stable
    redact = {"guard": "pii.email", "action": "redact"}
    guards = {"v1": [redact], "v2": [redact, {"guard": "secret", "action": "block"}]}
    config = shadow_config(
        sim, broker.bootstrap_servers, guards=guards, judge=judge_settings(sim) | {"evaluation_share": 0.0}
    )
    secret = "sk-abcdefghijklmnopqrstuvwxyz0123456789"
    async with running(config) as run:
        await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1))
        session = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest())
        mail = [common_pb2.ChatMessage(role="user", content="mail me at jane.doe@example.com please")]
        reply = await chat(run.stub, session.session_id, mail)
        assert "jane.doe" not in reply.message.content
        await tail.until(lambda t: len(t.of("judge")) >= 1, what="the pair's verdict")
        leaky = [common_pb2.ChatMessage(role="user", content=f"my key is {secret}")]
        reply = await chat(run.stub, session.session_id, leaky)  # stable has no secret guard
        assert secret in reply.message.content
        await tail.until(lambda t: len(t.of("shadow")) >= 2, what="two ShadowRecords")
        shadow = run.sidecar.shadow
        assert shadow is not None
        await eventually(lambda: shadow.work.running == 0 and shadow.work.depth == 0, what="idle")
        await tail.settle(0.5)
    judge_bodies = [json.dumps(r.body) for r in sim.received if r.body.get("model") == "sim-judge"]
    assert len(judge_bodies) == 1  # the e-mail pair; the blocked one is not judged
    # PII guards watch the output: the conversation is as stable's provider got it, each answer
    # as its version's guards left it
    answers = judge_bodies[0].split("[End of Conversation]", 1)[1]
    assert "jane.doe" not in answers and answers.count("[REDACTED:pii.email]") == 2
    emailed, blocked = sorted(tail.of("shadow"), key=lambda e: e.sequence)
    assert emailed.shadow.outcome == events_pb2.OUTCOME_OK
    assert blocked.shadow.outcome == events_pb2.OUTCOME_ERROR
    assert blocked.shadow.error_class == "guard_blocked_output"
    assert blocked.shadow.candidate_output_tokens > 0  # it was answered (and paid for), then blocked
    assert sample(run.sidecar, "outrider_sidecar_shadow_calls_total", outcome="error") == 1


async def test_judge_stays_off_without_content_capture(
    broker: EmbeddedBroker,
    sim: SimProvider,
    tail: EventTail,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
    monkeypatch.setenv(JUDGE_KEY_ENV, API_KEY)
    config = shadow_config(sim, broker.bootstrap_servers, judge=judge_settings(sim))
    with caplog.at_level(logging.WARNING, logger="sidecar"):
        async with running(config) as run:
            assert run.sidecar.shadow is not None and run.sidecar.shadow.judge is None
            await publish(run.sidecar, rollout(config, control_pb2.ROLLOUT_PHASE_SHADOW, 1))
            session = await run.stub.OpenSession(sidecar_pb2.OpenSessionRequest())
            for _ in range(2):
                await chat(run.stub, session.session_id, QUESTION)
            await tail.until(lambda t: len(t.of("shadow")) >= 2, what="two ShadowRecords")
            await tail.settle()
            stats = await sim_stats(sim)
    assert requests_of(stats, "models", "sim-judge") == 0
    assert not tail.of("judge")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("shadow.judge" in m and CAPTURE_CONTENT_ENV in m for m in warnings), warnings
