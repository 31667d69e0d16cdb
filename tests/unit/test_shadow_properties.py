"""Hypothesis: whatever the pairs, the clock and the operator do in and after the shadow phase,
every rollout state is valid, and a rollout never goes back into shadow."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from collector import RolloutFinished, ShadowRows, WrongPhase
from collector._shadow_evidence import AGREE, JDELTA
from collector._shadow_phase import in_shadow
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
)
from tests.unit.shadow_support import SHADOW, ShadowHarness

SPEC_YAML = f"""
agent: bot
stable: {STABLE_V}
candidate: {CANDIDATE_V}
look_interval: 1s
shadow:
  sample: 40
  min_duration: 5s
  min_pairs: 50
  max_duration: 60s
  gates:
    - {{name: tools, metric: tool_agreement, min: 0.8, min_samples: 10}}
    - {{name: quality, metric: judge_score, max_decrease: 0.1, min_samples: 10, on_failure: hold}}
steps:
  - {{weight: 10, min_duration: 5s}}
  - {{weight: 50, min_duration: 5s}}
"""
_units = itertools.count()

pairs = st.tuples(
    st.just("pairs"),
    st.sampled_from([0, 5, 50]),  # stable sessions, 3 pairs each
    st.sampled_from([1.0, 1.0, 1.0, 0.85, 0.5]),  # agreement (mostly good: the phases after shadow)
    st.sampled_from([0.0, 0.0, 0.0, -0.3]),  # judge score delta
    st.integers(0, 2**32 - 1),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("round"), st.sampled_from([1.0, 6.0, 70.0]), pairs),  # time, pairs, a look
        pairs,
        st.tuples(st.just("advance"), st.sampled_from([0.0, 1.0, 6.0, 70.0])),
        st.tuples(st.just("look")),
        st.tuples(st.sampled_from(["pause", "resume", "abort", "promote"])),
    ),
    max_size=40,
)


def add_pairs(h: ShadowHarness, sessions: int, agree: float, delta: float, seed: int) -> None:
    rng, rows = random.Random(seed), ShadowRows()
    for _ in range(sessions):
        unit = next(_units)
        for _ in range(3):
            rows.append(unit, {AGREE: float(rng.random() < agree), JDELTA: delta + rng.gauss(0, 0.1)})
    h.shadow.pairs += len(rows)
    h.shadow.add(rows, h.clock.now())


def check(h: ShadowHarness, state: control_pb2.RolloutState) -> None:
    spec = h.spec
    assert state.phase in (SHADOW, RUNNING, HOLD, NO_DATA, PROMOTED, ROLLED_BACK, ABORTED)
    if in_shadow(state):
        assert state.candidate_weight == 0.0 and state.shadow_sample == pytest.approx(0.4)
    else:
        assert state.shadow_sample == 0.0
    if state.phase in (RUNNING, HOLD, NO_DATA) and not in_shadow(state):
        assert state.candidate_weight == pytest.approx(spec.effective_weight(state.step_index))
    if state.phase in (ROLLED_BACK, ABORTED):
        assert state.candidate_weight == 0.0
    if state.phase == ROLLED_BACK and state.decided_by == "controller":
        assert any(r.verdict == "harm" and r.action == "rollback" for r in state.gate_results)
    if state.phase == HOLD and state.decided_by == "controller":
        assert any(r.verdict == "harm" and r.action == "hold" for r in state.gate_results)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_shadow_states_stay_valid(operations: list[tuple[object, ...]]) -> None:
    h = ShadowHarness(SPEC_YAML)
    h.start()
    previous, left_shadow = h.state, False
    for op in operations:
        kind, now = op[0], h.clock.now()
        try:
            if kind == "pairs":
                add_pairs(h, *op[1:])  # type: ignore[arg-type]
            elif kind == "advance":
                h.clock.advance(float(op[1]))  # type: ignore[arg-type]
            elif kind == "round":
                h.clock.advance(float(op[1]))  # type: ignore[arg-type]
                add_pairs(h, *op[2][1:])  # type: ignore[index]
                h.tick(0)
            elif kind == "look":
                h.tick(0)
            else:
                propose = getattr(h.ctl, f"propose_{kind}")
                state = propose("ops", now, "ops")
                h.ctl.apply(state)
                h.book.sync(state, h.ctl.spec)
        except (RolloutFinished, WrongPhase):
            pass
        current = h.state
        check(h, current)
        if current is not previous:
            assert current.generation > previous.generation
            assert previous.phase not in (PROMOTED, ROLLED_BACK, ABORTED)
        left_shadow = left_shadow or not in_shadow(current)
        assert not (left_shadow and in_shadow(current)), "went back into shadow"
        previous = current
    for phase in {s.phase for s in h.ctl.timeline}:
        event(f"reached {control_pb2.RolloutPhase.Name(phase)}")
