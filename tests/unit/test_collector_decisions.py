"""The decisions on top of the evidence: safety, NO_DATA, absolute triggers, the spec's new
fields, and a small fixed-seed run of the simulator for the error rates."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import ManualClock, RollingWindows, SpecError, load_spec_text
from collector._manager import RolloutManager
from collector._metrics import CollectorMetrics
from collector._triggers import evaluate_triggers
from collector.simulate import Scenario, Traffic, apply_effect, baseline_from, simulate, summarize
from outrider.v1 import control_pb2, sidecar_pb2
from tests.unit.rollout_support import (
    CANDIDATE_V,
    HOLD,
    NO_DATA,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    STABLE_V,
    Harness,
    call_event,
    feedback_event,
    jittered,
    safety_event,
)

HEAD = f"agent: bot\nstable: {STABLE_V}\ncandidate: {CANDIDATE_V}\nlook_interval: 1s\n"
SAFETY_SPEC = (
    HEAD
    + """
steps:
  - {weight: 10, min_duration: 1h}
  - {weight: 50, min_duration: 1h, max_duration: 2h}
gates:
  - {name: errors, metric: error_rate, max_increase: 0.02}
  - {name: safety, metric: safety_event_rate, critical_min_calls: 200}
"""
)


def safety_harness(stable_calls: int = 900, candidate_calls: int = 100) -> Harness:
    h = Harness(SAFETY_SPEC)
    h.start()
    h.feed(stable_calls, canary=False)
    h.feed(candidate_calls, canary=True)
    return h


def add_safety(
    h: Harness, arm: int, n: int = 1, *, category: str = "prompt_injection", direction: str = "input"
) -> None:
    now = h.clock.now()
    events = [
        safety_event(h.state.rollout_id, arm, now, category=category, direction=direction) for _ in range(n)
    ]
    assert h.add(events) == n


# -- safety ----------------------------------------------------------------------------------


def test_a_critical_leak_rolls_back_on_the_first_candidate_event() -> None:
    h = safety_harness()
    assert h.tick() is None
    add_safety(h, 1, category="secret.aws_key", direction="output")
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK
    assert state.reason.startswith("gate safety found harm at step 1: harm: 1 critical safety event(s)")
    assert "none on stable in 900 requests" in state.reason
    safety = next(r for r in state.gate_results if r.name == "safety")
    assert safety.verdict == "harm" and safety.unit == "events" and safety.metric == "safety_event_rate"
    assert h.evidence.critical_events == [0, 1]


@pytest.mark.parametrize(
    ("stable_calls", "stable_events", "category", "direction"),
    [
        (150, 0, "secret", "output"),  # stable has not had critical_min_calls yet
        (900, 1, "secret", "output"),  # stable leaked too
        (900, 0, "secret", "input"),  # a secret in the user's input is not the version's leak
        (900, 0, "prompt_injection", "output"),  # not a critical category
    ],
)
def test_one_event_that_is_not_a_critical_first_goes_through_the_test(
    stable_calls: int, stable_events: int, category: str, direction: str
) -> None:
    h = safety_harness(stable_calls=stable_calls)
    if stable_events:
        add_safety(h, 0, stable_events, category=category, direction=direction)
    add_safety(h, 1, category=category, direction=direction)
    assert h.tick() is None
    safety = next(r for r in h.ctl.evaluation if r.name == "safety")
    assert safety.verdict == "undecided" and 0 < safety.e_value < 1 / safety.alpha


def test_other_categories_roll_back_through_the_e_process() -> None:
    h = safety_harness()
    add_safety(h, 1, 2)  # two events at a ~10 % share: suggestive, not evidence
    assert h.tick() is None
    safety = next(r for r in h.ctl.evaluation if r.name == "safety")
    assert 1 < safety.e_value < 1 / safety.alpha
    add_safety(h, 1, 2)
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK and "gate safety" in state.reason
    assert "e-value" in state.reason and h.evidence.safety_events == [0, 4]


def test_safety_events_in_proportion_to_traffic_are_no_harm() -> None:
    h = safety_harness()
    rng = random.Random(4)
    for _ in range(200):  # each event from the candidate with its traffic share (10 %)
        add_safety(h, int(rng.random() < 0.1))
    assert h.tick() is None
    safety = next(r for r in h.ctl.evaluation if r.name == "safety")
    assert safety.verdict == "undecided" and safety.e_value < 1 / safety.alpha
    assert sum(h.evidence.safety_events) == 200


# -- NO_DATA ---------------------------------------------------------------------------------

LAST_STAGE_SPEC = (
    HEAD
    + """
