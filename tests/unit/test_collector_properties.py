"""Hypothesis: whatever the clock, the stats and the operator do, rollout states stay valid."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from collector import (
    ManualClock,
    NoRollout,
    RolloutConflict,
    RolloutController,
    RolloutFinished,
    WindowStats,
    load_spec_text,
)
from outrider.v1 import common_pb2, control_pb2

TERMINAL = {
    control_pb2.ROLLOUT_PHASE_PROMOTED,
    control_pb2.ROLLOUT_PHASE_ROLLED_BACK,
    control_pb2.ROLLOUT_PHASE_ABORTED,
}
SPEC_YAML = """
agent: bot
stable: aaaaaaaaaaaa
candidate: bbbbbbbbbbbb
steps:
  - {weight: 1, min_duration: 5s, min_samples: 10}
  - {weight: 20, min_duration: 10s, min_samples: 10}
  - {weight: 100, min_duration: 5s}
gates:
  - {name: errors, metric: error_rate, max_increase: 0.05, window: 30s, min_samples: 10}
  - {name: latency, metric: latency_p95_ms, max_ratio: 1.5, window: 30s, min_samples: 10, on_failure: hold}
"""
SPEC = load_spec_text(SPEC_YAML, "prop.yaml")


@dataclass
class FakeStats:
    """Any stats at all, per role, whatever the window."""

    by_role: dict[int, WindowStats] = field(default_factory=dict)

    def snapshot(
        self, agent: str, version_id: str, role: int | None, window_s: float, now: float
    ) -> WindowStats:
        return self.by_role.get(role or 0, WindowStats())


stats_strategy = st.builds(
    lambda requests, errors, p95: WindowStats(
        requests, min(errors, requests), min(errors, requests) / requests if requests else 0.0, p95, p95 / 2
    ),
    st.integers(0, 200),
    st.integers(0, 200),
    st.floats(0, 5000),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0, 120)),
        st.tuples(st.just("stats"), stats_strategy, stats_strategy),
        st.tuples(st.just("evaluate")),
        st.tuples(st.just("abort")),
        st.tuples(st.just("start")),
        st.tuples(st.just("reserve"), st.integers(0, 3)),  # a write that failed burns its generation
    ),
    max_size=60,
)


def check(state: control_pb2.RolloutState) -> None:
    assert 0.0 <= state.candidate_weight <= 1.0
    assert 0 <= state.step_index < state.step_count == len(SPEC.steps)
    if state.phase in (control_pb2.ROLLOUT_PHASE_ROLLED_BACK, control_pb2.ROLLOUT_PHASE_ABORTED):
        assert state.candidate_weight == 0.0
    if state.phase == control_pb2.ROLLOUT_PHASE_PROMOTED:
        assert state.candidate_weight == 1.0
    if state.phase == control_pb2.ROLLOUT_PHASE_RUNNING:
        assert state.candidate_weight == SPEC.steps[state.step_index].weight / 100
    assert state.decided_by and state.spec_yaml == SPEC_YAML
    assert len(state.gate_results) == len(SPEC.gates)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_rollout_states_stay_valid(operations: list[tuple[object, ...]]) -> None:
    clock = ManualClock()
    stats = FakeStats()
    ctl = RolloutController("bot")
    ctl.start(SPEC, SPEC_YAML, clock.now(), "test")
    previous = ctl.state
    assert previous is not None
    for op in operations:
        kind = op[0]
        try:
            if kind == "advance":
                clock.advance(float(op[1]))  # type: ignore[arg-type]
            elif kind == "stats":
                stats.by_role = {common_pb2.ROLE_CANARY: op[1], common_pb2.ROLE_STABLE: op[2]}  # type: ignore[dict-item]
            elif kind == "evaluate":
                ctl.evaluate(stats, clock.now())
            elif kind == "reserve":
                ctl.reserve(ctl.generation + int(op[1]))  # type: ignore[call-overload]
            elif kind == "abort":
                ctl.abort("stop", clock.now(), "ops")
            else:
                ctl.start(SPEC, SPEC_YAML, clock.now(), "test")
        except (RolloutFinished, RolloutConflict, NoRollout):
            pass
        current = ctl.state
        assert current is not None
        check(current)
        if current is not previous:
            assert current.generation > previous.generation
            assert current.decided_at_unix_nano >= previous.decided_at_unix_nano
            if previous.phase in TERMINAL and current.rollout_id == previous.rollout_id:
                raise AssertionError("a terminal state changed")
            if current.rollout_id == previous.rollout_id:
                assert current.started_at_unix_nano == previous.started_at_unix_nano
                assert current.step_index >= previous.step_index
        else:
            assert current == previous
        previous = current
    gens = [s.generation for s in ctl.timeline]
    assert gens == sorted(set(gens))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 60), stats_strategy, stats_strategy), max_size=40))
def test_terminal_phases_never_change(steps: list[tuple[float, WindowStats, WindowStats]]) -> None:
    clock = ManualClock()
    ctl = RolloutController("bot")
    ctl.start(SPEC, SPEC_YAML, clock.now(), "test")
    terminal: control_pb2.RolloutState | None = None
    for seconds, cand, base in steps:
        clock.advance(seconds)
        ctl.evaluate(FakeStats({common_pb2.ROLE_CANARY: cand, common_pb2.ROLE_STABLE: base}), clock.now())
        state = ctl.state
        assert state is not None
        if terminal is not None:
            assert state == terminal
        elif state.phase in TERMINAL:
            terminal = state
