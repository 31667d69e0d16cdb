"""Blue-green smoke test results as the sidecars report them (Event body `smoke`), per agent.

Each sidecar that runs a rollout's smoke tests emits one SmokeTestRecord per test; a sidecar's
set is complete once it has reported `test_count` distinct tests. Only the agent's current
rollout is kept (a new rollout id replaces the old results), and the whole book is small, so it
is checkpointed with the evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from outrider.v1 import events_pb2

MAX_SIDECARS = 64  # per rollout: a bound on what a misbehaving fleet can make us keep


@dataclass(frozen=True, slots=True)
class SmokeOutcome:
    test: str
    passed: bool
    failure: str
    latency_ms: float


@dataclass
class SmokeResults:
    """One rollout's results: sidecar id -> test name -> outcome."""

    rollout_id: str
    test_count: int = 0
    by_sidecar: dict[str, dict[str, SmokeOutcome]] = field(default_factory=dict)

    def failure(self) -> tuple[str, SmokeOutcome] | None:
        """(sidecar, the first failed outcome) if any sidecar saw a test fail."""
        for sidecar, outcomes in self.by_sidecar.items():
            for outcome in outcomes.values():
                if not outcome.passed:
                    return sidecar, outcome
        return None

    def complete_pass(self, wanted: int) -> tuple[str, list[SmokeOutcome]] | None:
        """(sidecar, its outcomes) for a sidecar that ran all `wanted` tests and passed them all."""
        for sidecar, outcomes in self.by_sidecar.items():
            if wanted > 0 and len(outcomes) >= wanted and all(o.passed for o in outcomes.values()):
                return sidecar, list(outcomes.values())
        return None

    def most_complete(self) -> int:
        return max((len(o) for o in self.by_sidecar.values()), default=0)


class SmokeBook:
    def __init__(self) -> None:
        self._by_agent: dict[str, SmokeResults] = {}

    def get(self, agent: str) -> SmokeResults | None:
        return self._by_agent.get(agent)

    def add(self, event: events_pb2.Event) -> bool:
        """Record one smoke result; False when it is not one (or names no rollout)."""
        if event.WhichOneof("body") != "smoke" or not event.rollout_id or not event.smoke.test_name:
            return False
        results = self._by_agent.get(event.agent)
        if results is None or results.rollout_id != event.rollout_id:
            results = self._by_agent[event.agent] = SmokeResults(event.rollout_id)
        sidecar = event.sidecar_id or "?"
        outcomes = results.by_sidecar.get(sidecar)
        if outcomes is None:
            if len(results.by_sidecar) >= MAX_SIDECARS:
                return False
            outcomes = results.by_sidecar[sidecar] = {}
        smoke = event.smoke
        outcomes[smoke.test_name] = SmokeOutcome(
            smoke.test_name, smoke.passed, smoke.failure, smoke.latency_ms
        )
        results.test_count = max(results.test_count, smoke.test_count)
        return True

    def to_state(self, agents: Callable[[str], bool] | None = None) -> dict[str, Any]:
        return {
            agent: {
                "rollout_id": r.rollout_id,
                "test_count": r.test_count,
                "by_sidecar": {
                    s: [[o.test, o.passed, o.failure, o.latency_ms] for o in outcomes.values()]
                    for s, outcomes in r.by_sidecar.items()
                },
            }
            for agent, r in self._by_agent.items()
            if agents is None or agents(agent)
        }

    def load_state(self, state: Mapping[str, Any], agents: Callable[[str], bool] | None = None) -> None:
        loaded = {
            str(agent): SmokeResults(
                str(r["rollout_id"]),
                int(r["test_count"]),
                {
                    str(s): {
                        str(o[0]): SmokeOutcome(str(o[0]), bool(o[1]), str(o[2]), float(o[3])) for o in rows
                    }
                    for s, rows in r["by_sidecar"].items()
                },
            )
            for agent, r in state.items()
            if agents is None or agents(str(agent))
        }
        self.forget(agents if agents is not None else (lambda _a: True))
        self._by_agent.update(loaded)

    def forget(self, agents: Callable[[str], bool]) -> None:
        for agent in [a for a in self._by_agent if agents(a)]:
            del self._by_agent[agent]