steps:
  - {weight: 50, min_duration: 1m, max_duration: 5m}
gates:
  - {name: errors, metric: error_rate, max_increase: 0.02}
"""
)


def test_a_last_stage_without_a_decision_goes_to_no_data_and_never_promotes() -> None:
    h = Harness(LAST_STAGE_SPEC)
    h.start()
    h.feed(20, canary=False)
    h.feed(20, canary=True)  # too little for any gate to decide
    changes = [s for _ in range(12) if (s := h.tick(30)) is not None]
    assert len(changes) == 1
    no_data = changes[0]
    assert no_data.phase == NO_DATA and no_data.candidate_weight == pytest.approx(0.5)
    assert no_data.reason.startswith("no data: step 1 passed its max_duration of 300s without")
    assert "errors" in no_data.reason
    assert no_data.release and "errors" in no_data.release
    assert no_data.decided_at_unix_nano - no_data.step_started_at_unix_nano > 300e9
    # hours more without evidence: recorded once, never promoted
    later = [h.tick(600) for _ in range(100)]
    assert later == [None] * 100
    assert h.state == no_data and h.ctl.timeline[-1].phase == NO_DATA


def test_no_data_keeps_testing_for_harm() -> None:
    h = Harness(LAST_STAGE_SPEC)
    h.start()
    assert h.tick(400) is not None and h.state.phase == NO_DATA
    h.feed(400, canary=False)
    h.feed(400, canary=True, error_every=4)
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK and "gate errors" in state.reason


def test_no_data_promotes_once_the_evidence_arrives() -> None:
    h = Harness(LAST_STAGE_SPEC)
    h.start()
    assert h.tick(400) is not None and h.state.phase == NO_DATA
    h.feed(3000, canary=False)
    h.feed(3000, canary=True)
    state = h.tick()
    assert state is not None and state.phase == PROMOTED
    assert state.release == ""


def test_an_early_stage_short_of_min_samples_goes_to_no_data_then_advances() -> None:
    h = Harness(
        HEAD
        + """
steps:
  - {weight: 5, min_duration: 1m, min_samples: 500, max_duration: 10m}
  - {weight: 50, min_duration: 1m}
gates:
  - {name: errors, metric: error_rate, max_increase: 0.02}
"""
    )
    h.start()
    h.feed(100, canary=True)
    assert h.tick(300) is None
    state = h.tick(301)
    assert state is not None and state.phase == NO_DATA and state.step_index == 0
    assert "500 candidate requests (has 100)" in state.reason and "500 candidate requests" in state.release
    h.feed(400, canary=True)
    state = h.tick()
    assert state is not None and state.phase == RUNNING and state.step_index == 1
    assert state.candidate_weight == pytest.approx(0.5)


# -- absolute triggers -----------------------------------------------------------------------

TRIGGER_SPEC = (
    HEAD
    + """
steps:
  - {weight: 10, min_duration: 1h}
  - {weight: 50, min_duration: 1h}
