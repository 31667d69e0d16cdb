"""Blue-green rollouts in the controller: pure decisions, made into states by `_rollout`.

Blue is stable, green the candidate (`strategy: blue_green`, collector._bluegreen_spec):

    SMOKE_TEST   candidate_weight 0: every new session to blue; `smoke` carries the plan and the
                 sidecars run it against green, each reporting a SmokeTestRecord per test.
                 One sidecar's complete, passing set -> SWITCHED; any failure -> ROLLED_BACK
                 naming the test; nothing complete by `smoke_timeout` -> ROLLED_BACK.
    SWITCHED     candidate_weight 1: every new session to green at once; sessions pinned to blue
                 keep being served (blue is warm). The absolute triggers (with their minimum
                 samples) watch green, and error-rate gates compare green with blue's baseline
                 snapshot (the one recorded when blue was promoted) when there is one.
                 Any harm, or an operator's switch-back -> ROLLED_BACK: new sessions back to blue
                 at once, green retired with the spec's drain. `keep_warm` after the switch with
                 no harm -> PROMOTED (the swap: green is stable, blue released).

This is the one documented exception to "never promote on no evidence": the switch happens on
the smoke tests alone, and the warm period then guards it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from collector._errors import WrongPhase
from collector._evidence import REQ, T_ERR, T_REQ, RolloutEvidence
from collector._gates import HARM, NO_HARM, UNDECIDED, WAITING, design_effect
from collector._smoke_results import SmokeResults
from collector._spec import Gate, RolloutSpec
from collector._triggers import evaluate_triggers
from collector.stats import msprt_half_width
from outrider.v1 import control_pb2, deployment_pb2

SMOKE_TEST = control_pb2.ROLLOUT_PHASE_SMOKE_TEST
SWITCHED = control_pb2.ROLLOUT_PHASE_SWITCHED
ROLLED_BACK = control_pb2.ROLLOUT_PHASE_ROLLED_BACK
PROMOTED = control_pb2.ROLLOUT_PHASE_PROMOTED
BLUE_GREEN = control_pb2.ROLLOUT_STRATEGY_BLUE_GREEN
NO_SIDECAR = "no sidecar ran the smoke tests"
NO_BASELINE = "no baseline snapshot of blue was recorded: gates have nothing to compare green with"


def is_blue_green(state: control_pb2.RolloutState) -> bool:
    return state.strategy == BLUE_GREEN


def to_smoke_test(state: control_pb2.RolloutState, spec: RolloutSpec) -> None:
    """Make a rollout's first state a blue-green one: SMOKE_TEST, green at weight 0."""
    assert spec.blue_green is not None
    bg = spec.blue_green
    names = ", ".join(t.name for t in bg.smoke_tests)
    state.phase, state.candidate_weight, state.strategy = SMOKE_TEST, 0.0, BLUE_GREEN
    state.smoke.CopyFrom(bg.plan())
    # `time_scale` (demos) shortens the warm period; the smoke tests are real calls and keep their timeout
    # two stages, as records and timelines count them: 1 smoke tests at 0 %, 2 switched at 100 %
    state.keep_warm_s, state.step_count = bg.keep_warm * spec.time_scale, 2
    state.reason = (
        f"started: blue-green, smoke tests against green ({len(bg.smoke_tests)}: {names}) "
        f"within {bg.smoke_timeout:g}s; blue serves every session meanwhile"
    )


def decide(
    state: control_pb2.RolloutState,
    spec: RolloutSpec,
    evidence: RolloutEvidence,
    now: float,
    smoke: SmokeResults | None,
    baseline: deployment_pb2.BaselineSnapshot | None,
) -> tuple[list[control_pb2.GateResult] | None, dict[str, Any] | None]:
    """(the results looked at, None in SMOKE_TEST; the next state's fields or None) at one look."""
    if state.phase == SMOKE_TEST:
        mine = smoke if smoke is not None and smoke.rollout_id == state.rollout_id else None
        return smoke_results(state, mine), decide_smoke(state, mine, now)
    if state.phase == SWITCHED:
        return decide_switched(state, spec, evidence, baseline, now)
    return None, None


def _summary(outcomes: list[Any]) -> str:
    return ", ".join(f"{o.test} ({o.latency_ms:.0f} ms)" for o in outcomes)


