"""The rollout controller on a ManualClock, deciding on evidence built from real events."""

from __future__ import annotations

import itertools

import pytest

from collector import NoRollout, RolloutConflict, RolloutController, RolloutFinished
from outrider.v1 import common_pb2, control_pb2
from tests.unit.rollout_support import (
    ABORTED,
    CANDIDATE_V,
    HOLD,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    STABLE_V,
    Harness,
)

SPEC_YAML = f"""
agent: bot
stable: {STABLE_V}
candidate: {CANDIDATE_V}
look_interval: 1s
steps:
  - {{weight: 10, min_duration: 30s, min_samples: 20}}
  - {{weight: 50, min_duration: 30s, min_samples: 20}}
  - {{weight: 100, min_duration: 30s, min_samples: 20}}
gates:
  - {{name: errors, metric: error_rate, max_increase: 0.05, window: 1m, min_samples: 20}}
  - {{name: latency, metric: latency_p95_ms, max_ratio: 1.5, window: 1m, min_samples: 20}}
"""


def gates_of(state: object) -> list[object]:
    return [g for g in state.gate_results if g.kind == "gate"]  # type: ignore[attr-defined]


def test_start_sets_first_step() -> None:
    h = Harness(SPEC_YAML)
    state = h.start("cli:alice", generation_base=41)
    assert state.phase == RUNNING and state.generation == 42
    assert state.candidate_weight == pytest.approx(0.10)
    assert (state.step_index, state.step_count) == (0, 3)
    assert state.decided_by == "cli:alice" and state.spec_yaml == h.yaml
    assert state.stable_version_id == STABLE_V and state.candidate_version_id == CANDIDATE_V
    assert state.sticky_by == common_pb2.STICKY_BY_SESSION
    assert [g.name for g in state.gate_results] == ["errors", "latency"]
    assert all(g.verdict == "waiting" for g in state.gate_results)
    assert state.alpha == pytest.approx(0.02)
    assert len(state.rollout_id) == 12
    assert [s.generation for s in h.ctl.timeline] == [42]
    # the evidence of the new rollout starts empty, at stage 0
    assert h.evidence.rollout_id == state.rollout_id and h.evidence.stage == 0
    assert h.evidence.candidate_requests(0) == 0


def test_healthy_candidate_advances_through_steps_to_promoted() -> None:
    h = Harness(SPEC_YAML)
    h.start()
    changes = h.healthy_traffic_for(200)
    assert [c.phase for c in changes] == [RUNNING, RUNNING, PROMOTED]
    # a 100 % step keeps a 5 % stable holdback until the tests decide
    assert [c.candidate_weight for c in changes] == [pytest.approx(0.5), pytest.approx(0.95), 1.0]
    assert [c.step_index for c in changes] == [1, 2, 2]
    assert [c.generation for c in changes] == [2, 3, 4]
    assert all(c.decided_by == "controller" for c in changes)
    assert all(g.verdict != "harm" for c in changes for g in c.gate_results)
    # promotion needs every gate to rule out harm beyond its margin
    assert all(g.ready and g.passed and g.verdict == "no_harm" for g in gates_of(changes[-1]))
    started = changes[0].started_at_unix_nano
    assert all(c.started_at_unix_nano == started and c.spec_yaml == h.yaml for c in changes)
    # each step is held at least its min_duration
    times = [h.ctl.timeline[0].at_unix_nano] + [c.decided_at_unix_nano for c in changes]
    assert all(b - a >= 30e9 for a, b in itertools.pairwise(times))
    assert "promoted" in changes[-1].reason
    assert [s.phase for s in h.ctl.timeline] == [RUNNING, RUNNING, RUNNING, PROMOTED]
    # the evidence followed the stages: one stratum per step
    assert h.evidence.stage == 2 and all(h.evidence.candidate_requests(i) > 0 for i in range(3))
    assert h.tick() is None and h.state.phase == PROMOTED