"""
)


def trigger(h: Harness, name: str) -> control_pb2.GateResult:
    return next(r for r in h.ctl.evaluation if r.name == f"trigger:{name}")


def test_error_rate_trigger_fires_on_a_candidate_far_above_the_limit() -> None:
    h = Harness(TRIGGER_SPEC)
    h.start()
    h.feed(1000, canary=False, error_every=100)
    h.feed(200, canary=True, error_every=5)  # 20 % against a 2 % limit
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK
    assert state.reason.startswith("trigger:error_rate found harm at step 1: fired: candidate 20.00%")
    fired = next(r for r in state.gate_results if r.name == "trigger:error_rate")
    assert fired.kind == "trigger" and fired.lower > 0.02 and fired.baseline_value == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("stable_every", "candidate_calls", "candidate_every", "expected"),
    [
        (20, 200, 5, "suppressed"),  # stable at 5 %: the incident is not the candidate's
        (100, 200, 33, "quiet"),  # 3 % on 200 calls: not evidence of more than 2 %
        (100, 99, 1, "waiting"),  # everything failed, but short of min_samples
    ],
)
def test_error_rate_trigger_stays_quiet(
    stable_every: int, candidate_calls: int, candidate_every: int, expected: str
) -> None:
    h = Harness(TRIGGER_SPEC)
    h.start()
    h.feed(1000, canary=False, error_every=stable_every)
    h.feed(candidate_calls, canary=True, error_every=candidate_every)
    assert h.tick() is None
    result = trigger(h, "error_rate")
    assert result.verdict != "harm" and expected in result.detail


def test_p99_trigger_needs_consecutive_minutes() -> None:
    h = Harness(TRIGGER_SPEC)
    h.start()
    states = []
    for _minute in range(3):
        h.feed(500, canary=False)
        h.feed(80, canary=True)
        h.feed(20, canary=True, latency_ms=20_000)  # a fifth of the calls slower than 10 s
        states.append(h.tick(1))
        if states[-1] is None:
            assert "3 consecutive minutes" in trigger(h, "latency_p99_ms").detail
        h.clock.advance(59)
    assert states[:2] == [None, None]
    state = states[2]
    assert state is not None and state.phase == ROLLED_BACK and "trigger:latency_p99_ms" in state.reason


def test_cost_trigger_freezes_at_the_current_weight() -> None:
    h = Harness(TRIGGER_SPEC)
    h.start()
    rng = random.Random(2)
    rid, now = h.state.rollout_id, h.clock.now()
    h.add([call_event(rid, 0, now, cost_usd=jittered(rng, 0.003, 0.5)) for _ in range(300)])
    h.add([call_event(rid, 1, now, cost_usd=jittered(rng, 0.015, 0.5)) for _ in range(300)])
    state = h.tick()
    assert state is not None and state.phase == HOLD and state.candidate_weight == pytest.approx(0.1)
    assert "trigger:cost_ratio" in state.reason and state.release
    assert trigger(h, "cost_ratio").lower > 3


def test_judge_drop_trigger_compares_scores_to_stable() -> None:
    h = Harness(TRIGGER_SPEC)
    h.start()
    rng = random.Random(3)
    rid, now = h.state.rollout_id, h.clock.now()
    kind = sidecar_pb2.FEEDBACK_KIND_SCORE
    h.add([feedback_event(rid, 0, now, kind=kind, score=min(1.0, rng.gauss(0.8, 0.1))) for _ in range(100)])
    h.add([feedback_event(rid, 1, now, kind=kind, score=min(1.0, rng.gauss(0.78, 0.1))) for _ in range(100)])
    assert h.tick() is None and trigger(h, "judge_drop").verdict != "harm"  # 2.5 % lower: inside 10 %
    h.add([feedback_event(rid, 1, now, kind=kind, score=max(0.0, rng.gauss(0.4, 0.1))) for _ in range(100)])
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK and "trigger:judge_drop" in state.reason


def test_triggers_can_be_disabled_and_share_alpha() -> None:
    spec = load_spec_text(
        TRIGGER_SPEC
        + "gates: [{name: errors, metric: error_rate, max_increase: 0.02}]\n"
        + "triggers:\n  error_rate: {enabled: false, limit: 0.02}\n"
        + "  cost_ratio: {limit: 3, action: rollback}\n",
        "t.yaml",
    )
    assert [name for name, _ in spec.triggers.active()] == ["latency_p99_ms", "cost_ratio", "judge_drop"]
    assert spec.triggers.cost_ratio.action == "rollback"
    h = Harness(TRIGGER_SPEC)
    h.start()
    results = evaluate_triggers(spec, h.evidence, h.clock.now(), 0.001)
    assert [r.name for r in results] == ["trigger:latency_p99_ms", "trigger:cost_ratio", "trigger:judge_drop"]


def test_a_partial_trigger_override_keeps_the_other_defaults() -> None:
    spec = load_spec_text(TRIGGER_SPEC + "triggers: {latency_p99_ms: {limit: 5000}}\n", "t.yaml")
    p99 = spec.triggers.latency_p99_ms
    assert (p99.limit, p99.window, p99.consecutive) == (5000.0, 180.0, 3)
    window = load_spec_text(TRIGGER_SPEC + "triggers: {error_rate: {window: 10m}}\n", "t.yaml")
    assert window.triggers.error_rate.limit == 0.02


# -- the spec --------------------------------------------------------------------------------


def test_a_full_step_keeps_a_stable_holdback() -> None:
    steps = "steps:\n  - {weight: 20, min_duration: 1m}\n  - {weight: 100, min_duration: 1m}\n"
    spec = load_spec_text(HEAD + steps, "h.yaml")
    assert spec.holdback == 5.0 and [spec.effective_weight(i) for i in (0, 1)] == [0.2, 0.95]
    h = Harness(
        HEAD + "holdback: 10\n" + steps + "gates: [{name: e, metric: error_rate, max_increase: 0.02}]\n"
    )
    h.start()
    h.feed(10, canary=True)
    state = h.tick(60)
    assert state is not None and state.step_index == 1 and state.candidate_weight == pytest.approx(0.9)
    assert "advancing to step 2 at 90%" in state.reason
    only = Harness(HEAD + "steps: [{weight: 100}]\n")
    assert only.start().candidate_weight == pytest.approx(0.95)


def test_windows_longer_than_the_collector_keeps_are_refused() -> None:
    manager = RolloutManager(None, RollingWindows(1, 900), CollectorMetrics(), ManualClock())  # type: ignore[arg-type]
    fits = load_spec_text(
        HEAD + "steps: [{weight: 5}]\ngates: [{name: e, metric: error_rate, "
        "max_increase: 0.02, window: 15m}]\n",
        "ok.yaml",
    )
    manager.check_windows(fits, "ok.yaml")  # the default triggers' hour is kept apart
    long_gate = load_spec_text(
        HEAD + "steps: [{weight: 5}]\ngates:\n  - {name: e, metric: error_rate, max_increase: 0.02}\n"
        "  - {name: t, metric: task_failure_rate, max_increase: 0.05, window: 1h}\n",
        "r.yaml",
    )
    with pytest.raises(SpecError) as info:
        manager.check_windows(long_gate, "r.yaml")
    assert info.value.source == "r.yaml" and len(info.value.problems) == 1  # only the long one
    assert str(info.value).startswith("r.yaml: gates[1].window: 3600s exceeds")
    assert "retention_s 900s" in str(info.value)
    long_trigger = load_spec_text(
        HEAD + "steps: [{weight: 5}]\ntriggers: {cost_ratio: {limit: 3, window: 2h, action: hold}}\n",
        "r.yaml",
    )
    with pytest.raises(SpecError, match=r"triggers\.cost_ratio\.window: 7200s exceeds"):
        manager.check_windows(long_trigger, "r.yaml")


@settings(max_examples=50, deadline=None)
@given(
    st.integers(0, 12),
    st.floats(0.001, 0.2),
    st.one_of(st.just(0.0), st.floats(0.01, 0.5)),  # the triggers' share of alpha
    st.sets(st.sampled_from(["error_rate", "latency_p99_ms", "cost_ratio", "judge_drop"])),
)
def test_alpha_is_split_across_gates_and_triggers(
    gates: int, alpha: float, share: float, off: set[str]
) -> None:
    """Bonferroni: every gate's and trigger's alpha add up to at most the spec's."""
    gate_lines = "".join(
        f"  - {{name: g{i}, metric: error_rate, max_increase: 0.02}}\n" for i in range(gates)
    )
    triggers = "".join(f"  {name}: {{enabled: false, limit: 1}}\n" for name in sorted(off))
    spec = load_spec_text(
        HEAD
        + f"alpha: {alpha}\ntrigger_alpha_share: {share}\nsteps: [{{weight: 5}}]\n"
        + (f"gates:\n{gate_lines}" if gates else "")
        + (f"triggers:\n{triggers}" if off else ""),
        "a.yaml",
    )
    gate_alpha, trigger_alpha = spec.test_alphas()
    total = gate_alpha * gates + trigger_alpha * len(spec.triggers.active())
    assert total <= alpha * (1 + 1e-9)
    assert gate_alpha > 0 and (trigger_alpha > 0) == bool(spec.triggers.active() and share > 0)


