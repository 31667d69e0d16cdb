"""The evidence of every agent's current rollout, shared by the ingest step and the controllers.

The ingest step hands it each counted event (`add_events`, once per consumed batch); the
rollout manager keeps it in step with the rollout states (`sync`). It is checkpointed with the
windows and the offsets, so evidence is exactly-once like every other count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from collector._evidence import DEFAULT_MAX_UNITS, RolloutEvidence, Rows
from collector._spec import RolloutSpec
from outrider.v1 import control_pb2, events_pb2

STATE_FORMAT = 1


class EvidenceBook:
    def __init__(self, max_units: int = DEFAULT_MAX_UNITS) -> None:
        self.max_units = max_units
        self._by_agent: dict[str, RolloutEvidence] = {}

    def get(self, agent: str) -> RolloutEvidence | None:
        return self._by_agent.get(agent)

    def sync(self, state: control_pb2.RolloutState, spec: RolloutSpec | None) -> RolloutEvidence | None:
        """Make the agent's evidence match `state`: a new rollout starts empty, each new step
        starts a stratum at its start time. Evidence of an ended rollout stays for status."""
        evidence = self._by_agent.get(state.agent)
        if evidence is None or evidence.rollout_id != state.rollout_id:
            if spec is None:
                return evidence
            evidence = RolloutEvidence(
                state.rollout_id,
                state.stable_version_id,
                state.candidate_version_id,
                state.started_at_unix_nano / 1e9,
                stages=len(spec.steps),
                slow_ms=spec.triggers.latency_p99_ms.limit,
                critical=_critical(spec),
                max_units=self.max_units,
            )
            self._by_agent[state.agent] = evidence
        if state.step_index > evidence.stage:
            evidence.begin_stage(state.step_index, state.step_started_at_unix_nano / 1e9)
        return evidence

    def add_events(self, events: Iterable[events_pb2.Event], now: float) -> int:
        """Add the events that are evidence of a current rollout; how many were."""
        rows: dict[str, Rows] = {}
        used = 0
        for event in events:
            evidence = self._by_agent.get(event.agent)
            if evidence is None:
                continue
            batch = rows.get(event.agent)
            if batch is None:
                batch = rows[event.agent] = Rows()
            used += evidence.rows_from_event(event, now, batch)
        for agent, batch in rows.items():
            self._by_agent[agent].add(batch, now)
        return used

    def to_state(self, agents: Callable[[str], bool] | None = None) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "agents": {
                agent: evidence.to_state()
                for agent, evidence in self._by_agent.items()
                if agents is None or agents(agent)
            },
        }

    def load_state(self, state: Mapping[str, Any], agents: Callable[[str], bool] | None = None) -> None:
        """Replace everything with a `to_state` result (with `agents`: only those agents'
        evidence); ValueError if it does not fit."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"evidence book format {state.get('format')!r}, expected {STATE_FORMAT}")
        loaded = {
            str(a): RolloutEvidence.from_state(s)
            for a, s in state["agents"].items()
            if agents is None or agents(str(a))
        }
        if agents is None:
            self._by_agent = loaded
            return
        self.forget(agents)
        self._by_agent.update(loaded)

    def forget(self, agents: Callable[[str], bool]) -> None:
        for agent in [a for a in self._by_agent if agents(a)]:
            del self._by_agent[agent]


def _critical(spec: RolloutSpec) -> tuple[str, ...]:
    for gate in spec.gates:
        if gate.metric == "safety_event_rate":
            return gate.critical
    return ()