def test_error_gate_rolls_back() -> None:
    h = Harness(SPEC_YAML)
    h.start()
    h.feed(200, canary=False)
    h.feed(99, canary=True, error_every=3)  # 33 % errors against none
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK
    assert state.candidate_weight == 0 and state.generation == 2
    assert state.reason.startswith("gate errors found harm at step 1: harm: candidate worse than stable")
    errors = state.gate_results[0]
    assert errors.name == "errors" and errors.verdict == "harm" and errors.ready and not errors.passed
    assert errors.candidate_value == pytest.approx(33 / 99) and errors.baseline_value == 0
    assert errors.lower > 0 and errors.estimate == pytest.approx(33 / 99)
    assert errors.limit == pytest.approx(0.05) and errors.unit == "pts"
    assert (errors.candidate_samples, errors.baseline_samples) == (99, 200)


def test_error_gate_needs_evidence_not_a_point_estimate() -> None:
    """30 % errors on 30 calls is far above the margin, but not yet evidence of harm."""
    h = Harness(SPEC_YAML)
    h.start()
    h.feed(40, canary=False)
    h.feed(30, canary=True, error_every=3)
    assert h.tick() is None
    errors = h.ctl.evaluation[0]
    assert errors.verdict == "undecided" and errors.lower < 0 < errors.estimate


def test_latency_gate_rolls_back() -> None:
    h = Harness(SPEC_YAML)
    h.start()
    h.feed(40, canary=False, latency_ms=100)
    h.feed(40, canary=True, latency_ms=200)
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK
    assert "gate latency found harm" in state.reason
    latency = state.gate_results[1]
    assert latency.verdict == "harm" and latency.unit == "ratio" and latency.lower > 1
    assert latency.estimate == pytest.approx(2.0, rel=0.2)
    assert latency.candidate_value == pytest.approx(200, rel=0.2)
    assert latency.baseline_value == pytest.approx(100, rel=0.2)
    assert latency.limit == pytest.approx(1.5)


def test_gates_wait_for_min_samples() -> None:
    h = Harness(
        SPEC_YAML.replace(
            "max_increase: 0.05, window: 1m, min_samples: 20",
            "max_increase: 0.05, window: 1m, min_samples: 100",
        )
    )
    h.start()
    h.feed(200, canary=False)
    h.feed(99, canary=True, error_every=1)  # all errors, but one sample short
    assert h.tick(10) is None
    assert h.state.phase == RUNNING and h.state.step_index == 0
    errors = h.ctl.evaluation[0]
    assert errors.verdict == "waiting" and not errors.ready
    assert "100 " in errors.waiting_for and "candidate 99" in errors.waiting_for
    h.feed(1, canary=True, error_every=1)
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK and "gate errors" in state.reason


def test_step_waits_for_min_samples_even_after_min_duration() -> None:
    h = Harness(SPEC_YAML.replace("window: 1m, min_samples: 20}", "window: 1m, min_samples: 5}"))
    h.start()
    h.feed(10, canary=False)
    h.feed(10, canary=True)  # gates ready and harmless, the step needs 20 candidate requests
    assert h.tick(45) is None
    assert h.state.step_index == 0
    h.feed(10, canary=True)
    state = h.tick()
    assert state is not None and state.step_index == 1 and state.phase == RUNNING
    assert "20 candidate requests" in state.reason


def test_hold_stays_at_step_and_records_once() -> None:
    h = Harness(
        SPEC_YAML.replace(
            "max_ratio: 1.5, window: 1m, min_samples: 20}",
            "max_ratio: 1.5, window: 1m, min_samples: 20, on_failure: hold}",
        )
    )
    h.start()
    changes = h.healthy_traffic_for(60, latency_ms=400)
    assert len(changes) == 1
    held = changes[0]
    assert held.phase == HOLD and held.step_index == 0
    assert held.candidate_weight == pytest.approx(0.10)
    assert held.reason.startswith("held at step 1: gate latency found harm")
    assert held.release  # what would release it
    latency = held.gate_results[1]
    assert latency.ready and not latency.passed and latency.verdict == "harm" and latency.action == "hold"
    # a fast candidate again does not release it: only an operator does
    assert h.healthy_traffic_for(120) == []
    assert h.state == held
    # the rollback tests keep running in HOLD
    h.feed(300, canary=True, error_every=2)
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK and "gate errors" in state.reason


