"""The rollout controller, driven by a ManualClock and real rolling windows."""

from __future__ import annotations

import itertools

import pytest

from collector import (
    ManualClock,
    NoRollout,
    RollingWindows,
    RolloutConflict,
    RolloutController,
    RolloutFinished,
    RolloutSpec,
    load_spec_text,
)
from outrider.v1 import common_pb2, control_pb2

STABLE_V, CANDIDATE_V = "1a2b3c4d5e6f", "9f8e7d6c5b4a"
RUNNING = control_pb2.ROLLOUT_PHASE_RUNNING
PROMOTED = control_pb2.ROLLOUT_PHASE_PROMOTED
ROLLED_BACK = control_pb2.ROLLOUT_PHASE_ROLLED_BACK
ABORTED = control_pb2.ROLLOUT_PHASE_ABORTED

SPEC_YAML = f"""
agent: bot
stable: {STABLE_V}
candidate: {CANDIDATE_V}
steps:
  - {{weight: 10, min_duration: 30s, min_samples: 20}}
  - {{weight: 50, min_duration: 30s, min_samples: 20}}
  - {{weight: 100, min_duration: 30s, min_samples: 20}}
gates:
  - {{name: errors, metric: error_rate, max_increase: 0.05, window: 1m, min_samples: 20}}
  - {{name: latency, metric: latency_p95_ms, max_ratio: 1.5, window: 1m, min_samples: 20}}
"""
_ids = itertools.count()


class Harness:
    def __init__(self, spec_yaml: str = SPEC_YAML) -> None:
        self.clock = ManualClock()
        self.windows = RollingWindows(bucket_s=1, retention_s=600)
        self.spec: RolloutSpec = load_spec_text(spec_yaml, "test.yaml")
        self.yaml = spec_yaml
        self.ctl = RolloutController("bot")

    def feed(self, n: int, *, canary: bool, error_every: int = 0, latency_ms: float = 100.0) -> None:
        role = common_pb2.ROLE_CANARY if canary else common_pb2.ROLE_STABLE
        version = CANDIDATE_V if canary else STABLE_V
        now = self.clock.now()
        for i in range(n):
            error = error_every > 0 and i % error_every == 0
            self.windows.record("bot", version, role, now, latency_ms, error, now)

    def tick(self, seconds: float = 1.0) -> control_pb2.RolloutState | None:
        self.clock.advance(seconds)
        return self.ctl.evaluate(self.windows, self.clock.now())

    def healthy_traffic_for(
        self, seconds: int, *, latency_ms: float = 100.0
    ) -> list[control_pb2.RolloutState]:
        changes = []
        for _ in range(seconds):
            self.feed(5, canary=False)
            self.feed(2, canary=True, latency_ms=latency_ms)
            if (state := self.tick()) is not None:
                changes.append(state)
        return changes


def test_start_sets_first_step() -> None:
    h = Harness()
    state = h.ctl.start(h.spec, h.yaml, h.clock.now(), "cli:alice", generation_base=41)
    assert state.phase == RUNNING and state.generation == 42
    assert state.candidate_weight == pytest.approx(0.10)
    assert (state.step_index, state.step_count) == (0, 3)
    assert state.decided_by == "cli:alice" and state.spec_yaml == h.yaml
    assert state.stable_version_id == STABLE_V and state.candidate_version_id == CANDIDATE_V
    assert state.sticky_by == common_pb2.STICKY_BY_SESSION
    assert [g.name for g in state.gate_results] == ["errors", "latency"]
    assert len(state.rollout_id) == 12
    assert [s.generation for s in h.ctl.timeline] == [42]


def test_healthy_candidate_advances_through_steps_to_promoted() -> None:
    h = Harness()
    h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    changes = h.healthy_traffic_for(200)
    assert [c.phase for c in changes] == [RUNNING, RUNNING, PROMOTED]
    assert [c.candidate_weight for c in changes] == [pytest.approx(0.5), 1.0, 1.0]
    assert [c.step_index for c in changes] == [1, 2, 2]
    assert [c.generation for c in changes] == [2, 3, 4]
    assert all(c.decided_by == "controller" for c in changes)
    assert all(g.ready and g.passed for c in changes for g in c.gate_results)
    started = changes[0].started_at_unix_nano
    assert all(c.started_at_unix_nano == started and c.spec_yaml == h.yaml for c in changes)
    # each step is held at least its min_duration
    times = [h.ctl.timeline[0].at_unix_nano] + [c.decided_at_unix_nano for c in changes]
    assert all(b - a >= 30e9 for a, b in itertools.pairwise(times))
    assert "promoted" in changes[-1].reason
    assert [s.phase for s in h.ctl.timeline] == [RUNNING, RUNNING, RUNNING, PROMOTED]
    assert h.tick() is None and h.ctl.state is not None and h.ctl.state.phase == PROMOTED


def test_error_gate_rolls_back() -> None:
    h = Harness()
    h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    h.feed(40, canary=False)
    h.feed(30, canary=True, error_every=3)  # 34% errors vs 0%
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK
    assert state.candidate_weight == 0 and state.generation == 2
    assert "gate errors failed at step 1" in state.reason and "0.3333" in state.reason
    errors = state.gate_results[0]
    assert errors.ready and not errors.passed
    assert errors.candidate_value == pytest.approx(10 / 30) and errors.baseline_value == 0
    assert errors.limit == pytest.approx(0.05)
    assert (errors.candidate_samples, errors.baseline_samples) == (30, 40)


