"""The shadow phase of the rollout controller, on a ManualClock, deciding on real events."""

from __future__ import annotations

import pytest

from collector import RolloutController, WrongPhase
from tests.unit.rollout_support import (
    ABORTED,
    AGENT,
    CANDIDATE_V,
    HOLD,
    NO_DATA,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    STABLE_V,
)
from tests.unit.shadow_support import SHADOW, ShadowHarness, judge_event

SPEC = f"""
agent: bot
stable: {STABLE_V}
candidate: {CANDIDATE_V}
look_interval: 1s
shadow:
  sample: 25
  min_duration: 30s
  min_pairs: 100
  max_duration: 10m
  gates:
    - {{name: tools, metric: tool_agreement, min: 0.8, min_samples: 20}}
steps:
  - {{weight: 10, min_duration: 30s}}
  - {{weight: 50, min_duration: 30s}}
gates:
  - {{name: errors, metric: error_rate, max_increase: 0.05, min_samples: 20}}
"""
PURE = SPEC.split("steps:")[0]


def test_start_in_shadow_with_no_candidate_traffic() -> None:
    h = ShadowHarness(SPEC)
    state = h.start()
    assert state.phase == SHADOW and state.candidate_weight == 0.0
    assert state.shadow_sample == pytest.approx(0.25)
    assert (state.step_index, state.step_count) == (0, 2)
    assert "shadow phase, 25% of stable's calls mirrored" in state.reason
    assert [(g.name, g.kind, g.verdict) for g in state.gate_results] == [("tools", "shadow", "waiting")]
    assert h.shadow.rollout_id == state.rollout_id


def test_agreeing_pairs_open_the_first_step() -> None:
    h = ShadowHarness(SPEC)
    h.start()
    changes = []
    for _ in range(40):
        h.pairs(3)
        if (state := h.tick()) is not None:
            changes.append(state)
    assert [c.phase for c in changes] == [RUNNING]
    state = changes[0]
    assert state.step_index == 0 and state.candidate_weight == pytest.approx(0.10)
    assert state.shadow_sample == 0.0  # mirroring ends with the shadow phase
    assert "shadow phase passed" in state.reason and "opening step 1 of 2 at 10%" in state.reason
    assert [g.verdict for g in state.gate_results] == ["no_harm"]
    assert [s.phase for s in h.ctl.timeline] == [SHADOW, RUNNING]
    # the canary evidence starts with the first step: nothing from the shadow phase is in it
    assert h.evidence.stage_starts[0] == pytest.approx(h.clock.now())
    # and the canary gates decide from here
    h.healthy_traffic_for(2)
    assert {g.kind for g in h.ctl.evaluation} == {"gate", "trigger"}


def test_floors_hold_the_shadow_phase_even_when_gates_pass() -> None:
    h = ShadowHarness(SPEC)
    h.start()
    h.pairs(60)  # 120 pairs from 60 sessions at once: gates pass, but min_duration is 30s
    for _ in range(20):
        assert h.tick() is None
    assert h.state.phase == SHADOW
    assert h.ctl.evaluation[0].verdict == "no_harm"


def test_disagreeing_tools_roll_back_in_shadow_naming_the_gate() -> None:
    h = ShadowHarness(SPEC)
    h.start()
    state = None
    for _ in range(60):
        h.pairs(2, agree=False)
        h.pairs(2, agree=True)
        if (state := h.tick()) is not None:
            break
    assert state is not None and state.phase == ROLLED_BACK
    assert state.candidate_weight == 0.0 and state.shadow_sample == 0.0
    assert state.reason.startswith(
        "shadow gate tools found harm in the shadow phase: harm: tool agreement 0.5"
    )
    assert "min 0.800" in state.reason
    assert [r.version_id for r in state.retired] == [CANDIDATE_V]