def smoke_results(
    state: control_pb2.RolloutState, smoke: SmokeResults | None
) -> list[control_pb2.GateResult]:
    """The smoke tests as results (kind "smoke") for status and the record: the failing sidecar's,
    else a complete passing one's, else the most complete sidecar's."""
    outcomes: dict[str, Any] = {}
    sidecar = ""
    if smoke is not None and smoke.by_sidecar:
        failed = smoke.failure()
        passed = smoke.complete_pass(len(state.smoke.tests))
        sidecar = (
            failed[0]
            if failed
            else passed[0]
            if passed
            else max(smoke.by_sidecar, key=lambda k: len(smoke.by_sidecar[k]))
        )
        outcomes = smoke.by_sidecar[sidecar]
    results = []
    for test in state.smoke.tests:
        result = control_pb2.GateResult(name=test.name, metric="smoke_test", kind="smoke", action="rollback")
        outcome = outcomes.get(test.name)
        if outcome is None:
            result.verdict, result.detail = WAITING, "not reported yet"
            result.waiting_for = "a sidecar to run it against green"
        else:
            result.ready, result.candidate_value, result.candidate_samples = True, outcome.latency_ms, 1
            result.unit = "ms"
            result.verdict = NO_HARM if outcome.passed else HARM
            result.detail = (
                f"passed in {outcome.latency_ms:.0f} ms on sidecar {sidecar}"
                if outcome.passed
                else f"failed on sidecar {sidecar}: {outcome.failure}"
            )
        results.append(result)
    return results


def decide_smoke(
    state: control_pb2.RolloutState, smoke: SmokeResults | None, now: float
) -> dict[str, Any] | None:
    """SMOKE_TEST: the next state's fields, or None while results are still to come."""
    wanted = len(state.smoke.tests)
    results = smoke if smoke is not None and smoke.rollout_id == state.rollout_id else None
    if results is not None:
        failed = results.failure()
        if failed is not None:
            sidecar, outcome = failed
            return {
                "phase": ROLLED_BACK,
                "weight": 0.0,
                "reason": f"smoke test {outcome.test!r} failed on sidecar {sidecar}: {outcome.failure}; "
                "green never served a user",
            }
        passed = results.complete_pass(wanted)
        if passed is not None:
            sidecar, outcomes = passed
            keep = state.keep_warm_s
            return {
                "phase": SWITCHED,
                "weight": 1.0,
                "step_index": 1,
                "reason": f"switched: green passed all {wanted} smoke tests on sidecar {sidecar} "
                f"({_summary(outcomes)}); every new session to green, blue warm for {keep:g}s",
            }
    elapsed = now - state.started_at_unix_nano / 1e9
    if elapsed > state.smoke.timeout_s:
        got = results.most_complete() if results is not None else 0
        partial = f" (the most complete sidecar reported {got} of {wanted})" if got else ""
        return {
            "phase": ROLLED_BACK,
            "weight": 0.0,
            "reason": f"smoke tests timed out after {state.smoke.timeout_s:g}s: {NO_SIDECAR} to "
            f"completion{partial}; is green in the sidecars' versions?",
        }
    return None


def baseline_gate(
    gate: Gate,
    evidence: RolloutEvidence,
    baseline: deployment_pb2.BaselineSnapshot | None,
    now: float,
    alpha: float,
) -> control_pb2.GateResult:
    """A gate in SWITCHED: green's figure over the gate's window against blue's baseline snapshot.

    Only error-rate gates have a baseline figure to test against; the bound is the same
    anytime-valid one as the triggers', so looking every interval does not inflate the error.
    """
    result = control_pb2.GateResult(
        name=gate.name,
        metric=gate.metric,
        limit=gate.limit,
        margin=gate.limit,
        alpha=alpha,
        kind="gate",
        action="rollback",
        verdict=UNDECIDED,
    )
    if baseline is None:
        result.detail = NO_BASELINE
        return result
    if gate.metric != "error_rate":
        result.detail = f"no baseline figure for {gate.metric} (only error_rate): not compared"
        return result
    window = evidence.window(now, gate.window)
    errors, requests = float(window[1, T_ERR]), float(window[1, T_REQ])
    limit = baseline.error_rate + gate.limit
    result.unit = "pts"
    result.baseline_value, result.baseline_samples = baseline.error_rate, baseline.requests
    result.candidate_samples = int(requests)
    if requests < gate.min_samples:
        result.verdict = WAITING
        result.waiting_for = f"{gate.min_samples} green requests in {gate.window:g}s (has {int(requests)})"
        result.detail = f"waiting for {result.waiting_for}"
        return result
    rate = errors / requests
    p = min(max(limit, 1e-6), 1 - 1e-6)
    width = msprt_half_width(design_effect(evidence.family(REQ)) * p * (1 - p) / requests, p, alpha)
    result.candidate_value, result.ready = rate, True
    result.estimate, result.lower, result.upper = rate, rate - width, rate + width
    if math.isfinite(width) and rate - width > limit:
        result.verdict = HARM
        result.detail = (
            f"green {rate:.2%} (lower bound {rate - width:.2%}) above blue's baseline "
            f"{baseline.error_rate:.2%} + {gate.limit:.2%}"
        )
    else:
        result.detail = (
            f"green {rate:.2%} (lower bound {rate - width:.2%}), limit {limit:.2%} (blue's baseline)"
        )
    return result


