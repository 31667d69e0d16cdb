"""Drain end to end: a real collector rolls a candidate back through `outrider.control`; two
sidecar replicas sharing a session key serve its pinned sessions until the drain deadline,
then refuse them with FAILED_PRECONDITION and ErrorInfo SESSION_DRAINED, and the next session
lands on stable. The sidecars run on one ManualClock (it follows the wall clock until the
rollback, then jumps), so the ten-minute drain takes no time.

Run with -s to see the drain timeline.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import yaml
from aiokafka import AIOKafkaConsumer
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

import outrider
from collector import Collector
from devstack.broker import EmbeddedBroker
from devstack.simprovider import SimProvider
from outrider.v1 import admin_pb2, common_pb2, control_pb2, events_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import ManualClock, Sidecar, SidecarConfig
from tests.integration.test_collector_service import (
    admin_client,
    producer,
    send,
    settings_for,
    versions_reported,
)
from tests.integration.test_sidecar_api import API_KEY, USER, sidecar_config, sim_models

pytestmark = pytest.mark.broker

AGENT = "support-bot"
DRAIN_S = 600.0
ROLLED_BACK = control_pb2.ROLLOUT_PHASE_ROLLED_BACK
_ids = itertools.count()


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=5) as provider:
        yield provider


def replica_config(sim: SimProvider, key: str, **overrides: Any) -> SidecarConfig:
    config = sidecar_config(sim, metrics_port=None, **overrides)
    return config.load_secrets({"TEST_SIM_KEY": API_KEY, "OUTRIDER_SESSION_KEY": key})


def spec(stable: str, candidate: str) -> str:
    return yaml.safe_dump(
        {
            "agent": AGENT,
            "stable": stable,
            "candidate": candidate,
            "look_interval": "100ms",
            "drain_timeout": "10m",
            # a long first step: only the gate ends this rollout
            "steps": [{"weight": 50, "min_duration": "10m", "min_samples": 100000}],
            "gates": [
                {
                    "name": "errors",
                    "metric": "error_rate",
                    "max_increase": 0.05,
                    "window": "30s",
                    "min_samples": 20,
                    "on_failure": "rollback",
                }
            ],
        }
    )


def call_event(version_id: str, canary: bool, error: bool, rollout_id: str) -> events_pb2.Event:
    n = next(_ids)
    event = events_pb2.Event(
        event_id=f"drain-evt-{n}",
        time_unix_nano=time.time_ns(),
        agent=AGENT,
        version_id=version_id,
        role=common_pb2.ROLE_CANARY if canary else common_pb2.ROLE_STABLE,
        session_id=f"synthetic-{n}",
        rollout_id=rollout_id,
    )
    event.call.latency_ms = 40.0
    event.call.outcome = events_pb2.OUTCOME_ERROR if error else events_pb2.OUTCOME_OK
    if error:
        event.call.error_class = "provider_5xx"
    return event


async def until(
    predicate: Callable[[], bool], what: str, within: float = 20.0, tick: Callable[[], None] = lambda: None
) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        tick()
        await asyncio.sleep(0.01)


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {exc.code()}: {exc.details()}"
    info = error_details_pb2.ErrorInfo()
    assert status.details and status.details[0].Unpack(info)
    return info


async def refused(call: Any) -> tuple[grpc.aio.AioRpcError, error_details_pb2.ErrorInfo]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        result = call
        if hasattr(result, "__aiter__"):
            _ = [chunk async for chunk in result]
        else:
            await result
    exc = caught.value
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
    return exc, error_info(exc)


async def drained_events(bootstrap: str, sidecars: set[str], within: float = 15.0) -> list[events_pb2.Event]:
    """Every VersionDrained event on `outrider.events`, once one from each of `sidecars` arrived."""
    consumer = AIOKafkaConsumer(
        outrider.EVENTS_TOPIC, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    found: list[events_pb2.Event] = []
    await consumer.start()
    try:
        deadline = time.monotonic() + within
        while {e.sidecar_id for e in found} < sidecars and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    event = outrider.decode_event(record.value, list(record.headers))
                    if event.WhichOneof("body") == "drained":
                        found.append(event)
        for records in (await consumer.getmany(timeout_ms=300)).values():  # no second one
            for record in records:
                event = outrider.decode_event(record.value, list(record.headers))
                if event.WhichOneof("body") == "drained":
                    found.append(event)
    finally:
        await consumer.stop()
    return found


def draining(sidecar: Sidecar, version: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(
        "outrider_sidecar_sessions_draining", {"version": version}
    )
    return value or 0.0


async def test_drain_across_two_replicas_after_a_collector_rollback(
    broker: EmbeddedBroker, sim: SimProvider
) -> None:
    key = secrets.token_hex(32)
    clock = ManualClock(time.time())
    kafka = broker.bootstrap_servers
    config_a, config_b = replica_config(sim, key, kafka=kafka), replica_config(sim, key, kafka=kafka)
    ids = config_a.version_ids()
    stable_id, candidate_id = ids["v1"], ids["v2"]
    async with (
        producer(broker) as p,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
        Sidecar(config_a, clock=clock, sidecar_id="replica-a") as a,
        Sidecar(config_b, clock=clock, sidecar_id="replica-b") as b,
        grpc.aio.insecure_channel(a.address) as channel_a,
        grpc.aio.insecure_channel(b.address) as channel_b,
    ):
        stub_a, stub_b = sidecar_pb2_grpc.SidecarStub(channel_a), sidecar_pb2_grpc.SidecarStub(channel_b)
        await versions_reported(
            broker, collector, stable_id, candidate_id, send=False
        )  # the replicas' reports
        started = await admin.StartRollout(
            admin_pb2.StartRolloutRequest(spec_yaml=spec(stable_id, candidate_id), requested_by="drain-test")
        )
        rollout_id = started.state.rollout_id
        assert started.state.drain_timeout_s == DRAIN_S
        await until(lambda: a.router.generation >= 1 and b.router.generation >= 1, "both replicas running")

        # a session opened on replica A, pinned to the candidate
        for _ in range(64):
            opened = await stub_a.OpenSession(sidecar_pb2.OpenSessionRequest(agent=AGENT))
            if opened.role == common_pb2.ROLE_CANARY:
                break
        assert opened.version_id == candidate_id and opened.rollout_id == rollout_id
        pinned = opened.session_id
        reply = await stub_b.Chat(sidecar_pb2.ChatRequest(session_id=pinned, messages=USER))
        assert reply.version_id == candidate_id  # replica B honours A's pin

        # the candidate fails a third of its calls: the collector's gate rolls it back
        for i in range(150):
            await send(p, call_event(stable_id, False, False, rollout_id))
            await send(p, call_event(candidate_id, True, i % 3 == 0, rollout_id))

        def rolled_back_on(sidecar: Sidecar) -> bool:
            state = sidecar.router.state
            return state is not None and state.phase == ROLLED_BACK

        await until(
            lambda: rolled_back_on(a) and rolled_back_on(b),
            "the rollback on both replicas",
            within=30,
            tick=lambda: clock.set(max(clock.now(), time.time())),  # wall time until the rollback
        )
        applied_wall = time.time()
        clock.set(max(clock.now(), applied_wall))
        for replica in (a, b):  # what each one's 1 s drain tick does: before the clock jumps
            replica.drain.tick()
        state = b.router.state
        assert state is not None and state.decided_by == "controller"
        decided = state.decided_at_unix_nano / 1e9
        [retired] = state.retired
        assert (retired.version_id, retired.rollout_id, retired.reason) == (
            candidate_id,
            rollout_id,
            "rolled_back",
        )
        deadline = retired.drain_deadline_unix_nano / 1e9
        assert deadline - decided == pytest.approx(DRAIN_S)

        # during the drain: the pinned session is served on both replicas; new sessions get stable
        assert (
            await stub_b.Chat(sidecar_pb2.ChatRequest(session_id=pinned, messages=USER))
        ).version_id == candidate_id
        fresh = await stub_a.OpenSession(sidecar_pb2.OpenSessionRequest(agent=AGENT))
        assert (fresh.role, fresh.version_id) == (common_pb2.ROLE_STABLE, stable_id)
        clock.set(deadline - 1.0)
        last = await stub_b.Chat(sidecar_pb2.ChatRequest(session_id=pinned, messages=USER))
        assert last.version_id == candidate_id
        last_ok = clock.now()
        assert draining(b, candidate_id) == 1

        # at the deadline: every call on it is refused, on either replica, with SESSION_DRAINED
        clock.set(deadline)
        exc, info = await refused(stub_b.Chat(sidecar_pb2.ChatRequest(session_id=pinned, messages=USER)))
        first_drained = clock.now()
        assert (info.reason, info.domain) == (outrider.SESSION_DRAINED, outrider.ERROR_DOMAIN)
        assert info.metadata["version_id"] == candidate_id and info.metadata["rollout_id"] == rollout_id
        assert "open a new session" in (exc.details() or "")
        _, info = await refused(stub_a.ChatStream(sidecar_pb2.ChatRequest(session_id=pinned, messages=USER)))
        assert info.reason == "SESSION_DRAINED"
        tool = sidecar_pb2.CallToolRequest(session_id=pinned, tool_name="echo", arguments_json="{}")
        _, info = await refused(stub_a.CallTool(tool))
        assert info.reason == "SESSION_DRAINED"
        # feedback is late evidence about the candidate: still accepted
        await stub_b.Feedback(
            sidecar_pb2.FeedbackRequest(session_id=pinned, kind=sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN)
        )
        assert draining(b, candidate_id) == 0

        # the agent opens a new session as told: it lands on stable and works on both replicas
        renewed = await stub_b.OpenSession(sidecar_pb2.OpenSessionRequest(agent=AGENT))
        assert (renewed.role, renewed.version_id) == (common_pb2.ROLE_STABLE, stable_id)
        for stub in (stub_a, stub_b):
            ok = await stub.Chat(sidecar_pb2.ChatRequest(session_id=renewed.session_id, messages=USER))
            assert ok.version_id == stable_id
        refusals = b.metrics.registry.get_sample_value(
            "outrider_sidecar_sessions_refused_total", {"reason": "SESSION_DRAINED"}
        )
        assert refusals == 1

        # one VersionDrained per replica: B cut the session still active at the deadline
        events = await drained_events(kafka, {"replica-a", "replica-b"})
        by_sidecar = {e.sidecar_id: e for e in events}
        assert len(events) == 2 and set(by_sidecar) == {"replica-a", "replica-b"}, events
        assert by_sidecar["replica-b"].drained.sessions_cut == 1
        assert all(
            e.drained.version_id == candidate_id and e.drained.rollout_id == rollout_id for e in events
        )

        print(
            "\ndrain timeline (seconds after the collector's rollback decision; sidecar clock after it):\n"
            f"  rollback decided by the collector        t=0 ({state.reason})\n"
            f"  rollback applied by both replicas        t=+{applied_wall - decided:.3f} (wall clock)\n"
            f"  drain deadline                           t=+{deadline - decided:.1f}\n"
            f"  last successful candidate call (B)       t=+{last_ok - decided:.1f}\n"
            f"  first SESSION_DRAINED (B)                t=+{first_drained - decided:.1f}\n"
            f"  next session                             {renewed.version_id} "
            f"({common_pb2.Role.Name(renewed.role)}), served on A and B\n"
            f"  VersionDrained: A cut {by_sidecar['replica-a'].drained.sessions_cut}, "
            f"B cut {by_sidecar['replica-b'].drained.sessions_cut}"
        )


async def test_drain_expired_session_gets_session_expired(sim: SimProvider) -> None:
    """Past max_session_duration (shorter than session_ttl here) a call gets SESSION_EXPIRED."""
    clock = ManualClock(time.time())
    config = replica_config(sim, secrets.token_hex(32), session_ttl="1h", max_session_duration="10m")
    async with Sidecar(config, clock=clock) as sidecar, grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        opened = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(agent=AGENT))
        assert opened.expires_at_unix_nano == pytest.approx((clock.now() + 600) * 1e9, abs=1e6)
        await stub.Chat(sidecar_pb2.ChatRequest(session_id=opened.session_id, messages=USER))
        clock.advance(600)
        exc, info = await refused(
            stub.Chat(sidecar_pb2.ChatRequest(session_id=opened.session_id, messages=USER))
        )
        assert (info.reason, info.domain) == (outrider.SESSION_EXPIRED, outrider.ERROR_DOMAIN)
        assert "open a new one" in (exc.details() or "")
        # late feedback on an expired session still counts
        await stub.Feedback(
            sidecar_pb2.FeedbackRequest(
                session_id=opened.session_id, kind=sidecar_pb2.FEEDBACK_KIND_THUMBS_UP
            )
        )
