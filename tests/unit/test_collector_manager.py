"""The rule that a rollout state counts only once it is on the control topic (publisher faked)."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError

from collector import ManualClock, NoRollout, PublishError, RollingWindows, load_spec_text
from collector._manager import RolloutManager
from collector._metrics import CollectorMetrics
from outrider.v1 import common_pb2, control_pb2

SPEC_YAML = """
agent: bot
stable: aaaaaaaaaaaa
candidate: bbbbbbbbbbbb
steps: [{weight: 10, min_duration: 1m}]
gates: [{name: errors, metric: error_rate, max_increase: 0.05, window: 1m, min_samples: 5}]
"""


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
    manager, publisher, windows, clock, metrics = parts
    spec = load_spec_text(SPEC_YAML, "s.yaml")
    publisher.failures = 1
    with pytest.raises(PublishError, match="generation 1"):
        await manager.start(spec, SPEC_YAML, "ops")
    with pytest.raises(NoRollout):
        manager.status("bot")
    started = (await manager.start(spec, SPEC_YAML, "ops")).state
    assert started is not None and started.generation == 2  # 1 may have landed: never reused
    for i in range(10):
        windows.record("bot", "aaaaaaaaaaaa", common_pb2.ROLE_STABLE, clock.now(), 10, False, clock.now())
        windows.record(
            "bot", "bbbbbbbbbbbb", common_pb2.ROLE_CANARY, clock.now(), 10, i % 2 == 0, clock.now()
        )
    publisher.failures = 2
    assert await manager.tick() == []
    assert await manager.tick() == []
    ctl = manager.get("bot")
    assert ctl is not None and ctl.state == started
    assert metrics.publish_failures._value.get() == 3
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
