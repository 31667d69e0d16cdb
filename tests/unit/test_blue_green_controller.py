"""Blue-green in the pure controller on a manual clock: smoke tests, the switch, the warm
period with its triggers and gates, the swap, and the operator's switch-back."""

from __future__ import annotations

import itertools

import pytest

from collector import EvidenceBook
from collector._bluegreen_phase import NO_BASELINE, NO_SIDECAR, blue_baseline
from collector._deployments import build_record
from collector._errors import WrongPhase
from outrider.v1 import control_pb2, deployment_pb2, events_pb2
from tests.unit.rollout_support import AGENT, CANDIDATE_V, ROLLED_BACK, Harness, call_event

SMOKE_TEST, SWITCHED = control_pb2.ROLLOUT_PHASE_SMOKE_TEST, control_pb2.ROLLOUT_PHASE_SWITCHED
PROMOTED = control_pb2.ROLLOUT_PHASE_PROMOTED
_ids = itertools.count()

SPEC = f"""
agent: {AGENT}
stable: 1a2b3c4d5e6f
candidate: {CANDIDATE_V}
strategy: blue_green
look_interval: 1s
drain_timeout: 5m
triggers:
  error_rate: {{limit: 0.05, min_samples: 50}}
blue_green:
  smoke_timeout: 2m
  keep_warm: 10m
  smoke_tests:
    - {{name: lookup, prompt: "where is order 7?", expect_tools: [lookup_order]}}
    - {{name: greet, prompt: "hello", expect_content: "hel+o", max_latency: 2s}}
"""


class BlueGreenHarness(Harness):
    baseline: deployment_pb2.BaselineSnapshot | None = None

    def tick(self, seconds: float = 1.0) -> control_pb2.RolloutState | None:
        self.clock.advance(seconds)
        state = self.ctl.evaluate(
            self.evidence, self.clock.now(), smoke=self.book.smoke.get(AGENT), baseline=self.baseline
        )
        if state is not None:
            self.book.sync(state, self.ctl.spec)
        return state

    def smoke(self, test: str, passed: bool = True, failure: str = "", sidecar: str = "sc-1") -> None:
        event = events_pb2.Event(
            event_id=f"smoke{next(_ids)}",
            agent=AGENT,
            version_id=CANDIDATE_V,
            rollout_id=self.state.rollout_id,
            sidecar_id=sidecar,
            smoke=events_pb2.SmokeTestRecord(
                test_name=test, passed=passed, failure=failure, latency_ms=12.0, test_count=2
            ),
        )
        assert self.add([event]) == 1

    def switched(self) -> control_pb2.RolloutState:
        self.start()
        self.smoke("lookup")
        self.smoke("greet")
        state = self.tick()
        assert state is not None and state.phase == SWITCHED, state
        return state


def test_blue_green_starts_in_smoke_test_with_green_at_weight_zero() -> None:
    h = BlueGreenHarness(SPEC)
    state = h.start()
    assert state.phase == SMOKE_TEST and state.candidate_weight == 0.0
    assert state.strategy == control_pb2.ROLLOUT_STRATEGY_BLUE_GREEN
    assert [t.name for t in state.smoke.tests] == ["lookup", "greet"]
    assert state.smoke.timeout_s == 120.0 and state.keep_warm_s == 600.0
    assert state.smoke.tests[0].expect_tools == ["lookup_order"]
    assert state.smoke.tests[1].max_latency_ms == 2000.0
    assert state.smoke.tests[0].messages[0].content == "where is order 7?"


def test_blue_green_smoke_pass_switches_then_swaps_after_keep_warm() -> None:
    h = BlueGreenHarness(SPEC)
    h.start()
    h.smoke("lookup")
    assert h.tick() is None  # one of two: not complete yet
    assert [r.verdict for r in h.ctl.evaluation] == ["no_harm", "waiting"]
    h.smoke("greet", sidecar="sc-2")  # another sidecar's result does not complete sc-1's set
    assert h.tick() is None
    h.smoke("greet")
    state = h.tick()
    assert state is not None and state.phase == SWITCHED and state.candidate_weight == 1.0
    assert state.switched_at_unix_nano == round(h.clock.now() * 1e9)
    assert (state.step_index, state.step_count) == (1, 2) and h.evidence.stage == 1
    assert "lookup" in state.reason and "greet" in state.reason and "sc-1" in state.reason
    assert {r.kind for r in state.gate_results} == {"smoke"}
    # blue warm: healthy green traffic, no swap before keep_warm
    for _ in range(5):
        h.add([call_event(state.rollout_id, 1, h.clock.now()) for _ in range(20)])
        assert h.tick(100) is None
    assert h.ctl.evaluation and all(r.kind == "trigger" for r in h.ctl.evaluation)
    done = h.tick(100)
    assert done is not None and done.phase == PROMOTED, done
    assert "swap: green is stable, blue released" in done.reason
    assert not done.retired  # nothing drained: blue's sessions just end


def test_blue_green_smoke_failure_rolls_back_naming_the_test() -> None:
    h = BlueGreenHarness(SPEC)
    h.start()
    h.smoke("lookup", passed=False, failure="expected tool lookup_order, got search_orders")
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK and state.candidate_weight == 0.0
    assert "'lookup'" in state.reason and "expected tool lookup_order" in state.reason
    assert [e.version_id for e in state.retired] == [CANDIDATE_V]


def test_blue_green_smoke_timeout_rolls_back() -> None:
    h = BlueGreenHarness(SPEC)
    h.start()
    h.smoke("lookup")
    assert h.tick(60) is None
    state = h.tick(61)
    assert state is not None and state.phase == ROLLED_BACK
    assert NO_SIDECAR in state.reason and "1 of 2" in state.reason