def decide_switched(
    state: control_pb2.RolloutState,
    spec: RolloutSpec,
    evidence: RolloutEvidence,
    baseline: deployment_pb2.BaselineSnapshot | None,
    now: float,
) -> tuple[list[control_pb2.GateResult], dict[str, Any] | None]:
    """SWITCHED: (the gates' and triggers' results, the next state's fields or None)."""
    gate_alpha, trigger_alpha = spec.test_alphas()
    results = [baseline_gate(g, evidence, baseline, now, gate_alpha) for g in spec.gates]
    results += evaluate_triggers(spec, evidence, now, trigger_alpha)
    for result in results:
        if result.verdict == HARM:
            label = result.name if result.kind == "trigger" else f"gate {result.name}"
            return results, {
                "phase": ROLLED_BACK,
                "weight": 0.0,
                "reason": f"switched back: {label} found harm while blue was warm: {result.detail}; "
                "new sessions to blue, green's sessions drained",
            }
    warm = now - state.switched_at_unix_nano / 1e9
    if warm >= state.keep_warm_s:
        return results, {
            "phase": PROMOTED,
            "weight": 1.0,
            "reason": f"swap: green is stable, blue released (blue kept warm {warm:.0f}s after the "
            "switch with no trigger or gate finding harm)",
        }
    return results, None


def refuse_pause(state: control_pb2.RolloutState) -> None:
    """A blue-green does not pause (its switch is all or nothing): WrongPhase."""
    if is_blue_green(state):
        raise WrongPhase(
            f"rollout {state.rollout_id} of {state.agent!r} is a blue-green "
            f"({control_pb2.RolloutPhase.Name(state.phase)}): it does not pause; switch back or promote"
        )


def switch_back_reason(state: control_pb2.RolloutState, reason: str, decided_by: str) -> str:
    """An operator's switch-back, worded; WrongPhase unless a blue-green in SMOKE_TEST or SWITCHED."""
    if not is_blue_green(state) or state.phase not in (SMOKE_TEST, SWITCHED):
        kind = "blue-green" if is_blue_green(state) else "canary"
        raise WrongPhase(
            f"rollout {state.rollout_id} of {state.agent!r} is a {kind} in phase "
            f"{control_pb2.RolloutPhase.Name(state.phase)}; switch-back needs a blue-green in "
            "ROLLOUT_PHASE_SWITCHED or ROLLOUT_PHASE_SMOKE_TEST"
        )
    where = "before the switch" if state.phase == SMOKE_TEST else "while blue was warm"
    return (
        f"switched back by {decided_by} {where}: {reason or 'no reason given'}; "
        "new sessions to blue, green's sessions drained"
    )


def blue_baseline(
    records: Iterable[deployment_pb2.DeploymentRecord], agent: str, blue: str
) -> deployment_pb2.BaselineSnapshot | None:
    """The baseline snapshot taken after the newest promotion of `blue` for `agent`, if any."""
    best: deployment_pb2.DeploymentRecord | None = None
    for record in records:
        if (
            record.agent == agent
            and record.candidate_version_id == blue
            and record.outcome == PROMOTED
            and record.HasField("baseline")
            and (best is None or record.ended_at_unix_nano > best.ended_at_unix_nano)
        ):
            best = record
    return best.baseline if best is not None else None
