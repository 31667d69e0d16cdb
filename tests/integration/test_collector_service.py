"""The collector against the embedded broker: events in, rollout decisions out on
`outrider.control`, the admin API over real gRPC, recovery after a restart, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import grpc
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from grpc_health.v1 import health_pb2, health_pb2_grpc

import outrider
from collector import Collector, CollectorSettings, run
from devstack.broker import EmbeddedBroker
from outrider.v1 import admin_pb2, admin_pb2_grpc, common_pb2, control_pb2, events_pb2
from tests.support import SECURE_COLLECTOR, TEST_SIGNER, admin_channel, report_versions

pytestmark = pytest.mark.broker

AGENT = "support-bot"
STABLE_V, CANDIDATE_V = "1a2b3c4d5e6f", "9f8e7d6c5b4a"
RUNNING = control_pb2.ROLLOUT_PHASE_RUNNING
_ids = itertools.count()


def settings_for(broker: EmbeddedBroker, **overrides: object) -> CollectorSettings:
    values: dict[str, object] = {
        "kafka_bootstrap": broker.bootstrap_servers,
        "admin_listen": "127.0.0.1:0",
        "metrics_port": 0,
        "tick_interval_s": 0.1,
        "bucket_s": 0.5,
        "retention_s": 120,
        "recovery_idle_s": 0.5,
        "state_dir": None,  # tests that checkpoint pass a tmp_path
        **SECURE_COLLECTOR,
    }
    values.update(overrides)
    return CollectorSettings.model_validate(values)


async def versions_reported(
    broker: EmbeddedBroker, collector: Collector, *version_ids: str, agent: str = AGENT, send: bool = True
) -> None:
    """A sidecar's report of the versions (STABLE_V and CANDIDATE_V by default), consumed by
    `collector`: `rollout start` refuses versions that are neither pushed nor reported.
    `send=False` only waits (for call events already sent)."""
    ids = version_ids or (STABLE_V, CANDIDATE_V)
    if send:
        await report_versions(broker.bootstrap_servers, agent, *ids)
    deadline = time.monotonic() + 20
    while not all(collector.rollouts.sightings.reported(agent, v) for v in ids):
        assert time.monotonic() < deadline, f"the collector never consumed the report of {ids}"
        await asyncio.sleep(0.05)


def spec_yaml(min_duration: str = "0.3s", min_samples: int = 5, gate_samples: int = 20) -> str:
    return yaml.safe_dump(
        {
            "agent": AGENT,
            "stable": STABLE_V,
            "candidate": CANDIDATE_V,
            "look_interval": "100ms",
            "steps": [
                {"weight": w, "min_duration": min_duration, "min_samples": min_samples} for w in (10, 50, 100)
            ],
            "gates": [
                {
                    "name": "errors",
                    "metric": "error_rate",
                    "max_increase": 0.05,
                    "window": "30s",
                    "min_samples": gate_samples,
                    "on_failure": "rollback",
                },
                {
                    "name": "latency",
                    "metric": "latency_p95_ms",
                    "max_ratio": 1.5,
                    "window": "30s",
                    "min_samples": gate_samples,
                    "on_failure": "rollback",
                },
            ],
        }
    )


def make_event(
    canary: bool, error: bool, latency_ms: float | None = None, rollout_id: str = ""
) -> events_pb2.Event:
    """One call of a session of its own; latency jitters around 50 ms unless given."""
    n = next(_ids)
    event = events_pb2.Event(
        event_id=f"evt-{n}",
        time_unix_nano=time.time_ns(),
        agent=AGENT,
        version_id=CANDIDATE_V if canary else STABLE_V,
        role=common_pb2.ROLE_CANARY if canary else common_pb2.ROLE_STABLE,
        session_id=f"s{n}",
        rollout_id=rollout_id,
    )
    event.call.latency_ms = latency_ms if latency_ms is not None else 50.0 * random.lognormvariate(0, 0.2)
    event.call.outcome = events_pb2.OUTCOME_ERROR if error else events_pb2.OUTCOME_OK
    if error:
        event.call.error_class = "provider"
    return event


@contextlib.asynccontextmanager
async def producer(broker: EmbeddedBroker) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def send(p: AIOKafkaProducer, event: events_pb2.Event) -> None:
    value, headers = outrider.encode_event(event)
    await p.send_and_wait(outrider.EVENTS_TOPIC, value, key=outrider.agent_key(AGENT), headers=headers)


async def produce_mix(
    p: AIOKafkaProducer, n: int, candidate_error_every: int = 0, rollout_id: str = ""
) -> None:
    """`n` stable requests without errors and `n` candidate requests, every k-th failing."""
    for i in range(n):
        await send(p, make_event(canary=False, error=False, rollout_id=rollout_id))
        failing = candidate_error_every > 0 and i % candidate_error_every == 0
        await send(p, make_event(canary=True, error=failing, rollout_id=rollout_id))


async def control_states(
    broker: EmbeddedBroker, until: Callable[[list[control_pb2.RolloutState]], bool], within: float = 20.0
) -> list[control_pb2.RolloutState]:
    """Rollout states read from the start of `outrider.control` until `until` holds."""
    consumer = AIOKafkaConsumer(
        outrider.CONTROL_TOPIC,
        bootstrap_servers=broker.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
    )
    states: list[control_pb2.RolloutState] = []
    await consumer.start()
    verifier = outrider.Verifier([TEST_SIGNER.public])
    try:
        deadline = time.monotonic() + within
        while not until(states):
            assert time.monotonic() < deadline, f"timed out; control topic had {[s.phase for s in states]}"
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    if outrider.is_marker(record.key):
                        continue
                    assert record.key == outrider.rollout_key(AGENT)
                    verdict, message = outrider.open_control(
                        verifier, record.key, record.value, record.headers
                    )
                    assert verdict.ok and message is not None, verdict
                    if not states or outrider.ordering(message.rollout) > outrider.ordering(states[-1]):
                        states.append(message.rollout)  # republished states come again
    finally:
        await consumer.stop()
    return states


def published_part(state: control_pb2.RolloutState) -> control_pb2.RolloutState:
    """The state without its gate results: status shows the controller's live evaluation there."""
    copy = control_pb2.RolloutState()
    copy.CopyFrom(state)
    del copy.gate_results[:]
    return copy