def test_blue_green_trigger_while_warm_switches_back_with_drain() -> None:
    h = BlueGreenHarness(SPEC)
    switched = h.switched()
    t = h.clock.now()
    h.add([call_event(switched.rollout_id, 0, t) for _ in range(100)])  # blue's warm sessions
    h.add(
        [
            call_event(switched.rollout_id, 1, t, error_class="provider_5xx" if i % 2 else "")
            for i in range(40)
        ]
    )
    assert h.tick() is None  # below the trigger's 50 samples: no decision yet
    h.add([call_event(switched.rollout_id, 1, h.clock.now(), error_class="provider_5xx") for _ in range(200)])
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK and state.candidate_weight == 0.0
    assert state.reason.startswith("switched back: trigger:error_rate"), state.reason
    (entry,) = state.retired
    assert entry.version_id == CANDIDATE_V
    assert entry.drain_deadline_unix_nano == round((h.clock.now() + 300) * 1e9)


def test_blue_green_gate_against_blues_baseline_snapshot() -> None:
    spec = SPEC.replace(
        "triggers:",
        "gates:\n  - {name: errors, metric: error_rate, max_increase: 0.02, min_samples: 30}\ntriggers:",
    )
    h = BlueGreenHarness(spec)
    switched = h.switched()
    h.add([call_event(switched.rollout_id, 1, h.clock.now()) for _ in range(40)])
    assert h.tick() is None
    assert h.ctl.evaluation[0].detail == NO_BASELINE
    h.baseline = deployment_pb2.BaselineSnapshot(error_rate=0.001, requests=5000)
    assert h.tick() is None  # green clean: no harm against the baseline either
    h.add([call_event(switched.rollout_id, 1, h.clock.now(), error_class="provider_5xx") for _ in range(60)])
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK
    assert "gate errors" in state.reason and "baseline" in state.reason


def test_blue_green_operator_switch_back_and_its_preconditions() -> None:
    h = BlueGreenHarness(SPEC)
    h.switched()
    state = h.ctl.propose_switch_back("latency looks off", h.clock.now(), "token:ops")
    assert state.phase == ROLLED_BACK and state.candidate_weight == 0.0 and state.decided_by == "token:ops"
    assert "switched back by token:ops while blue was warm: latency looks off" in state.reason
    h.ctl.apply(state)
    with pytest.raises(WrongPhase, match="ROLLOUT_PHASE_ROLLED_BACK"):
        h.ctl.propose_switch_back("again", h.clock.now(), "token:ops")
    with pytest.raises(WrongPhase, match="does not pause"):
        smoke = BlueGreenHarness(SPEC)
        smoke.start()
        smoke.ctl.propose_pause("", smoke.clock.now(), "ops")
    canary = Harness(
        SPEC.replace("strategy: blue_green", "").split("triggers:")[0] + "steps: [{weight: 10}]\n"
    )
    canary.start()
    with pytest.raises(WrongPhase, match="canary in phase ROLLOUT_PHASE_RUNNING"):
        canary.ctl.propose_switch_back("", canary.clock.now(), "ops")


def test_blue_green_smoke_test_switch_back_before_the_switch() -> None:
    h = BlueGreenHarness(SPEC)
    h.start()
    state = h.ctl.propose_switch_back("", h.clock.now(), "ops")
    assert state.phase == ROLLED_BACK and "before the switch" in state.reason


def test_blue_green_baseline_is_the_newest_promotion_of_blue() -> None:
    def record(
        candidate: str, ended: int, rate: float, baseline: bool = True
    ) -> deployment_pb2.DeploymentRecord:
        r = deployment_pb2.DeploymentRecord(
            agent=AGENT, candidate_version_id=candidate, outcome=PROMOTED, ended_at_unix_nano=ended
        )
        if baseline:
            r.baseline.error_rate = rate
        return r

    records = [
        record("blue", 1, 0.1),
        record("blue", 3, 0.3),
        record("blue", 5, 0.5, False),
        record("x", 9, 0.9),
    ]
    found = blue_baseline(records, AGENT, "blue")
    assert found is not None and found.error_rate == 0.3
    assert blue_baseline(records, AGENT, "nope") is None


def test_blue_green_deployment_record_has_the_smoke_and_switched_stages() -> None:
    h = BlueGreenHarness(SPEC)
    h.switched()
    done = h.tick(601)
    assert done is not None and done.phase == PROMOTED
    record = build_record(done, h.ctl.timeline, 0.0, h.clock.now())
    assert [(s.candidate_weight, s.ended) for s in record.stages] == [(0.0, "advanced"), (1.0, "promoted")]
    assert "passed all 2 smoke tests" in record.stages[0].reason
    assert record.stages[1].duration_s == pytest.approx(601.0)


def test_blue_green_operator_promote_names_the_phase_and_smoke_results_survive_a_checkpoint() -> None:
    h = BlueGreenHarness(SPEC)
    h.start()
    h.smoke("lookup", passed=False, failure="expected tool lookup_order, got none")
    copy = EvidenceBook()
    copy.load_state(h.book.to_state())
    results = copy.smoke.get(AGENT)
    assert results is not None and results.rollout_id == h.state.rollout_id
    failed = results.failure()
    assert failed is not None and failed[0] == "sc-1" and failed[1].failure.startswith("expected tool")
    promoted = h.ctl.propose_promote("hotfix", h.clock.now(), "ops")
    assert "operator override of a blue-green in ROLLOUT_PHASE_SMOKE_TEST" in promoted.reason
