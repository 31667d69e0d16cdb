"""Hypothesis: whatever the clock, the traffic and the operator do, rollout states stay valid."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from collector import NoRollout, RolloutConflict, RolloutFinished, Rows
from outrider.v1 import control_pb2
from tests.unit.rollout_support import (
    ABORTED,
    CANDIDATE_V,
    HOLD,
    NO_DATA,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    STABLE_V,
    TERMINAL,
    Harness,
    session_rows,
)

SPEC_YAML = f"""
agent: bot
stable: {STABLE_V}
candidate: {CANDIDATE_V}
look_interval: 1s
steps:
  - {{weight: 1, min_duration: 5s, min_samples: 10}}
  - {{weight: 20, min_duration: 10s, min_samples: 10}}
  - {{weight: 100, min_duration: 5s, max_duration: 60s}}
gates:
  - {{name: errors, metric: error_rate, max_increase: 0.05, window: 30s, min_samples: 10}}
  - {{name: latency, metric: latency_p95_ms, max_ratio: 1.5, window: 30s, min_samples: 10, on_failure: hold}}
"""
SPEC = Harness(SPEC_YAML).spec
GATES = [g.name for g in SPEC.gates]
_units = itertools.count()

traffic = st.tuples(
    st.just("feed"),
    st.sampled_from([0, 3, 30, 300]),  # stable sessions (3 calls each)
    st.sampled_from([0.0, 0.01, 0.3]),  # their error rate
    st.sampled_from([0, 3, 30, 300]),  # candidate sessions
    st.sampled_from([0.0, 0.01, 0.3]),
    st.sampled_from([1.0, 1.05, 3.0]),  # candidate latency ratio
    st.integers(0, 2**32 - 1),  # the draws' seed
)
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("round"), st.sampled_from([0.0, 1.0, 6.0, 11.0, 70.0]), traffic
        ),  # time, traffic, a look
        st.tuples(st.just("advance"), st.floats(0, 120)),
        traffic,
        st.tuples(st.just("evaluate")),
        st.tuples(st.just("abort")),
        st.tuples(st.just("start")),
        st.tuples(st.just("reserve"), st.integers(0, 3)),  # a write that failed burns its generation
    ),
    max_size=60,
)


def feed(h: Harness, n0: int, p0: float, n1: int, p1: float, ratio: float, seed: int) -> None:
    if h.ctl.state is None:
        return
    rows, rng, now = Rows(), random.Random(seed), h.clock.now()
    for arm, n, p in ((0, n0, p0), (1, n1, p1)):
        session_rows(
            h.evidence,
            rows,
            arm,
            now,
            n,
            error_rate=p,
            latency_ms=100.0 * (ratio if arm else 1.0),
            rng=rng,
            units=_units,
        )
    h.evidence.add(rows, now)


def check(state: control_pb2.RolloutState) -> None:
    assert 0.0 <= state.candidate_weight <= 1.0
    assert 0 <= state.step_index < state.step_count == len(SPEC.steps)
    assert state.phase in (RUNNING, HOLD, NO_DATA, PROMOTED, ROLLED_BACK, ABORTED)
    if state.phase in (ROLLED_BACK, ABORTED):
        assert state.candidate_weight == 0.0
    if state.phase == PROMOTED:
        assert state.candidate_weight == 1.0 and state.step_index == len(SPEC.steps) - 1
        gates = [r for r in state.gate_results if r.kind == "gate"]
        assert all(r.verdict == "no_harm" for r in gates if r.metric != "safety_event_rate")
    if state.phase == ROLLED_BACK:
        assert any(r.verdict == "harm" and r.action == "rollback" for r in state.gate_results)
    if state.phase in (RUNNING, HOLD, NO_DATA):
        assert state.candidate_weight == pytest.approx(SPEC.effective_weight(state.step_index))
        assert state.candidate_weight < 1.0  # a concurrent baseline until the tests decide
    if state.phase in (HOLD, NO_DATA):
        assert state.release
    if state.phase == HOLD:
        assert any(r.verdict == "harm" and r.action == "hold" for r in state.gate_results)
    assert state.decided_by and state.spec_yaml == SPEC_YAML
    assert [r.name for r in state.gate_results][: len(GATES)] == GATES


@settings(max_examples=200, deadline=None)
@given(ops)
def test_rollout_states_stay_valid(operations: list[tuple[object, ...]]) -> None:
    h = Harness(SPEC_YAML)
    h.start()
    previous = h.state
    for op in operations:
        kind = op[0]
        try:
            if kind == "advance":
                h.clock.advance(float(op[1]))  # type: ignore[arg-type]
            elif kind == "feed":
                feed(h, *op[1:])  # type: ignore[arg-type]
            elif kind == "round":
                h.clock.advance(float(op[1]))  # type: ignore[arg-type]
                feed(h, *op[2][1:])  # type: ignore[index]
                h.tick(0)
            elif kind == "evaluate":
                h.tick(0)
            elif kind == "reserve":
                h.ctl.reserve(h.ctl.generation + int(op[1]))  # type: ignore[call-overload]
            elif kind == "abort":
                h.ctl.abort("stop", h.clock.now(), "ops")
            else:
                h.start()
        except (RolloutFinished, RolloutConflict, NoRollout):
            pass
        current = h.state
        check(current)
        if current is not previous:
            assert current.generation > previous.generation
            assert current.decided_at_unix_nano >= previous.decided_at_unix_nano
            if previous.phase in TERMINAL and current.rollout_id == previous.rollout_id:
                raise AssertionError("a terminal state changed")
            if current.rollout_id == previous.rollout_id:
                assert current.started_at_unix_nano == previous.started_at_unix_nano
                assert current.step_index >= previous.step_index
                assert previous.phase != HOLD or current.phase in (ROLLED_BACK, ABORTED)
                assert (
                    previous.phase != NO_DATA
                    or current.phase != RUNNING
                    or (current.step_index > previous.step_index)
                )
            # the evidence follows the rollout and its stages
            assert h.evidence.rollout_id == current.rollout_id
            assert h.evidence.stage == current.step_index
        else:
            assert current == previous
        previous = current
    gens = [s.generation for s in h.ctl.timeline]
    assert gens == sorted(set(gens))
    for phase in {s.phase for s in h.ctl.timeline}:
        event(f"reached {control_pb2.RolloutPhase.Name(phase)}")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 1.0, 6.0, 11.0, 70.0]), traffic), max_size=30))
def test_terminal_phases_never_change(rounds: list[tuple[float, tuple[object, ...]]]) -> None:
    h = Harness(SPEC_YAML)
    h.start()
    terminal: control_pb2.RolloutState | None = None
    for seconds, op in rounds:
        feed(h, *op[1:])  # type: ignore[arg-type]
        h.tick(seconds)
        state = h.state
        check(state)
        if terminal is not None:
            assert state == terminal
        elif state.phase in TERMINAL:
            terminal = state
    event(f"ended {control_pb2.RolloutPhase.Name(h.state.phase)}")
