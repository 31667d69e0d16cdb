"""The shadow phase of the rollout controller: pure decisions, made into states by `_rollout`.

A spec with `shadow:` starts in SHADOW: candidate_weight 0 (every session on stable) and
`shadow_sample` = sample / 100 of stable's calls mirrored to the candidate. Each look tests the
shadow gates (collector._shadow_gates) on the pairs since the start:

1. a gate with evidence of harm and `rollback` -> ROLLED_BACK; with `hold` -> HOLD;
2. once `min_duration` and `min_pairs` are met and every gate passed -> the first canary step
   (RUNNING, step 0, its weight; `shadow_sample` 0), or, for a pure shadow run (no steps),
   ABORTED by the controller with reason "shadow run complete": stable stays, nothing was
   promoted because the candidate never served a user;
3. past `max_duration` without that -> NO_DATA (held, still looking, still mirroring).

HOLD and NO_DATA of the shadow phase keep `shadow_sample` (a held shadow keeps mirroring, as a
held step keeps its weight), which is how `in_shadow` tells them from a canary hold: a resume
goes back to SHADOW. Every state after the shadow phase has `shadow_sample` 0.
"""

from __future__ import annotations

from typing import Any

from collector._gates import HARM, NO_HARM
from collector._shadow_evidence import ShadowEvidence
from collector._shadow_gates import evaluate_shadow_gates
from collector._shadow_spec import ShadowGate
from collector._spec import Gate, RolloutSpec
from outrider.v1 import control_pb2

SHADOW = control_pb2.ROLLOUT_PHASE_SHADOW
HOLD = control_pb2.ROLLOUT_PHASE_HOLD
NO_DATA = control_pb2.ROLLOUT_PHASE_NO_DATA
SHADOW_COMPLETE = "shadow run complete"


def in_shadow(state: control_pb2.RolloutState) -> bool:
    """Is the rollout in its shadow phase (running, held or without data)?"""
    return state.phase == SHADOW or (state.phase in (HOLD, NO_DATA) and state.shadow_sample > 0)


def shadow_start_reason(spec: RolloutSpec) -> str:
    assert spec.shadow is not None
    then = "a pure shadow run" if spec.shadow_only else f"then {len(spec.steps)} step(s)"
    sample = spec.shadow.sample
    return f"started: shadow phase, {sample:g}% of stable's calls mirrored to the candidate; {then}"


def waiting_result(gate: Gate | ShadowGate, alpha: float, kind: str) -> control_pb2.GateResult:
    """A gate's result before its first look."""
    return control_pb2.GateResult(
        name=gate.name,
        metric=gate.metric,
        limit=gate.limit,
        margin=gate.limit,
        alpha=alpha,
        kind=kind,
        action=gate.on_failure,
        verdict="waiting",
        detail="not evaluated yet",
    )


def shadow_waiting(spec: RolloutSpec, alpha: float) -> list[control_pb2.GateResult]:
    """The shadow gates' results before the first look."""
    return [
        waiting_result(g, alpha, "shadow") for g in (spec.shadow.gates if spec.shadow is not None else ())
    ]


def decide_shadow(
    state: control_pb2.RolloutState,
    spec: RolloutSpec,
    evidence: ShadowEvidence | None,
    now: float,
    alpha: float,
) -> tuple[list[control_pb2.GateResult], dict[str, Any] | None]:
    """(the shadow gates' results, the next state's fields or None) at one look."""
    assert spec.shadow is not None
    shadow = spec.shadow
    if evidence is None:  # nothing consumed yet: no pairs
        evidence = ShadowEvidence(state.rollout_id, state.stable_version_id, state.candidate_version_id)
    results = evaluate_shadow_gates(list(shadow.gates), evidence, alpha)
    harmed = [r for r in results if r.verdict == HARM]
    for result in harmed:
        if result.action == "rollback":
            return results, {
                "phase": control_pb2.ROLLOUT_PHASE_ROLLED_BACK,
                "weight": 0.0,
                "reason": f"shadow gate {result.name} found harm in the shadow phase: {result.detail}",
                "release": "",
            }
    if harmed:
        if state.phase == HOLD:
            return results, None
        names = ", ".join(f"shadow gate {r.name}" for r in harmed)
        return results, {
            "phase": HOLD,
            "reason": f"held in the shadow phase: {names} found harm ({harmed[0].detail})",
            "release": "an operator's resume (or abort)",
        }
    if state.phase == HOLD:
        return results, None
    elapsed = now - state.started_at_unix_nano / 1e9
    pairs = evidence.pairs
    floor_met = elapsed >= shadow.min_duration and pairs >= shadow.min_pairs
    blocking = [r.name for r in results if r.verdict != NO_HARM]
    passed = f"{pairs} pairs in {elapsed:.0f}s, every shadow gate passed"
    if floor_met and not blocking:
        if spec.shadow_only:
            return results, {
                "phase": control_pb2.ROLLOUT_PHASE_ABORTED,
                "weight": 0.0,
                "reason": f"{SHADOW_COMPLETE}: {passed}; the candidate served no user, stable stays",
                "release": "",
            }
        first = spec.effective_weight(0)
        return results, {
            "phase": control_pb2.ROLLOUT_PHASE_RUNNING,
            "step_index": 0,
            "weight": first,
            "reason": f"shadow phase passed ({passed}); opening step 1 of {len(spec.steps)} "
            f"at {first * 100:g}%",
            "release": "",
        }
    if state.phase != NO_DATA and shadow.max_duration is not None and elapsed > shadow.max_duration:
        if not floor_met:
            missing = f"{shadow.min_pairs} pairs (has {pairs})"
        else:
            missing = "a decision from shadow gate(s) " + ", ".join(blocking)
        return results, {
            "phase": NO_DATA,
            "reason": "no data: the shadow phase passed its max_duration of "
            f"{shadow.max_duration:g}s without {missing}",
            "release": f"the evidence: {missing}; or an operator's promote or abort",
        }
    return results, None