def test_abort_and_terminal_states_stay_terminal() -> None:
    h = Harness(SPEC_YAML)
    h.start()
    state = h.ctl.abort("bad vibes", h.clock.now(), "cli:bob")
    assert state.phase == ABORTED and state.candidate_weight == 0 and state.generation == 2
    assert state.reason == "aborted: bad vibes" and state.decided_by == "cli:bob"
    assert h.healthy_traffic_for(200) == []
    with pytest.raises(RolloutFinished):
        h.ctl.abort("again", h.clock.now(), "x")
    # a new rollout may start after a terminal one; generations continue
    again = h.start()
    assert again.generation == 3 and again.rollout_id != state.rollout_id
    assert [s.generation for s in h.ctl.timeline] == [3]
    assert h.evidence.rollout_id == again.rollout_id  # and its evidence starts afresh


def test_start_while_running_conflicts_and_abort_without_rollout() -> None:
    h = Harness(SPEC_YAML)
    with pytest.raises(NoRollout):
        h.ctl.abort("x", h.clock.now(), "x")
    h.start()
    with pytest.raises(RolloutConflict):
        h.start()
    with pytest.raises(ValueError, match="agent"):
        RolloutController("other").start(h.spec, h.yaml, h.clock.now())


def test_proposals_do_not_change_state_until_applied() -> None:
    h = Harness(SPEC_YAML)
    proposal = h.ctl.propose_start(h.spec, h.yaml, h.clock.now(), "test")
    assert h.ctl.state is None
    h.ctl.apply(proposal, h.spec)
    abort = h.ctl.propose_abort("x", h.clock.now(), "test")
    assert h.ctl.state is proposal
    with pytest.raises(ValueError, match="generation"):
        h.ctl.apply(proposal)
    h.ctl.apply(abort)
    assert h.ctl.state is abort


def test_looks_are_spaced_by_look_interval() -> None:
    h = Harness(SPEC_YAML.replace("look_interval: 1s", "look_interval: 10s"))
    h.start()
    h.feed(200, canary=False)
    assert h.tick(10) is None  # a look, nothing to decide
    h.feed(99, canary=True, error_every=3)
    assert h.tick(9) is None  # no look yet: 9 s since the last one
    state = h.tick(1)
    assert state is not None and state.phase == ROLLED_BACK


def test_restore_resumes_running_rollout_from_spec_yaml() -> None:
    h = Harness(SPEC_YAML)
    first = h.start()
    changes = h.healthy_traffic_for(40)
    assert changes and changes[0].step_index == 1
    restored = RolloutController.restore([changes[0], first, first])
    assert restored.state == changes[0] and restored.spec == h.spec
    assert [s.generation for s in restored.timeline] == [1, 2]
    h.ctl = restored  # the evidence stays with the book (it is checkpointed apart)
    later = h.healthy_traffic_for(200)
    assert later[-1].phase == PROMOTED and later[0].generation == 3


def test_restore_with_invalid_spec_freezes_rollout() -> None:
    h = Harness(SPEC_YAML)
    state = h.start()
    state.spec_yaml = "steps: nope"
    restored = RolloutController.restore([state])
    assert restored.running and restored.spec is None
    h.feed(200, canary=True, error_every=1)
    assert restored.decide(h.evidence, h.clock.now() + 60) is None
    assert restored.abort("fix it", h.clock.now(), "ops").phase == ABORTED


def test_restore_orders_by_writer_epoch_then_generation() -> None:
    old_writer = control_pb2.RolloutState(agent="bot", epoch=1, generation=2**62, rollout_id="a")
    new_writer = control_pb2.RolloutState(agent="bot", epoch=2, generation=7, rollout_id="b")
    restored = RolloutController.restore([new_writer, old_writer])
    assert restored.state == new_writer
    assert restored.generation == 7  # the next decision is (new epoch, 8)