def test_hold_gate_holds_and_resume_returns_to_shadow() -> None:
    h = ShadowHarness(SPEC.replace("min_samples: 20}", "min_samples: 20, on_failure: hold}", 1))
    h.start()
    for _ in range(60):
        h.pairs(4, agree=False)
        if h.tick() is not None:
            break
    assert h.state.phase == HOLD and h.state.shadow_sample == pytest.approx(0.25)
    assert "held in the shadow phase: shadow gate tools found harm" in h.state.reason
    resumed = h.ctl.propose_resume("fixed the tool", h.clock.now(), "alice")
    h.ctl.apply(resumed)
    assert resumed.phase == SHADOW and resumed.shadow_sample == pytest.approx(0.25)


def test_pause_resume_abort_and_promote_in_shadow() -> None:
    h = ShadowHarness(SPEC)
    h.start()
    paused = h.ctl.propose_pause("looking", h.clock.now(), "alice")
    assert paused.phase == HOLD and paused.shadow_sample == pytest.approx(0.25)
    h.ctl.apply(paused)
    with pytest.raises(WrongPhase):
        h.ctl.propose_pause("again", h.clock.now(), "alice")
    h.pairs(60)
    h.clock.advance(60)
    assert h.tick() is None  # a paused shadow waits for the operator, whatever the gates say
    resumed = h.ctl.propose_resume("ok", h.clock.now(), "alice")
    assert resumed.phase == SHADOW
    h.ctl.apply(resumed)
    promoted = h.ctl.propose_promote("ship it", h.clock.now(), "bob")
    assert promoted.phase == PROMOTED and promoted.candidate_weight == 1.0 and promoted.shadow_sample == 0
    assert "operator override in the shadow phase" in promoted.reason
    aborted = h.ctl.propose_abort("no", h.clock.now(), "bob")
    assert aborted.phase == ABORTED and aborted.shadow_sample == 0.0


def test_no_pairs_by_max_duration_is_no_data_and_pairs_release_it() -> None:
    h = ShadowHarness(SPEC)
    h.start()
    changes = [s for _ in range(601) if (s := h.tick()) is not None]
    assert [c.phase for c in changes] == [NO_DATA]
    assert changes[0].shadow_sample == pytest.approx(0.25)  # still mirroring, still looking
    assert "the shadow phase passed its max_duration of 600s without 100 pairs (has 0)" in changes[0].reason
    h.pairs(60)
    state = h.tick()
    assert state is not None and state.phase == RUNNING and state.step_index == 0


def test_pure_shadow_run_ends_without_promoting() -> None:
    h = ShadowHarness(PURE)
    h.start()
    assert "a pure shadow run" in h.state.reason
    end = None
    for _ in range(40):
        h.pairs(3)
        if (end := h.tick()) is not None:
            break
    assert end is not None and end.phase == ABORTED and end.decided_by == "controller"
    assert end.reason.startswith("shadow run complete: ") and "stable stays" in end.reason
    assert end.candidate_weight == 0.0


def test_judge_pairs_feed_a_judge_score_gate() -> None:
    spec = PURE.replace(
        "min: 0.8, min_samples: 20}",
        "min: 0.8, min_samples: 20}\n    - {name: q, metric: judge_score, max_decrease: 0.05}",
    )
    h = ShadowHarness(spec)
    h.start()
    end = None
    for i in range(120):
        h.pairs(2)
        now, rollout = h.clock.now(), h.state.rollout_id
        worse = [
            judge_event(rollout, now, f"j{i}-{k}", score=0.5, stable_score=0.8, preference="stable")
            for k in range(3)
        ]
        h.add(worse)
        if (end := h.tick()) is not None:
            break
    assert end is not None and end.phase == ROLLED_BACK
    assert end.reason.startswith(
        "shadow gate q found harm in the shadow phase: harm: judge score drop +0.3000"
    )


def test_restore_keeps_the_shadow_phase() -> None:
    h = ShadowHarness(SPEC)
    first = h.start()
    paused = h.ctl.propose_pause("x", h.clock.now(), "alice")
    h.ctl.apply(paused)
    ctl = RolloutController.restore([first, paused])
    assert ctl.spec is not None and ctl.spec.shadow is not None and ctl.running
    assert ctl.propose_resume("y", h.clock.now(), "alice").phase == SHADOW
    assert ctl.agent == AGENT
