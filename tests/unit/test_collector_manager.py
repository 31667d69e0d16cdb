"""The rule that a rollout state counts only once it is on the control topic (publisher faked)."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError

from collector import ManualClock, NoRollout, PublishError, RollingWindows, load_spec_text
from collector._manager import RolloutManager
from collector._metrics import CollectorMetrics
from outrider.v1 import common_pb2, control_pb2, events_pb2

SPEC_YAML = """
agent: bot
stable: aaaaaaaaaaaa
candidate: bbbbbbbbbbbb
steps: [{weight: 10, min_duration: 1m}]
gates: [{name: errors, metric: error_rate, max_increase: 0.05, window: 1m, min_samples: 5}]
"""


def call(rollout_id: str, version: str, role: int, session: str, failed: bool = False) -> events_pb2.Event:
    e = events_pb2.Event(
        event_id=f"{version}-{session}",
        agent="bot",
        version_id=version,
        role=role,
        session_id=session,
        rollout_id=rollout_id,
    )
    e.call.latency_ms = 10.0
    e.call.outcome = events_pb2.OUTCOME_ERROR if failed else events_pb2.OUTCOME_OK
    e.call.error_class = "provider_5xx" if failed else ""
    return e


class FlakyPublisher:
    """Records what was written; fails the next `failures` writes."""

    def __init__(self) -> None:
        self.written: list[control_pb2.RolloutState] = []
        self.failures = 0

    async def publish(self, state: control_pb2.RolloutState) -> None:
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("broker gone")
        self.written.append(state)


@pytest.fixture
def parts() -> tuple[RolloutManager, FlakyPublisher, RollingWindows, ManualClock, CollectorMetrics]:
    clock, windows, metrics, publisher = (
        ManualClock(),
        RollingWindows(1, 600),
        CollectorMetrics(),
        FlakyPublisher(),
    )
    return RolloutManager(publisher, windows, metrics, clock), publisher, windows, clock, metrics


async def test_failed_writes_change_nothing_and_burn_the_generation(
    parts: tuple[RolloutManager, FlakyPublisher, RollingWindows, ManualClock, CollectorMetrics],
) -> None:
    manager, publisher, _windows, clock, metrics = parts
    spec = load_spec_text(SPEC_YAML, "s.yaml")
    publisher.failures = 1
    with pytest.raises(PublishError, match="generation 1"):
        await manager.start(spec, SPEC_YAML, "ops")
    with pytest.raises(NoRollout):
        manager.status("bot")
    started = (await manager.start(spec, SPEC_YAML, "ops")).state
    assert started is not None and started.generation == 2  # 1 may have landed: never reused
    # the candidate fails half its calls: evidence of harm at the first look
    events = [call(started.rollout_id, "aaaaaaaaaaaa", common_pb2.ROLE_STABLE, f"a{i}") for i in range(200)]
    events += [
        call(started.rollout_id, "bbbbbbbbbbbb", common_pb2.ROLE_CANARY, f"b{i}", failed=i % 2 == 0)
        for i in range(100)
    ]
    assert manager.evidence.add_events(events, clock.now()) == 300
    publisher.failures = 2
    clock.advance(spec.look_interval)
    assert await manager.tick() == []
    clock.advance(spec.look_interval)  # looks are spaced: the retry comes at the next look
    assert await manager.tick() == []
    ctl = manager.get("bot")
    assert ctl is not None and ctl.state == started
    assert metrics.publish_failures._value.get() == 3
    clock.advance(spec.look_interval)
    (rolled_back,) = await manager.tick()
    assert rolled_back.phase == control_pb2.ROLLOUT_PHASE_ROLLED_BACK and rolled_back.generation == 5
    assert [s.generation for s in publisher.written] == [2, 5]
    assert [s.generation for s in manager.status("bot").timeline] == [2, 5]
    assert (
        metrics.registry.get_sample_value("outrider_rollout_phase", {"agent": "bot", "phase": "rolled_back"})
        == 1
    )
    assert metrics.registry.get_sample_value("outrider_rollout_candidate_weight", {"agent": "bot"}) == 0


async def test_restore_continues_generations(
    parts: tuple[RolloutManager, FlakyPublisher, RollingWindows, ManualClock, CollectorMetrics],
) -> None:
    manager = parts[0]
    spec = load_spec_text(SPEC_YAML, "s.yaml")
    old = control_pb2.RolloutState(
        agent="bot",
        generation=7,
        rollout_id="r0",
        phase=control_pb2.ROLLOUT_PHASE_PROMOTED,
        spec_yaml=SPEC_YAML,
    )
    manager.restore({"bot": [old]})
    assert manager.status("bot").state == old
    started = (await manager.start(spec, SPEC_YAML, "")).state
    assert started is not None and started.generation == 8 and started.decided_by == "admin"
    aborted = (await manager.abort("bot", "stop", "ops")).state
    assert aborted is not None and aborted.generation == 9


async def test_a_restored_running_rollout_gets_its_evidence_and_is_decided(
    parts: tuple[RolloutManager, FlakyPublisher, RollingWindows, ManualClock, CollectorMetrics],
) -> None:
    manager, publisher, _windows, clock, _metrics = parts
    running = control_pb2.RolloutState(
        agent="bot",
        generation=3,
        rollout_id="r1",
        stable_version_id="aaaaaaaaaaaa",
        candidate_version_id="bbbbbbbbbbbb",
        candidate_weight=0.1,
        phase=control_pb2.ROLLOUT_PHASE_RUNNING,
        step_count=1,
        spec_yaml=SPEC_YAML,
        started_at_unix_nano=int(clock.now() * 1e9),
        step_started_at_unix_nano=int(clock.now() * 1e9),
    )
    manager.restore({"bot": [running]})
    evidence = manager.evidence.get("bot")
    assert evidence is not None and evidence.rollout_id == "r1"
    clock.advance(10)
    assert await manager.tick() == []  # nothing to decide on yet
    live = manager.status("bot").state.gate_results
    assert [r.name for r in live][:1] == ["errors"] and live[0].verdict == "waiting"
    events = [call("r1", "aaaaaaaaaaaa", common_pb2.ROLE_STABLE, f"a{i}") for i in range(200)]
    events += [call("r1", "bbbbbbbbbbbb", common_pb2.ROLE_CANARY, f"b{i}", failed=True) for i in range(50)]
    manager.evidence.add_events(events, clock.now())
    clock.advance(10)
    (rolled_back,) = await manager.tick()
    assert rolled_back.phase == control_pb2.ROLLOUT_PHASE_ROLLED_BACK and rolled_back.generation == 4
    assert publisher.written == [rolled_back]
