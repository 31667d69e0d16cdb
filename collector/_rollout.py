"""The rollout controller of one agent: pure, synchronous, clock passed in.

States: SHADOW (the candidate serves no user; mirrored pairs are tested: collector._shadow_phase),
RUNNING, HOLD (frozen at its weight: a gate or trigger with `hold` found harm; an
operator releases it), NO_DATA (a stage passed its `max_duration` without its evidence; it
keeps evaluating and never promotes without evidence), PROMOTED, ROLLED_BACK, ABORTED.
Blue-green rollouts (`strategy: blue_green`) have their own phases, SMOKE_TEST and SWITCHED,
decided in collector._bluegreen_phase; `propose_switch_back` is their operator's verb.
Rollback tests run in RUNNING, HOLD and NO_DATA alike. Each look (every `look_interval`):

1. any gate or trigger with evidence of harm and `rollback` -> ROLLED_BACK;
   with `hold` -> HOLD;
2. a stage advances once its `min_duration` and `min_samples` (candidate requests in the
   stage) are met with no evidence of harm;
3. the last stage promotes only when every gate with a margin shows no harm beyond it;
4. a stage past its `max_duration` without that -> NO_DATA (held, alerting).

A ROLLED_BACK or ABORTED state lists the candidate in `retired` with its drain deadline
(decided at + the spec's `drain_timeout`); every sidecar refuses its pinned sessions past it.
Earlier entries ride along on every later state (a new rollout too) until
`RETIRED_RETENTION_S` after their deadline, which must outlast any session token: dropping an
entry at its deadline would let a still-valid token of that version be served again.

An A/B test (`strategy: ab_test`) has no steps: collector._ab_phase fills its first state and
makes its looks (guardrails, sample ratio, the analysis, the winner).

Every decision is a new `RolloutState` with the next generation. The `propose_*` and
`decide` methods only compute it; `apply` makes it current.

Operators steer with `propose_pause` (SHADOW, RUNNING or NO_DATA -> HOLD), `propose_resume` (HOLD ->
RUNNING, or SHADOW for a hold of the shadow phase) and `propose_promote` (an override from
any active phase, SHADOW included -> PROMOTED); each records the operator in `decided_by`
and their reason. A resume keeps the evidence: a gate with
`on_failure: hold` that still shows harm holds again at the next look, so resuming is for a
hold whose cause was fixed or judged harmless, and a promote is the explicit override. The service publishes a
proposal to `outrider.control` first and applies it only once the write succeeded, so
what the controller holds is always what sidecars can see. `start`, `evaluate` and
`abort` propose and apply in one call, for callers without I/O (tests, tools).
"""

from __future__ import annotations

from collections.abc import Iterable

from collector import _bluegreen_phase as bluegreen
from collector._ab_phase import decide_ab, finish_ab
from collector._config_errors import SpecError
from collector._errors import NoRollout, RolloutConflict, RolloutFinished, WrongPhase
from collector._evidence import RolloutEvidence
from collector._gates import HARM, blocks_promotion, evaluate_gate
from collector._rollout_start import start_state
from collector._rollout_state import (
    ABORTED,
    ACTIVE,
    CONTROLLER,
    HOLD,
    MAX_RETIRED,
    MAX_TIMELINE,
    NO_DATA,
    PROMOTED,
    RELEASE_HOLD,
    RELEASE_PAUSE,
    RETIRED_REASON,
    RETIRED_RETENTION_S,
    ROLLED_BACK,
    RUNNING,
    SHADOW,
    TERMINAL,
    retired_after,
)
from collector._rollout_state import ns as _ns
from collector._rollout_state import stage_record as _stage
from collector._shadow_evidence import ShadowEvidence
from collector._shadow_phase import decide_shadow, in_shadow
from collector._smoke_results import SmokeResults
from collector._spec import RolloutSpec, load_spec_text
from collector._triggers import evaluate_triggers
from outrider.v1 import admin_pb2, control_pb2, deployment_pb2

