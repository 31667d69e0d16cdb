"""Per-tenant canaries: each group's figures apart, for `outrider rollout status`.

The gates see only the randomized "split" sessions (collector._evidence); the opt-in and
excluded tenants are still traffic an operator wants to watch. This tallies, per rollout, the
calls and tool calls of each (cohort, version): requests, errors, and a latency sketch for the
p95, since the rollout started. Only rollouts with tenant lists get a tally. Fed once per
counted event by the evidence book and checkpointed with it, so it is exactly-once too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ddsketch import DDSketch

from collector._buckets import RELATIVE_ACCURACY, _dump_sketch, _load_sketch
from collector._spec import RolloutSpec
from outrider.v1 import admin_pb2, control_pb2, events_pb2

STATE_FORMAT = 1
SPLIT = "split"  # an event without a cohort (an old sidecar) was split by the weights
_ORDER = {"opt_in": 0, SPLIT: 1, "excluded": 2}


@dataclass
class _Group:
    requests: int = 0
    errors: int = 0
    latency: DDSketch = field(default_factory=lambda: DDSketch(RELATIVE_ACCURACY))


class GroupTally:
    """One rollout's figures per (cohort, version)."""

    def __init__(self, rollout_id: str) -> None:
        self.rollout_id = rollout_id
        self._groups: dict[tuple[str, str], _Group] = {}

    def add(self, event: events_pb2.Event) -> bool:
        """Count a call or tool call of this rollout; whether it was one."""
        body = event.WhichOneof("body")
        if event.rollout_id != self.rollout_id or body not in ("call", "tool"):
            return False
        key = (event.cohort or SPLIT, event.version_id)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        record = event.call if body == "call" else event.tool
        group.requests += 1
        group.errors += record.outcome == events_pb2.OUTCOME_ERROR
        if body == "call" and math.isfinite(record.latency_ms):
            group.latency.add(max(record.latency_ms, 0.0))
        return True

    def metrics(self) -> list[admin_pb2.GroupMetrics]:
        """Every group, opt-in first, then the split, then the excluded."""
        out = []
        for (cohort, version), g in sorted(
            self._groups.items(), key=lambda kv: (_ORDER.get(kv[0][0], 3), kv[0])
        ):
            p95 = g.latency.get_quantile_value(0.95) if g.latency.count else 0.0
            out.append(
                admin_pb2.GroupMetrics(
                    cohort=cohort,
                    version_id=version,
                    requests=g.requests,
                    errors=g.errors,
                    error_rate=g.errors / g.requests if g.requests else 0.0,
                    latency_p95_ms=float(p95 or 0.0),
                )
            )
        return out

    def warnings(self, spec: RolloutSpec, candidate: str) -> list[str]:
        """A warning when the opt-in tenants' candidate errs beyond the error_rate trigger's
        limit: they are no evidence (not randomized), so no gate or trigger acts on it."""
        trigger = spec.triggers.error_rate
        group = self._groups.get(("opt_in", candidate))
        if not trigger.enabled or group is None or group.requests < trigger.min_samples:
            return []
        rate = group.errors / group.requests
        if rate <= trigger.limit:
            return []
        return [
            f"opt-in tenants see {rate:.2%} errors on the candidate over {group.requests} requests "
            f"(the error_rate trigger's limit is {trigger.limit:.2%}); they are not randomized, so no "
            "gate or trigger acts on them: pause or abort by hand if the candidate is at fault"
        ]

    def to_state(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "groups": [
                [cohort, version, g.requests, g.errors, _dump_sketch(g.latency)]
                for (cohort, version), g in self._groups.items()
            ],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> GroupTally:
        tally = cls(str(state["rollout_id"]))
        for cohort, version, requests, errors, sketch in state["groups"]:
            tally._groups[(str(cohort), str(version))] = _Group(
                int(requests), int(errors), _load_sketch(sketch)
            )
        return tally


class TenantGroups:
    """The tallies of every agent whose current rollout has tenant lists."""

    def __init__(self) -> None:
        self._by_agent: dict[str, GroupTally] = {}

    def get(self, agent: str, rollout_id: str) -> GroupTally | None:
        tally = self._by_agent.get(agent)
        return tally if tally is not None and tally.rollout_id == rollout_id else None

    def sync(self, state: control_pb2.RolloutState) -> None:
        """A new rollout with tenant lists starts an empty tally; one without drops the old."""
        current = self._by_agent.get(state.agent)
        if current is not None and current.rollout_id == state.rollout_id:
            return
        if state.opt_in_tenants or state.exclude_tenants:
            self._by_agent[state.agent] = GroupTally(state.rollout_id)
        else:
            self._by_agent.pop(state.agent, None)

    def agents(self) -> set[str]:
        """The agents with a tally (whose events `add_events` counts)."""
        return set(self._by_agent)

    def add_events(self, events: Iterable[events_pb2.Event]) -> None:
        for event in events:
            tally = self._by_agent.get(event.agent)
            if tally is not None:
                tally.add(event)

    def to_state(self, agents: Callable[[str], bool] | None = None) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "agents": {a: t.to_state() for a, t in self._by_agent.items() if agents is None or agents(a)},
        }

    def load_state(self, state: Mapping[str, Any], agents: Callable[[str], bool] | None = None) -> None:
        """Replace the tallies (with `agents`: only theirs); ValueError if the format differs."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"tenant groups format {state.get('format')!r}, expected {STATE_FORMAT}")
        loaded = {
            str(a): GroupTally.from_state(s)
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
