"""The evidence of every agent's current rollout, shared by the ingest step and the controllers.

The ingest step hands it each counted event (`add_events`, once per consumed batch); the
rollout manager keeps it in step with the rollout states (`sync`). It is checkpointed with the
windows and the offsets, so evidence is exactly-once like every other count.

A rollout with a shadow phase also has a `ShadowEvidence` (its mirrored pairs), and its canary
evidence starts afresh when the first step opens: stable's traffic while nothing was split is
no baseline for the candidate's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from collector._ab_evidence import ABEvidence, evidence_from_state
from collector._evidence import DEFAULT_MAX_UNITS, RolloutEvidence, Rows
from collector._shadow_evidence import ShadowEvidence, ShadowRows
from collector._shadow_phase import in_shadow
from collector._smoke_results import SmokeBook
from collector._spec import RolloutSpec
from collector._tenant_groups import TenantGroups
from outrider.v1 import control_pb2, events_pb2

STATE_FORMAT = 1


class EvidenceBook:
    def __init__(self, max_units: int = DEFAULT_MAX_UNITS) -> None:
        self.max_units = max_units
        self._by_agent: dict[str, RolloutEvidence] = {}
        self._shadow: dict[str, ShadowEvidence] = {}
        self.groups = TenantGroups()  # per-tenant canaries: each group's figures, for status
        self.smoke = SmokeBook()  # blue-green smoke test results (collector._smoke_results)

    def get(self, agent: str) -> RolloutEvidence | None:
        return self._by_agent.get(agent)

    def shadow(self, agent: str) -> ShadowEvidence | None:
        """The mirrored pairs of the agent's rollout (None without a shadow phase)."""
        return self._shadow.get(agent)

    def shadows(self) -> list[tuple[str, ShadowEvidence]]:
        return list(self._shadow.items())

    def sync(self, state: control_pb2.RolloutState, spec: RolloutSpec | None) -> RolloutEvidence | None:
        """Make the agent's evidence match `state`: a new rollout starts empty, each new step
        starts a stratum at its start time. Evidence of an ended rollout stays for status."""
        self.groups.sync(state)
        evidence = self._by_agent.get(state.agent)
        step_started = state.step_started_at_unix_nano / 1e9
        # the first step after a shadow phase: the canary evidence begins with it
        after_shadow = (
            evidence is not None
            and evidence.rollout_id == state.rollout_id
            and not in_shadow(state)
            and state.step_index == 0
            and evidence.stage == 0
            and step_started > evidence.stage_starts[0]
            and spec is not None
            and spec.shadow is not None
        )
        if evidence is None or evidence.rollout_id != state.rollout_id or after_shadow:
            if spec is None:
                return evidence
            if spec.shadow is None:
                self._shadow.pop(state.agent, None)
            # an A/B test: one pair of evidence per variant against the control (collector._ab_evidence)
            make = ABEvidence if spec.ab is not None else RolloutEvidence
            extra = {"variants": [v.version for v in spec.ab.variants]} if spec.ab is not None else {}
            evidence = make(
                state.rollout_id,
                state.stable_version_id,
                state.candidate_version_id,
                step_started if after_shadow else state.started_at_unix_nano / 1e9,
                stages=2 if spec.blue_green is not None else max(1, len(spec.steps)),  # smoke, switched
                slow_ms=spec.triggers.latency_p99_ms.limit,
                critical=_critical(spec),
                max_units=self.max_units,
                **extra,
            )
            self._by_agent[state.agent] = evidence
        current = self._shadow.get(state.agent)
        if (
            spec is not None
            and spec.shadow is not None
            and (current is None or current.rollout_id != state.rollout_id)
        ):
            self._shadow[state.agent] = ShadowEvidence(
                state.rollout_id, state.stable_version_id, state.candidate_version_id, self.max_units
            )
        if state.step_index > evidence.stage:
            evidence.begin_stage(state.step_index, state.step_started_at_unix_nano / 1e9)
        return evidence

    def tracked(self) -> set[str]:
        """The agents whose counted events `add_events` uses (smoke records aside)."""
        return {*self._by_agent, *self._shadow, *self.groups.agents()}

    def add_events(self, events: Iterable[events_pb2.Event], now: float) -> int:
        """Add the events that are evidence of a current rollout; how many were."""
        rows: dict[str, Rows] = {}
        pairs: dict[str, ShadowRows] = {}
        used = 0
        events = list(events)
        self.groups.add_events(events)
        for event in events:
            if event.WhichOneof("body") == "smoke":  # (the ingest step hands these over itself)
                used += self.smoke.add(event)
                continue
            shadow = self._shadow.get(event.agent)
            if shadow is not None and event.WhichOneof("body") in ("shadow", "judge", "tool"):
                batch_pairs = pairs.get(event.agent)
                if batch_pairs is None:
                    batch_pairs = pairs[event.agent] = ShadowRows()
                used += shadow.rows_from_event(event, batch_pairs)
            evidence = self._by_agent.get(event.agent)
            if evidence is None:
                continue
            batch = rows.get(event.agent)
            if batch is None:
                batch = rows[event.agent] = Rows()
            used += evidence.rows_from_event(event, now, batch)
        for agent, batch in rows.items():
            self._by_agent[agent].add(batch, now)
        for agent, batch_pairs in pairs.items():
            self._shadow[agent].add(batch_pairs, now)
        return used

    def to_state(self, agents: Callable[[str], bool] | None = None) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "agents": {
                agent: evidence.to_state()
                for agent, evidence in self._by_agent.items()
                if agents is None or agents(agent)
            },
            "shadow": {
                agent: shadow.to_state()
                for agent, shadow in self._shadow.items()
                if agents is None or agents(agent)
            },
            "groups": self.groups.to_state(agents),
            "smoke": self.smoke.to_state(agents),
        }

    def load_state(self, state: Mapping[str, Any], agents: Callable[[str], bool] | None = None) -> None:
        """Replace everything with a `to_state` result (with `agents`: only those agents'
        evidence); ValueError if it does not fit."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"evidence book format {state.get('format')!r}, expected {STATE_FORMAT}")
        loaded = {
            str(a): evidence_from_state(s)
            for a, s in state["agents"].items()
            if agents is None or agents(str(a))
        }
        shadows = {
            str(a): ShadowEvidence.from_state(s)
            for a, s in state.get("shadow", {}).items()  # absent in checkpoints from before shadow
            if agents is None or agents(str(a))
        }
        self.smoke.load_state(state.get("smoke", {}), agents)  # absent before blue-green
        if agents is None:
            self._by_agent, self._shadow = loaded, shadows
            self.groups = TenantGroups()
        else:
            self.forget(agents)
            self._by_agent.update(loaded)
            self._shadow.update(shadows)
        if "groups" in state:  # absent in checkpoints from before per-tenant canaries
            self.groups.load_state(state["groups"], agents)

    def forget(self, agents: Callable[[str], bool]) -> None:
        for agent in [a for a in self._by_agent if agents(a)]:
            del self._by_agent[agent]
        for agent in [a for a in self._shadow if agents(a)]:
            del self._shadow[agent]
        self.groups.forget(agents)
        self.smoke.forget(agents)


def _critical(spec: RolloutSpec) -> tuple[str, ...]:
    for gate in spec.gates:
        if gate.metric == "safety_event_rate":
            return gate.critical
    return ()