__all__ = [
    "HOLD",
    "MAX_RETIRED",
    "NO_DATA",
    "PROMOTED",
    "RETIRED_RETENTION_S",
    "ROLLED_BACK",
    "RolloutController",
    "retired_after",
]


class RolloutController:
    """The rollout state, spec and deployment record (timeline) of one agent."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self._state: control_pb2.RolloutState | None = None
        self._spec: RolloutSpec | None = None
        self._timeline: list[admin_pb2.StageRecord] = []
        self._reserved = 0
        self._last_look = -float("inf")
        # the latest evaluation of every gate and trigger, published or not (for status)
        self.evaluation: list[control_pb2.GateResult] = []
        self.ab_analysis: control_pb2.ABAnalysis | None = None  # an A/B test's latest look

    @classmethod
    def restore(
        cls, states: Iterable[control_pb2.RolloutState], spec: RolloutSpec | None = None
    ) -> RolloutController:
        """Rebuild from states read back from the control topic (any order, duplicates fine).

        The spec comes back from `spec_yaml` unless `spec` is given, so a RUNNING rollout resumes;
        if it no longer validates, `spec` stays None: the rollout is frozen until aborted.
        """
        ordered = sorted(
            {(s.epoch, s.generation): s for s in states}.values(), key=lambda s: (s.epoch, s.generation)
        )
        if not ordered:
            raise ValueError("nothing to restore")
        latest = ordered[-1]
        ctl = cls(latest.agent)
        ctl._state = latest
        ctl._timeline = [_stage(s) for s in ordered if s.rollout_id == latest.rollout_id][-MAX_TIMELINE:]
        if latest.spec_yaml or spec is not None:
            try:
                ctl._spec = spec or load_spec_text(
                    latest.spec_yaml, f"{latest.agent} rollout {latest.rollout_id}"
                )
            except SpecError:
                ctl._spec = None
        return ctl

    @property
    def state(self) -> control_pb2.RolloutState | None:
        return self._state

    @property
    def spec(self) -> RolloutSpec | None:
        return self._spec

    @property
    def timeline(self) -> list[admin_pb2.StageRecord]:
        return list(self._timeline)

    @property
    def generation(self) -> int:
        """The highest generation used or reserved; the next state gets one more."""
        return max(self._state.generation if self._state is not None else 0, self._reserved)

    def reserve(self, generation: int) -> None:
        """Never hand out `generation` again: a write that seemed to fail may still have landed."""
        self._reserved = max(self._reserved, generation)

    @property
    def running(self) -> bool:
        """Still deciding: RUNNING, HOLD or NO_DATA."""
        return self._state is not None and self._state.phase in ACTIVE

    # -- proposals: pure -------------------------------------------------------------------

    def propose_start(
        self,
        spec: RolloutSpec,
        spec_yaml: str,
        now: float,
        decided_by: str = CONTROLLER,
        generation_base: int = 0,
    ) -> control_pb2.RolloutState:
        if spec.agent != self.agent:
            raise ValueError(f"spec is for agent {spec.agent!r}, not {self.agent!r}")
        if self.running:
            assert self._state is not None
            raise RolloutConflict(
                f"agent {self.agent!r} already has a running rollout "
                f"({self._state.rollout_id}, generation {self._state.generation})"
            )
        generation = max(generation_base, self.generation) + 1
        previous = self._state.retired if self._state is not None else ()
        return start_state(self.agent, spec, spec_yaml, now, decided_by, generation, previous)

    def propose_abort(self, reason: str, now: float, decided_by: str) -> control_pb2.RolloutState:
        state = self._require_state()
        if state.phase in TERMINAL:
            raise RolloutFinished(
                f"rollout {state.rollout_id} of {self.agent!r} already ended "
                f"({control_pb2.RolloutPhase.Name(state.phase)})"
            )
        return self._next(
            state,
            now,
            decided_by,
            phase=ABORTED,
            weight=0.0,
            reason=f"aborted: {reason or 'no reason given'}",
            release="",
        )

    def propose_pause(self, reason: str, now: float, decided_by: str) -> control_pb2.RolloutState:
        """Freeze the rollout at its weight until an operator resumes it."""
        state = self._require_active()
        bluegreen.refuse_pause(state)
        if state.phase == HOLD:
            raise WrongPhase(
                f"rollout {state.rollout_id} of {self.agent!r} is already on HOLD ({state.reason})"
            )
        return self._next(
            state,
            now,
            decided_by,
            phase=HOLD,
            reason=f"paused by {decided_by}: {reason or 'no reason given'}",
            release=RELEASE_PAUSE,
        )

    def propose_resume(self, reason: str, now: float, decided_by: str) -> control_pb2.RolloutState:
        """HOLD -> RUNNING (SHADOW for a hold of the shadow phase); the evidence stays, so a hold
        gate still showing harm holds again."""
        state = self._require_active()
        if state.phase != HOLD:
            raise WrongPhase(
                f"rollout {state.rollout_id} of {self.agent!r} is not on HOLD "
                f"({control_pb2.RolloutPhase.Name(state.phase)}); only a held rollout resumes"
            )
        return self._next(
            state,
            now,
            decided_by,
            phase=SHADOW if in_shadow(state) else RUNNING,
            reason=f"resumed by {decided_by}: {reason or 'no reason given'}",
            release="",
        )

    def propose_promote(self, reason: str, now: float, decided_by: str) -> control_pb2.RolloutState:
        """An operator's override: the candidate becomes stable whatever the gates say."""
        state = self._require_active()
        if state.variants:
            raise WrongPhase(
                f"rollout {state.rollout_id} of {self.agent!r} is an A/B test: it promotes its own "
                "winner (abort it to keep the control)"
            )
        return self._next(
            state,
            now,
            decided_by,
            phase=PROMOTED,
            weight=1.0,
            reason=f"promoted by {decided_by} (operator override {_where(state)}): "
            f"{reason or 'no reason given'}",
            release="",
        )

    def propose_switch_back(self, reason: str, now: float, decided_by: str) -> control_pb2.RolloutState:
        """Blue-green in SMOKE_TEST or SWITCHED -> ROLLED_BACK: new sessions to blue at once."""
        state = self._require_state()
        why = bluegreen.switch_back_reason(state, reason, decided_by)  # WrongPhase unless it fits
        return self._next(state, now, decided_by, phase=ROLLED_BACK, weight=0.0, reason=why, release="")

    def look_again(self) -> None:
        """The last look's proposal was not published: the next tick looks again at once."""
        self._last_look = -float("inf")

    def decide(
        self,
        evidence: RolloutEvidence,
        now: float,
        shadow: ShadowEvidence | None = None,
        smoke: SmokeResults | None = None,
        baseline: deployment_pb2.BaselineSnapshot | None = None,
    ) -> control_pb2.RolloutState | None:
        """The next state if the tests or the stage timing call for one; None otherwise.

        Looks are spaced by the spec's `look_interval`; between them this returns None. In the
        shadow phase only the shadow gates look, at `shadow` (collector._shadow_phase).
        """
        state, spec = self._state, self._spec
        if state is None or spec is None or state.phase not in ACTIVE:
            return None
        if now - self._last_look < spec.look_interval:
            return None
        self._last_look = now
        if bluegreen.is_blue_green(state):
            results, change = bluegreen.decide(state, spec, evidence, now, smoke, baseline)
            self.evaluation = results or self.evaluation
            new = None if change is None else self._next(state, now, CONTROLLER, results, **change)
            if new is not None and new.phase == bluegreen.SWITCHED:
                new.switched_at_unix_nano = _ns(now)
            return new
        gate_alpha, trigger_alpha = spec.test_alphas()
        if spec.ab is not None:  # an A/B test (collector._ab_phase)
            self.evaluation, self.ab_analysis, change = decide_ab(state, spec, evidence, now)
            return None if change is None else finish_ab(self._next, state, change, spec.drain_timeout, now)
        if spec.shadow is not None and in_shadow(state):
            self.evaluation, change = decide_shadow(state, spec, shadow, now, gate_alpha)
            return None if change is None else self._next(state, now, CONTROLLER, self.evaluation, **change)
        gates = [evaluate_gate(g, evidence, gate_alpha) for g in spec.gates]
        results = gates + evaluate_triggers(spec, evidence, now, trigger_alpha)
        self.evaluation = results
        step_no = state.step_index + 1
        harmed = [r for r in results if r.verdict == HARM]
        for result in harmed:
            if result.action == "rollback":
                return self._next(
                    state,
                    now,
                    CONTROLLER,
                    results,
                    phase=ROLLED_BACK,
                    weight=0.0,
                    reason=f"{_label(result)} found harm at step {step_no}: {result.detail}",
                    release="",
                )
        if harmed:
            if state.phase == HOLD:
                return None
            names = ", ".join(_label(r) for r in harmed)
            return self._next(
                state,
                now,
                CONTROLLER,
                results,
                phase=HOLD,
                reason=f"held at step {step_no}: {names} found harm ({harmed[0].detail})",
                release=RELEASE_HOLD,
            )
        if state.phase == HOLD:
            return None
        step = spec.steps[state.step_index]
        elapsed = now - state.step_started_at_unix_nano / 1e9
        samples = evidence.candidate_requests(state.step_index)
        floor_met = elapsed >= step.min_duration and samples >= step.min_samples
        last = step_no == len(spec.steps)
        if floor_met and not last:
            following = spec.effective_weight(step_no)
            return self._next(
                state,
                now,
                CONTROLLER,
                results,
                phase=RUNNING,
                step_index=step_no,
                weight=following,
                reason=(
                    f"step {step_no} passed ({samples} candidate requests in {elapsed:.0f}s, no evidence "
                    f"of harm); advancing to step {step_no + 1} at {following * 100:g}%"
                ),
                release="",
            )
        blocking = [g.name for g, r in zip(spec.gates, gates, strict=True) if blocks_promotion(g, r)]
        if floor_met and last and not blocking:
            return self._next(
                state,
                now,
                CONTROLLER,
                results,
                phase=PROMOTED,
                weight=1.0,
                reason=(
                    f"promoted: every gate shows no harm beyond its margin after {samples} candidate "
                    f"requests in the last step ({len(spec.steps)} steps)"
                ),
                release="",
            )
        if state.phase != NO_DATA and step.max_duration is not None and elapsed > step.max_duration:
            if not floor_met:
                missing = f"{step.min_samples} candidate requests (has {samples})"
            else:
                missing = "a decision from gate(s) " + ", ".join(blocking)
            return self._next(
                state,
                now,
                CONTROLLER,
                results,
                phase=NO_DATA,
                reason=f"no data: step {step_no} passed its max_duration of {step.max_duration:g}s without "
                f"{missing}",
                release=f"the evidence: {missing}; or an operator's promote or abort",
            )
        return None

    # -- making a proposal current ---------------------------------------------------------

    def apply(self, state: control_pb2.RolloutState, spec: RolloutSpec | None = None) -> None:
        """Make `state` current (after it was published). A new rollout brings its spec."""
        if state.agent != self.agent:
            raise ValueError(f"state is for agent {state.agent!r}, not {self.agent!r}")
        if state.generation <= self.generation:
            raise ValueError(f"generation {state.generation} is not after {self.generation}")
        if self._state is None or state.rollout_id != self._state.rollout_id:
            self._timeline = []
            if state.phase in (RUNNING, SHADOW, bluegreen.SMOKE_TEST):
                self._spec = spec or load_spec_text(
                    state.spec_yaml, f"{self.agent} rollout {state.rollout_id}"
                )
        self._state = state
        self._timeline.append(_stage(state))
        del self._timeline[:-MAX_TIMELINE]

    def start(
        self,
        spec: RolloutSpec,
        spec_yaml: str,
        now: float,
        decided_by: str = CONTROLLER,
        generation_base: int = 0,
    ) -> control_pb2.RolloutState:
        state = self.propose_start(spec, spec_yaml, now, decided_by, generation_base)
        self.apply(state, spec)
        return state

    def evaluate(
        self,
        evidence: RolloutEvidence,
        now: float,
        shadow: ShadowEvidence | None = None,
        smoke: SmokeResults | None = None,
        baseline: deployment_pb2.BaselineSnapshot | None = None,
    ) -> control_pb2.RolloutState | None:
        state = self.decide(evidence, now, shadow, smoke, baseline)
        if state is not None:
            self.apply(state)
        return state

    def abort(self, reason: str, now: float, decided_by: str) -> control_pb2.RolloutState:
        state = self.propose_abort(reason, now, decided_by)
        self.apply(state)
        return state

    # -- helpers ---------------------------------------------------------------------------

    def _require_state(self) -> control_pb2.RolloutState:
        if self._state is None:
            raise NoRollout(f"agent {self.agent!r} has no rollout")
        return self._state

    def _require_active(self) -> control_pb2.RolloutState:
        state = self._require_state()
        if state.phase in TERMINAL:
            raise RolloutFinished(
                f"rollout {state.rollout_id} of {self.agent!r} already ended "
                f"({control_pb2.RolloutPhase.Name(state.phase)})"
            )
        return state

    def _next(
        self,
        state: control_pb2.RolloutState,
        now: float,
        decided_by: str,
        results: list[control_pb2.GateResult] | None = None,
        *,
        phase: control_pb2.RolloutPhase.ValueType | None = None,
        weight: float | None = None,
        step_index: int | None = None,
        reason: str,
        release: str | None = None,
    ) -> control_pb2.RolloutState:
        new = control_pb2.RolloutState()
        new.CopyFrom(state)
        new.generation = max(state.generation, self.generation) + 1
        new.decided_by = decided_by
        new.decided_at_unix_nano = _ns(now)
        new.reason = reason
        if phase is not None:
            new.phase = phase
        if new.phase not in (HOLD, NO_DATA, SHADOW):
            new.shadow_sample = 0.0  # mirroring ends with the shadow phase
        if weight is not None:
            new.candidate_weight = weight
        if release is not None:
            new.release = release
        if step_index is not None:
            new.step_index = step_index
            new.step_started_at_unix_nano = _ns(now)
        if results is not None:
            del new.gate_results[:]
            new.gate_results.extend(results)
        added = None
        if new.phase in RETIRED_REASON and state.phase not in TERMINAL:
            # the spec's own value first: a state written before drain_timeout_s existed reads 0
            drain_s = self._spec.drain_timeout if self._spec is not None else state.drain_timeout_s
            added = control_pb2.RetiredVersion(
                version_id=state.candidate_version_id,
                drain_deadline_unix_nano=_ns(now + drain_s),
                reason=RETIRED_REASON[new.phase],
                rollout_id=state.rollout_id,
            )
        del new.retired[:]
        new.retired.extend(retired_after(state.retired, now, added))
        return new


def _where(state: control_pb2.RolloutState) -> str:
    if bluegreen.is_blue_green(state):
        return f"of a blue-green in {control_pb2.RolloutPhase.Name(state.phase)}"
    return "in the shadow phase" if in_shadow(state) else f"at step {state.step_index + 1}"


def _label(result: control_pb2.GateResult) -> str:
    return result.name if result.kind == "trigger" else f"gate {result.name}"