def ended_with(phase: int) -> Callable[[list[control_pb2.RolloutState]], bool]:
    return lambda states: bool(states) and states[-1].phase == phase


@contextlib.asynccontextmanager
async def admin_client(collector: Collector) -> AsyncIterator[admin_pb2_grpc.AdminStub]:
    async with admin_channel(collector.admin_address) as channel:
        yield admin_pb2_grpc.AdminStub(channel)


async def wait_serving(port: int, runner: asyncio.Task[int], within: float = 20.0) -> None:
    """Wait for the port to accept before the first gRPC call (no channel reconnect backoff)."""
    deadline = time.monotonic() + within
    while True:
        assert not runner.done(), "the collector stopped early"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            assert time.monotonic() < deadline, "the collector's admin API never listened"
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


async def test_failing_candidate_is_rolled_back(broker: EmbeddedBroker) -> None:
    async with (
        producer(broker) as p,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        await versions_reported(broker, collector)
        started = await admin.StartRollout(
            admin_pb2.StartRolloutRequest(
                spec_yaml=spec_yaml(min_duration="10m"), source_name="rollout.yaml", requested_by="test"
            )
        )
        assert started.state.phase == RUNNING and started.state.generation == 1
        assert started.state.decided_by == "token:ci"  # the credential, not requested_by
        # 0% vs 33% errors: evidence of harm well before the stage's 10 minutes
        await produce_mix(p, 150, candidate_error_every=3, rollout_id=started.state.rollout_id)
        states = await control_states(broker, ended_with(control_pb2.ROLLOUT_PHASE_ROLLED_BACK))
        assert [s.generation for s in states] == [1, 2]
        rolled_back = states[-1]
        assert rolled_back.candidate_weight == 0 and rolled_back.decided_by == "controller"
        assert "gate errors found harm" in rolled_back.reason
        errors = rolled_back.gate_results[0]
        assert errors.verdict == "harm" and errors.lower > 0 and not errors.passed
        assert 0.25 < errors.candidate_value < 0.4  # about every third candidate call failed

        status = await admin.GetRollout(admin_pb2.GetRolloutRequest(agent=AGENT))
        assert status.state == rolled_back
        assert [s.generation for s in status.timeline] == [1, 2]
        by_role = {m.role: m for m in status.metrics}
        assert 0 < by_role[common_pb2.ROLE_STABLE].requests <= 150
        assert 0 < by_role[common_pb2.ROLE_CANARY].errors <= 50


async def test_healthy_candidate_is_promoted(broker: EmbeddedBroker) -> None:
    stop = asyncio.Event()

    async def keep_producing(p: AIOKafkaProducer, rollout_id: str) -> None:
        while not stop.is_set():
            await produce_mix(p, 5, rollout_id=rollout_id)
            await asyncio.sleep(0.05)

    async with (
        producer(broker) as p,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        await versions_reported(broker, collector)
        started = await admin.StartRollout(
            admin_pb2.StartRolloutRequest(spec_yaml=spec_yaml(), requested_by="test")
        )
        traffic = asyncio.create_task(keep_producing(p, started.state.rollout_id))
        try:
            states = await control_states(broker, ended_with(control_pb2.ROLLOUT_PHASE_PROMOTED), within=30)
        finally:
            stop.set()
            await traffic
    assert [s.generation for s in states] == [1, 2, 3, 4]
    # the 100 % step keeps a 5 % stable holdback until its tests decide
    assert [s.candidate_weight for s in states] == [pytest.approx(0.1), pytest.approx(0.5), 0.95, 1.0]
    assert [s.step_index for s in states] == [0, 1, 2, 2]
    assert len({s.rollout_id for s in states}) == 1


async def test_admin_errors_restart_recovery_and_metrics(broker: EmbeddedBroker, port: int) -> None:
    async with producer(broker) as p:
        await produce_mix(p, 10)
        duplicate = make_event(canary=False, error=False)
        await send(p, duplicate)
        await send(p, duplicate)
        await p.send_and_wait(outrider.EVENTS_TOPIC, b"\xff garbage", key=b"x")

        async with Collector(settings_for(broker)) as first, admin_client(first) as admin:
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await admin.StartRollout(
                    admin_pb2.StartRolloutRequest(
                        spec_yaml=spec_yaml().replace("weight: 50", "weight: 500"), source_name="rollout.yaml"
                    )
                )
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad.value.details() == "rollout.yaml: steps[1].weight: must be in (0, 100]"
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await admin.GetRollout(admin_pb2.GetRolloutRequest(agent="nobody"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await admin.AbortRollout(admin_pb2.AbortRolloutRequest(agent="nobody"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND

            slow = spec_yaml(min_duration="10m", gate_samples=10_000)
            await versions_reported(broker, first, send=False)  # produce_mix's events name both
            started = await admin.StartRollout(
                admin_pb2.StartRolloutRequest(spec_yaml=slow, requested_by="t")
            )
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=slow))
            assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS

            async with grpc.aio.insecure_channel(first.admin_address) as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert health.status == health_pb2.HealthCheckResponse.SERVING

            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 15
                while True:  # the consumer group's first join takes a few seconds
                    async with http.get(f"http://127.0.0.1:{first.metrics_port}/metrics") as response:
                        assert response.status == 200
                        text = await response.text()
                    if "outrider_collector_events_consumed_total 23.0" in text or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
            assert "outrider_collector_events_consumed_total 23.0" in text
            assert "outrider_collector_events_duplicate_total 1.0" in text
            assert "outrider_collector_records_undecodable_total 1.0" in text
            assert (
                f'outrider_requests_total{{agent="{AGENT}",role="stable",version="{STABLE_V}"}} 11.0' in text
            )
            assert (
                f'outrider_errors_total{{agent="{AGENT}",role="canary",version="{CANDIDATE_V}"}}' not in text
            )
            assert f'outrider_rollout_phase{{agent="{AGENT}",phase="running"}} 1.0' in text
            assert f'outrider_rollout_candidate_weight{{agent="{AGENT}"}} 0.1' in text
            assert "outrider_request_duration_seconds_bucket" in text

    # A new collector on the same broker, run as the CLI runs it, takes the rollout over from the
    # control topic. (Its own group: Tansu numbers the first group generation 0, so aiokafka skips
    # LeaveGroup on stop and a successor in the same group waits out the old member's session.)
    address = f"127.0.0.1:{port}"
    runner = asyncio.create_task(run(settings_for(broker, group_id="second", admin_listen=address)))
    try:
        await wait_serving(port, runner)
        async with admin_channel(address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            admin = admin_pb2_grpc.AdminStub(channel)
            status = await admin.GetRollout(admin_pb2.GetRolloutRequest(agent=AGENT))
            assert published_part(status.state) == published_part(started.state) and status.spec_yaml == slow
            assert {r.kind for r in status.state.gate_results} == {"gate", "trigger"}  # the live evaluation
            assert [s.generation for s in status.timeline] == [1]
            aborted = await admin.AbortRollout(
                admin_pb2.AbortRolloutRequest(agent=AGENT, reason="testing", requested_by="ops")
            )
            assert aborted.state.phase == control_pb2.ROLLOUT_PHASE_ABORTED
            assert aborted.state.generation == 2 and aborted.state.decided_by == "token:ci"
            with pytest.raises(grpc.aio.AioRpcError) as finished:
                await admin.AbortRollout(admin_pb2.AbortRolloutRequest(agent=AGENT))
            assert finished.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            await report_versions(
                broker.bootstrap_servers, AGENT, STABLE_V, CANDIDATE_V, admin=address, send=False
            )
            restarted = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=slow))
            assert restarted.state.generation == 3
        os.kill(os.getpid(), signal.SIGTERM)  # run() handles it: a clean stop, exit code 0
        assert await asyncio.wait_for(runner, 15) == 0
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    states = await control_states(broker, lambda s: len(s) >= 3)
    assert [s.generation for s in states] == [1, 2, 3]
    assert [s.phase for s in states] == [RUNNING, control_pb2.ROLLOUT_PHASE_ABORTED, RUNNING]


async def test_stop_is_idempotent_and_start_fails_cleanly_without_broker(port: int) -> None:
    settings = CollectorSettings(
        kafka_bootstrap=f"127.0.0.1:{port}",
        admin_listen="127.0.0.1:0",
        recovery_timeout_s=1,
        recovery_idle_s=0.5,
        publish_timeout_s=1,
    )
    collector = Collector(settings)
    with pytest.raises(Exception):  # noqa: B017 - whatever aiokafka raises for no broker
        await collector.start()
    await collector.stop()
    await collector.stop()