# -- the simulator ---------------------------------------------------------------------------

SIM_SPEC = """
agent: bot
stable: aaaaaaaaaaaa
candidate: bbbbbbbbbbbb
look_interval: 10s
steps:
  - {weight: 10, min_duration: 1m, min_samples: 100}
  - {weight: 50, min_duration: 2m, max_duration: 1h}
gates:
  - {name: errors, metric: error_rate, max_increase: 0.01}
  - {name: latency, metric: latency_p95_ms, max_ratio: 1.2}
triggers:  # 3 % errors is truly above its 2 % limit: off, so that the gate alone answers
  error_rate: {enabled: false, limit: 0.02}
"""
RUNS = 30


def test_simulated_error_rates_on_a_short_spec() -> None:
    """Fixed seeds, small N: bounds loose enough for any seed (at most 2 % expected false
    rollbacks; +2 pts of errors is many standard errors within the hour)."""
    base = baseline_from("error_rate=0.01,latency_p50_ms=800,latency_sigma=0.5,session_calls=3")
    identical = simulate(
        Scenario(SIM_SPEC, base, base, 10.0, max_virtual_time_s=7200), RUNS, seed=101, workers=1
    )
    worse = apply_effect(base, "error_rate=0.02")
    errors = simulate(
        Scenario(SIM_SPEC, base, worse, 10.0, max_virtual_time_s=7200), RUNS, seed=202, workers=1
    )
    same = summarize(identical)
    assert same["runs"] == RUNS and same["rolled_back"] <= 3
    assert same["promoted"] + same["rolled_back"] + same["held"] + same["undecided"] == RUNS
    assert same["promoted"] >= RUNS - 3
    bad = summarize(errors)
    assert bad["rolled_back_by_gate"].get("errors", 0) >= 27
    assert bad["rolled_back_by_metric"].get("error_rate", 0) >= 27 and bad["promoted"] == 0
    assert all(r.decided_s is not None and r.decided_s <= 7200 for r in errors if r.outcome == "rolled_back")
    # the oracle (a Wald SPRT knowing the truth) needs fewer calls than any real test
    assert bad["oracle_median_candidate_calls"] <= bad["median_rollback_candidate_calls"]


def test_the_simulator_is_reproducible_and_parses_its_keys() -> None:
    scenario = Scenario(SIM_SPEC, Traffic(), Traffic(), 10.0, max_virtual_time_s=600)
    first, again = simulate(scenario, 4, seed=9, workers=1), simulate(scenario, 4, seed=9, workers=1)
    assert first == again
    base = baseline_from("error_rate=0.02,task_success=0.9")
    assert (base.error_rate, base.task_success, base.feedback_share) == (0.02, 0.9, Traffic().feedback_share)
    cand = apply_effect(base, "task_success=-0.05,latency_p50_ms=x1.2")
    assert cand.task_success == pytest.approx(0.85) and cand.latency_p50_ms == pytest.approx(960)
    assert Scenario(SIM_SPEC, base, cand, 1.0).effect_key == "task_success"
    with pytest.raises(ValueError, match="unknown key 'errors'"):
        baseline_from("errors=0.1")
    with pytest.raises(ValueError, match="error_rate"):
        apply_effect(base, "error_rate=2")
    assert math.isclose(
        apply_effect(base, "cost_per_call_usd=x2").cost_per_call_usd, 2 * base.cost_per_call_usd
    )