def test_latency_gate_rolls_back() -> None:
    h = Harness()
    h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    h.feed(40, canary=False, latency_ms=100)
    h.feed(40, canary=True, latency_ms=200)
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK
    assert "gate latency failed" in state.reason
    latency = state.gate_results[1]
    assert latency.candidate_value == pytest.approx(200, rel=0.02)
    assert latency.limit == pytest.approx(150, rel=0.02)


def test_gates_wait_for_min_samples() -> None:
    h = Harness()
    h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    h.feed(40, canary=False)
    h.feed(19, canary=True, error_every=1)  # all errors, but one sample short
    assert h.tick(60) is None
    assert h.ctl.state is not None and h.ctl.state.phase == RUNNING and h.ctl.state.step_index == 0
    decided = h.ctl.decide(h.windows, h.clock.now())
    assert decided is None
    h.feed(1, canary=True, error_every=1)
    state = h.tick(0)
    assert state is not None and state.phase == ROLLED_BACK


def test_step_waits_for_min_samples_even_after_min_duration() -> None:
    h = Harness(SPEC_YAML.replace("window: 1m, min_samples: 20}", "window: 1m, min_samples: 5}"))
    h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    h.feed(10, canary=False)
    h.feed(10, canary=True)  # gates ready and passing, step needs 20
    assert h.tick(45) is None
    h.feed(10, canary=True)
    state = h.tick()
    assert state is not None and state.step_index == 1


def test_hold_stays_at_step_and_records_once() -> None:
    h = Harness(
        SPEC_YAML.replace(
            "max_ratio: 1.5, window: 1m, min_samples: 20}",
            "max_ratio: 1.5, window: 1m, min_samples: 20, on_failure: hold}",
        )
    )
    h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    changes = h.healthy_traffic_for(60, latency_ms=400)
    assert len(changes) == 1
    held = changes[0]
    assert held.phase == RUNNING and held.step_index == 0 and "held at step 1: gate latency" in held.reason
    assert held.gate_results[1].ready and not held.gate_results[1].passed
    # once the candidate is fast again (and the slow samples leave the window) it advances
    changes = h.healthy_traffic_for(120)
    assert changes and changes[0].step_index == 1


def test_abort_and_terminal_states_stay_terminal() -> None:
    h = Harness()
    h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    state = h.ctl.abort("bad vibes", h.clock.now(), "cli:bob")
    assert state.phase == ABORTED and state.candidate_weight == 0 and state.generation == 2
    assert state.reason == "aborted: bad vibes" and state.decided_by == "cli:bob"
    assert h.healthy_traffic_for(200) == []
    with pytest.raises(RolloutFinished):
        h.ctl.abort("again", h.clock.now(), "x")
    # a new rollout may start after a terminal one; generations continue
    again = h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    assert again.generation == 3 and again.rollout_id != state.rollout_id
    assert [s.generation for s in h.ctl.timeline] == [3]


def test_start_while_running_conflicts_and_abort_without_rollout() -> None:
    h = Harness()
    with pytest.raises(NoRollout):
        h.ctl.abort("x", h.clock.now(), "x")
    h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    with pytest.raises(RolloutConflict):
        h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    with pytest.raises(ValueError, match="agent"):
        RolloutController("other").start(h.spec, h.yaml, h.clock.now())


def test_proposals_do_not_change_state_until_applied() -> None:
    h = Harness()
    proposal = h.ctl.propose_start(h.spec, h.yaml, h.clock.now(), "test")
    assert h.ctl.state is None
    h.ctl.apply(proposal, h.spec)
    abort = h.ctl.propose_abort("x", h.clock.now(), "test")
    assert h.ctl.state is proposal
    with pytest.raises(ValueError, match="generation"):
        h.ctl.apply(proposal)
    h.ctl.apply(abort)
    assert h.ctl.state is abort


def test_restore_resumes_running_rollout_from_spec_yaml() -> None:
    h = Harness()
    first = h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    changes = h.healthy_traffic_for(40)
    restored = RolloutController.restore([changes[0], first, first])
    assert restored.state == changes[0] and restored.spec == h.spec
    assert [s.generation for s in restored.timeline] == [1, 2]
    h.ctl = restored
    later = h.healthy_traffic_for(200)
    assert later[-1].phase == PROMOTED and later[0].generation == 3


def test_restore_with_invalid_spec_freezes_rollout() -> None:
    h = Harness()
    state = h.ctl.start(h.spec, h.yaml, h.clock.now(), "test")
    state.spec_yaml = "steps: nope"
    restored = RolloutController.restore([state])
    assert restored.running and restored.spec is None
    assert restored.decide(h.windows, h.clock.now()) is None
    assert restored.abort("fix it", h.clock.now(), "ops").phase == ABORTED


def test_restore_orders_by_writer_epoch_then_generation() -> None:
    old_writer = control_pb2.RolloutState(agent="bot", epoch=1, generation=2**62, rollout_id="a")
    new_writer = control_pb2.RolloutState(agent="bot", epoch=2, generation=7, rollout_id="b")
    restored = RolloutController.restore([new_writer, old_writer])
    assert restored.state == new_writer
    assert restored.generation == 7  # the next decision is (new epoch, 8)
