"""A rollout's evidence survives a collector SIGKILL exactly once.

A collector process runs a rollout whose stage cannot end within the test; events of that
rollout flow; the collector is killed with SIGKILL well past its last checkpoint and started
again on the same state_dir. When every event has been consumed and the second process has
stopped (its last checkpoint), the evidence in that checkpoint equals the evidence built
in-process from the very same events: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from aiokafka import AIOKafkaProducer

import outrider
from collector import EvidenceBook, RolloutEvidence, Rows
from collector._checkpoint import decode
from devstack.broker import EmbeddedBroker, free_port
from outrider.v1 import admin_pb2, admin_pb2_grpc, common_pb2, events_pb2, sidecar_pb2
from tests.support import SECURE_COLLECTOR, Proc, admin_channel, report_versions, wait_serving

pytestmark = pytest.mark.broker

AGENT = "support-bot"
STABLE, CANDIDATE = "1a2b3c4d5e6f", "9f8e7d6c5b4a"
N = 800
RATE_PER_S = 150
AHEAD = 200  # events produced past the first collector's checkpoint, at most, before its kill
SPEC = yaml.safe_dump(
    {
        "agent": AGENT,
        "stable": STABLE,
        "candidate": CANDIDATE,
        "look_interval": "1s",
        "steps": [{"weight": 50, "min_duration": "1h", "min_samples": 10**6}],
        "gates": [{"name": "errors", "metric": "error_rate", "max_increase": 0.5, "window": "1m"}],
    }
)


def make_event(i: int, rollout_id: str, rng: random.Random) -> events_pb2.Event:
    canary = i % 2 == 1
    event = events_pb2.Event(
        event_id=f"evt-{i}",
        time_unix_nano=time.time_ns(),
        agent=AGENT,
        version_id=CANDIDATE if canary else STABLE,
        role=common_pb2.ROLE_CANARY if canary else common_pb2.ROLE_STABLE,
        session_id=f"s{i // 6}-{int(canary)}",  # sessions of 3 calls per arm
        rollout_id=rollout_id,
    )
    if i % 5 == 4:
        success = rng.random() < 0.8
        event.feedback.kind = (
            sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS if success else sidecar_pb2.FEEDBACK_KIND_TASK_FAILURE
        )
        return event
    event.call.latency_ms = 50 * rng.lognormvariate(0, 0.3)
    event.call.cost_usd = 0.002 * rng.lognormvariate(0, 0.3)
    failed = i % 11 == 0
    event.call.outcome = events_pb2.OUTCOME_ERROR if failed else events_pb2.OUTCOME_OK
    event.call.error_class = "provider_5xx" if failed else ""
    return event


def checkpoint_of(state_dir: Path) -> tuple[int, RolloutEvidence | None]:
    try:
        checkpoint = decode((state_dir / "evidence" / "events-0.ckpt").read_bytes())
    except FileNotFoundError:
        return 0, None
    book = EvidenceBook()
    book.load_state(checkpoint.extra["evidence"])
    return checkpoint.offsets.get((outrider.EVENTS_TOPIC, 0), 0), book.get(AGENT)


async def test_evidence_checkpoint_survives_sigkill_exactly_once(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    admin = f"127.0.0.1:{free_port()}"
    state_dir = tmp_path / "state"
    config = tmp_path / "collector.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka_bootstrap": broker.bootstrap_servers,
                "group_id": "evidence",
                "admin_listen": admin,
                "recovery_idle_s": 0.3,
                "state_dir": str(state_dir),
                "checkpoint_interval_s": 1.0,
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
                **SECURE_COLLECTOR,
            }
        )
    )
    rng = random.Random(5)
    first = Proc("collector", "--config", str(config), log_path=tmp_path / "first.log")
    second: Proc | None = None
    producing: asyncio.Task[None] | None = None
    produced: list[events_pb2.Event] = []
    try:
        await wait_serving(admin, first)
        # the report of a sidecar serving both versions: event 0 of the log (rollout start needs it)
        await report_versions(broker.bootstrap_servers, AGENT, STABLE, CANDIDATE, admin=admin)
        async with admin_channel(admin) as channel:
            started = await admin_pb2_grpc.AdminStub(channel).StartRollout(
                admin_pb2.StartRolloutRequest(spec_yaml=SPEC, requested_by="test")
            )
        rollout_id = started.state.rollout_id
        events = [make_event(i, rollout_id, rng) for i in range(N)]

        async def produce() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
            await producer.start()
            try:
                began = time.monotonic()
                for event in events:
                    # at most AHEAD past the checkpoint until the kill: mid-stream however slow
                    # the machine makes the collector (two test workers on two cores)
                    while not killed.is_set() and len(produced) >= checkpoint_of(state_dir)[0] + AHEAD:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(killed.wait(), 0.05)  # and read the checkpoint again
                    value, headers = outrider.encode_event(event)
                    await producer.send_and_wait(
                        outrider.EVENTS_TOPIC, value, key=outrider.agent_key(AGENT), headers=headers
                    )
                    produced.append(event)
                    await asyncio.sleep(max(0.0, began + len(produced) / RATE_PER_S - time.monotonic()))
            finally:
                await producer.stop()

        killed = asyncio.Event()
        producing = asyncio.create_task(produce())
        deadline = time.monotonic() + 60  # a condition: ends as soon as it holds
        while True:  # kill once a checkpoint holds evidence and more has been produced since
            offset, evidence = checkpoint_of(state_dir)
            if evidence is not None and offset >= 150 and len(produced) >= offset + 60:
                break
            assert time.monotonic() < deadline, "the first collector never checkpointed evidence"
            await asyncio.sleep(0.05)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        killed.set()
        assert len(produced) < N, "the kill was not mid-stream"

        second = Proc("collector", "--config", str(config), log_path=tmp_path / "second.log")
        await wait_serving(admin, second)
        await producing
        deadline = time.monotonic() + 30
        while checkpoint_of(state_dir)[0] < N + 1:  # the events and the report before them
            assert time.monotonic() < deadline, "the second collector did not consume everything"
            await asyncio.sleep(0.1)
        assert second.stop() == 0, second.output()
    finally:
        if producing is not None and not producing.done():
            producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producing
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()

    assert "restored the checkpoint" in second.output()
    _, restored = checkpoint_of(state_dir)
    assert restored is not None and restored.rollout_id == rollout_id
    # the same events, once each, in-process
    want = RolloutEvidence(rollout_id, STABLE, CANDIDATE, started.state.started_at_unix_nano / 1e9, stages=1)
    rows = Rows()
    for event in events:
        want.rows_from_event(event, time.time(), rows)
    want.add(rows, time.time())
    np.testing.assert_allclose(restored.sums, want.sums, rtol=1e-9, atol=1e-9)
    assert restored.sums[0, :, 0, 1].sum() == sum(1 for e in events if e.WhichOneof("body") == "call")
