"""A shadow phase's pairs survive a collector SIGKILL exactly once: the pattern of
test_collector_evidence_restart, with a shadow phase that cannot end within the test and
ShadowRecord and JudgeRecord events. The shadow evidence in the second process's last
checkpoint equals the evidence built in-process from the very same events."""

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
from collector import EvidenceBook, ShadowEvidence, ShadowRows
from collector._checkpoint import decode
from devstack.broker import EmbeddedBroker, free_port
from outrider.v1 import admin_pb2, admin_pb2_grpc, common_pb2, control_pb2, events_pb2
from tests.support import SECURE_COLLECTOR, Proc, admin_channel, report_versions, wait_serving

pytestmark = pytest.mark.broker

AGENT = "support-bot"
STABLE, CANDIDATE = "1a2b3c4d5e6f", "9f8e7d6c5b4a"
N = 600
RATE_PER_S = 150
AHEAD = 200  # events produced past the first collector's checkpoint, at most, before its kill
SPEC = yaml.safe_dump(
    {
        "agent": AGENT,
        "stable": STABLE,
        "candidate": CANDIDATE,
        "look_interval": "1s",
        "shadow": {
            "min_pairs": 10**6,
            "gates": [{"name": "tools", "metric": "tool_agreement", "min": 0.5}],
        },
        "steps": [{"weight": 50}],
    }
)


def make_event(i: int, rollout_id: str, rng: random.Random) -> events_pb2.Event:
    """Every fourth event a pair's judge verdict, the others mirrored calls; 3 per session."""
    event = events_pb2.Event(
        event_id=f"evt-{i}",
        time_unix_nano=time.time_ns(),
        agent=AGENT,
        version_id=CANDIDATE,
        role=common_pb2.ROLE_SHADOW,
        session_id=f"s{i // 3}",
        rollout_id=rollout_id,
    )
    if i % 4 == 3:
        judge = event.judge
        judge.kind, judge.parsed, judge.cost_usd = "pair", rng.random() < 0.95, 0.001
        judge.score, judge.stable_score = rng.random(), rng.random()
        judge.preference = rng.choice(["candidate", "stable", "tie"])
        return event
    pair = event.shadow
    pair.stable_version_id, pair.operation = STABLE, "chat"
    pair.tools_agree, pair.text_similarity = rng.random() < 0.9, rng.random()
    pair.outcome = events_pb2.OUTCOME_ERROR if i % 13 == 0 else events_pb2.OUTCOME_OK
    pair.error_class = "bad_request" if i % 13 == 0 else ""
    pair.stable_latency_ms, pair.candidate_latency_ms = 50 * rng.lognormvariate(0, 0.3), 55.0
    pair.stable_cost_usd, pair.candidate_cost_usd = 0.002, 0.002 * rng.lognormvariate(0, 0.2)
    return event


def checkpoint_of(state_dir: Path) -> tuple[int, ShadowEvidence | None]:
    try:
        checkpoint = decode((state_dir / "shadow-evidence" / "events-0.ckpt").read_bytes())
    except FileNotFoundError:
        return 0, None
    book = EvidenceBook()
    book.load_state(checkpoint.extra["evidence"])
    return checkpoint.offsets.get((outrider.EVENTS_TOPIC, 0), 0), book.shadow(AGENT)


async def test_shadow_evidence_checkpoint_survives_sigkill_exactly_once(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    admin = f"127.0.0.1:{free_port()}"
    state_dir = tmp_path / "state"
    config = tmp_path / "collector.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka_bootstrap": broker.bootstrap_servers,
                "group_id": "shadow-evidence",
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
        assert started.state.phase == control_pb2.ROLLOUT_PHASE_SHADOW
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
            if evidence is not None and evidence.pairs and offset >= 150 and len(produced) >= offset + 60:
                break
            assert time.monotonic() < deadline, "the first collector never checkpointed shadow evidence"
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
    want = ShadowEvidence(rollout_id, STABLE, CANDIDATE)
    rows = ShadowRows()
    for event in events:
        want.rows_from_event(event, rows)
    want.add(rows, time.time())
    np.testing.assert_allclose(restored.sums, want.sums, rtol=1e-9, atol=1e-9)
    assert (restored.pairs, restored.judged, restored.judge_unparsed) == (
        want.pairs,
        want.judged,
        want.judge_unparsed,
    )
    assert restored.pairs == sum(1 for e in events if e.WhichOneof("body") == "shadow")
    assert restored.similarity_hist == want.similarity_hist and restored.preferences == want.preferences
    assert restored.judge_cost_usd == pytest.approx(want.judge_cost_usd)
