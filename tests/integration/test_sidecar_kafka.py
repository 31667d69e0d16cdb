"""The sidecar against the embedded Kafka-protocol broker: one event per call on
`outrider.events`, rollout states from `outrider.control` steering new sessions, and
serving (and counting drops) while Kafka is unreachable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

import outrider
from devstack.broker import EmbeddedBroker
from devstack.simprovider import ModelBehavior, SimProvider
from outrider.v1 import common_pb2, control_pb2, events_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from tests.integration.test_sidecar_api import API_KEY, USER, open_session, sidecar_config, sim_models
from tests.support import TEST_SIGNER, signed_control

pytestmark = pytest.mark.broker


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=3) as provider:
        yield provider


async def eventually(predicate: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def read_events(bootstrap: str, count: int, within: float = 10.0) -> list[events_pb2.Event]:
    """The events on the topic, but the sidecars' own `VersionsReport`s (sent at start and on
    every change of the version set, not per call)."""
    return [
        e for e in await _read_events(bootstrap, count, within) if e.WhichOneof("body") != "versions_report"
    ]


async def _read_events(bootstrap: str, count: int, within: float) -> list[events_pb2.Event]:
    consumer = AIOKafkaConsumer(
        outrider.EVENTS_TOPIC,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        metadata_max_age_ms=500,
    )
    await consumer.start()
    events: list[events_pb2.Event] = []
    try:
        deadline = time.monotonic() + within
        while len(events) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    assert record.key == outrider.agent_key("support-bot")
                    event = outrider.decode_event(record.value, list(record.headers))
                    if event.WhichOneof("body") != "versions_report":
                        events.append(event)
        # anything beyond `count` would be a duplicate or a stray event
        batches = await consumer.getmany(timeout_ms=300)
        for records in batches.values():
            events.extend(outrider.decode_event(r.value, list(r.headers)) for r in records)
    finally:
        await consumer.stop()
    return events


async def test_each_call_produces_exactly_one_event(broker: EmbeddedBroker, sim: SimProvider) -> None:
    config = sidecar_config(sim, kafka=broker.bootstrap_servers, metrics_port=None)
    async with (
        Sidecar(config, sidecar_id="sc-1") as sidecar,
        grpc.aio.insecure_channel(sidecar.address) as ch,
    ):
        stub = sidecar_pb2_grpc.SidecarStub(ch)
        session = await open_session(stub, user_id="u1")
        sid = session.session_id
        await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
        _ = [c async for c in stub.ChatStream(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))]
        await stub.CallTool(
            sidecar_pb2.CallToolRequest(
                session_id=sid, tool_name="lookup_order", arguments_json='{"order_id": "A1"}'
            )
        )
        await stub.Feedback(
            sidecar_pb2.FeedbackRequest(session_id=sid, kind=sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN)
        )
        sim.set_model("sim-good", ModelBehavior(error_rate=1.0, error_status=502))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
        await eventually(
            lambda: sample(sidecar, "outrider_sidecar_telemetry_sent_total") >= 5, what="5 events sent"
        )

    events = await read_events(broker.bootstrap_servers, 5)
    assert len(events) == 5
    assert len({e.event_id for e in events}) == 5
    nonce = events[0].session_id
    for event in events:
        assert event.agent == "support-bot"
        assert event.version_id == session.version_id
        assert event.role == common_pb2.ROLE_STABLE
        assert event.sidecar_id == "sc-1"
        assert event.session_id == nonce and nonce and nonce not in sid.split(".")[1]
        assert len(event.session_id) < 40  # the nonce, not the whole token
        assert abs(event.time_unix_nano / 1e9 - time.time()) < 60
    chat, stream, tool, feedback, failed = events
    assert chat.call.operation == "chat" and chat.call.outcome == events_pb2.OUTCOME_OK
    assert chat.call.model == "sim-good" and chat.call.provider == "openai"
    assert chat.call.input_tokens > 0 and chat.call.output_tokens > 0 and chat.call.latency_ms > 0
    assert stream.call.operation == "chat_stream" and stream.call.outcome == events_pb2.OUTCOME_OK
    assert 0 < stream.call.time_to_first_token_ms <= stream.call.latency_ms
    assert stream.call.output_tokens > 0
    assert tool.tool.tool_name == "lookup_order" and tool.tool.outcome == events_pb2.OUTCOME_OK
    assert tool.tool.status_code == 200
    assert feedback.feedback.kind == sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN
    assert failed.call.outcome == events_pb2.OUTCOME_ERROR and failed.call.error_class == "provider_5xx"


def rollout(
    generation: int,
    phase: int,
    *,
    stable: str,
    candidate: str,
    weight: float = 0.0,
    agent: str = "support-bot",
    rollout_id: str = "r-1",
) -> control_pb2.ControlMessage:
    return control_pb2.ControlMessage(
        rollout=control_pb2.RolloutState(
            agent=agent,
            generation=generation,
            rollout_id=rollout_id,
            stable_version_id=stable,
            candidate_version_id=candidate,
            candidate_weight=weight,
            phase=phase,  # type: ignore[arg-type]
            sticky_by=common_pb2.STICKY_BY_SESSION,
        )
    )


async def test_control_records_steer_new_sessions_only(broker: EmbeddedBroker, sim: SimProvider) -> None:
    config = sidecar_config(sim, kafka=broker.bootstrap_servers, metrics_port=None)
    v1, v2 = config.version_ids()["v1"], config.version_ids()["v2"]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    await producer.start()

    async def send(message: control_pb2.ControlMessage | bytes, agent: str = "support-bot") -> None:
        if isinstance(message, bytes):
            key = outrider.rollout_key(agent)
            value, headers = message, TEST_SIGNER.sign(key, message)
        else:
            key, value, headers = signed_control(message)
        await producer.send_and_wait(outrider.CONTROL_TOPIC, value, key=key, headers=headers)

    try:
        # a state already on the topic before the sidecar starts is picked up from the beginning
        await send(rollout(1, control_pb2.ROLLOUT_PHASE_RUNNING, stable=v1, candidate=v2, weight=0.0))
        async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as ch:
            stub = sidecar_pb2_grpc.SidecarStub(ch)
            await eventually(lambda: sidecar.router.generation == 1, what="generation 1")
            old = await open_session(stub)
            assert old.version_id == v1 and old.role == common_pb2.ROLE_STABLE and old.rollout_id == "r-1"

            await send(b"\x00garbage")
            await send(
                rollout(
                    9,
                    control_pb2.ROLLOUT_PHASE_RUNNING,
                    stable=v1,
                    candidate=v2,
                    weight=1.0,
                    agent="other-bot",
                ),
                agent="other-bot",
            )
            await send(rollout(2, control_pb2.ROLLOUT_PHASE_RUNNING, stable=v1, candidate=v2, weight=1.0))
            await eventually(lambda: sidecar.router.generation == 2, what="generation 2")
            assert sample(sidecar, "outrider_sidecar_control_undecodable_total") == 1
            assert sample(sidecar, "outrider_control_rejected_total", reason="undecodable") == 1
            assert sample(sidecar, "outrider_sidecar_rollout_generation", agent="support-bot") == 2
            assert sample(sidecar, "outrider_sidecar_candidate_weight", agent="support-bot") == 1.0
            assert (
                sample(sidecar, "outrider_sidecar_rollout_phase", agent="support-bot", phase="running") == 1
            )

            canary = await open_session(stub)
            assert canary.version_id == v2 and canary.role == common_pb2.ROLE_CANARY
            reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=canary.session_id, messages=USER))
            assert reply.version_id == v2 and reply.role == common_pb2.ROLE_CANARY
            assert sim.received[-1].body["model"] == "sim-bad"
            reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=old.session_id, messages=USER))
            assert reply.version_id == v1 and sim.received[-1].body["model"] == "sim-good"

            await send(rollout(3, control_pb2.ROLLOUT_PHASE_ROLLED_BACK, stable=v1, candidate=v2, weight=0.0))
            await send(
                rollout(2, control_pb2.ROLLOUT_PHASE_PROMOTED, stable=v1, candidate=v2)
            )  # stale: ignored
            await eventually(lambda: sidecar.router.generation == 3, what="generation 3")
            await asyncio.sleep(0.3)
            assert sidecar.router.generation == 3
            assert (
                sample(sidecar, "outrider_sidecar_rollout_phase", agent="support-bot", phase="rolled_back")
                == 1
            )
            assert (
                sample(sidecar, "outrider_sidecar_rollout_phase", agent="support-bot", phase="running") == 0
            )
            back = await open_session(stub)
            assert back.version_id == v1 and back.role == common_pb2.ROLE_STABLE
            # the canary session keeps its pin for its life
            reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=canary.session_id, messages=USER))
            assert reply.version_id == v2 and sim.received[-1].body["model"] == "sim-bad"

            # a state naming a version this sidecar lacks: keep serving the configured stable
            await send(rollout(4, control_pb2.ROLLOUT_PHASE_PROMOTED, stable=v1, candidate="0123456789ab"))
            await eventually(lambda: sidecar.router.generation == 4, what="generation 4")
            assert sample(sidecar, "outrider_sidecar_rollout_unknown_version_total", agent="support-bot") == 1
            assert (await open_session(stub)).version_id == v1
    finally:
        await producer.stop()


async def test_serves_with_kafka_unreachable_and_counts_drops(sim: SimProvider) -> None:
    # Kafka: a port nobody listens on; no spill, so records wait in memory and then drop
    config = sidecar_config(sim, telemetry_queue_size=5, metrics_port=None, telemetry={"spill_dir": None})
    async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as ch:
        stub = sidecar_pb2_grpc.SidecarStub(ch)
        sid = (await open_session(stub)).session_id
        for _ in range(8):
            reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
            assert reply.message.content
        assert sidecar.telemetry.queue_depth == 5
        # each call queues its event and three spans (invoke_agent, chat, attempt): 32 items for 5 places
        assert sample(sidecar, "outrider_sidecar_telemetry_dropped_total", reason="queue_full") == 8 * 4 - 5
        assert sample(sidecar, "outrider_sidecar_telemetry_queue_depth") == 5
        assert sidecar.router.generation == 0
    # the 5 queued items, as Kafka records (spans of one trace share a record)
    assert 3 <= sample(sidecar, "outrider_sidecar_telemetry_dropped_total", reason="shutdown") <= 5
    assert sidecar.telemetry.queue_depth == 0
    assert sample(sidecar, "outrider_sidecar_telemetry_sent_total") == 0


async def test_control_topic_created_after_the_sidecar_started(
    broker: EmbeddedBroker, sim: SimProvider
) -> None:
    config = sidecar_config(sim, kafka=broker.bootstrap_servers, metrics_port=None)
    v1, v2 = config.version_ids()["v1"], config.version_ids()["v2"]
    async with Sidecar(config) as sidecar:
        await asyncio.sleep(0.3)  # the tailer is up and found no topic
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
        await producer.start()
        try:
            key, value, headers = signed_control(
                rollout(1, control_pb2.ROLLOUT_PHASE_PROMOTED, stable=v1, candidate=v2)
            )
            await producer.send_and_wait(outrider.CONTROL_TOPIC, value, key=key, headers=headers)
        finally:
            await producer.stop()
        await eventually(lambda: sidecar.router.generation == 1, what="generation 1")
        assert sidecar.router.assign("n").version_id == v2


async def test_a_missing_spans_topic_never_holds_events_up(broker: EmbeddedBroker, sim: SimProvider) -> None:
    # The embedded broker creates topics on first use, so "missing" is what the sidecar
    # concluded at connect time: set it, as a broker without auto-creation would make it.
    config = sidecar_config(sim, kafka=broker.bootstrap_servers, metrics_port=None)
    async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as ch:
        telemetry = sidecar.telemetry
        await eventually(lambda: telemetry.connected, what="a Kafka connection")
        telemetry._missing_topics.add(outrider.SPANS_TOPIC)
        stub = sidecar_pb2_grpc.SidecarStub(ch)
        sid = (await open_session(stub)).session_id
        for _ in range(5):
            await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
        events = await read_events(broker.bootstrap_servers, 5)
        assert len(events) == 5
        await eventually(
            lambda: sample(sidecar, "outrider_sidecar_telemetry_dropped_total", reason="no_topic") >= 5,
            what="span records counted as dropped",
        )
        assert telemetry.healthy and telemetry.spill_pending_records == 0
        # the calls' events and the sidecar's own reports of its versions
        assert sample(sidecar, "outrider_sidecar_telemetry_sent_total") == 5 + sidecar.registry.reports
        # once the recheck interval is up, the topic is looked up again and spans flow
        telemetry._topics_checked_at = 0.0
        await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
        await eventually(lambda: not telemetry._missing_topics, what="the spans topic found again")
        await eventually(
            lambda: sample(sidecar, "outrider_sidecar_telemetry_sent_total") >= 7,
            what="the next event and its span record sent",
        )
