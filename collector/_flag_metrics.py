"""Feature flags on against off, from the events: every event carries its session's flags
(`Event.flags`, name -> on), so each flag splits the agent's calls in two arms.

Per (agent, flag, arm): requests (chat calls and tool calls), errors, a p95 of their latency
over the most recent `LATENCY_SAMPLES` and the sessions seen. The figures run from when this
collector last saw the flag set or cleared (`reset`), so they compare the arms under one setting.
Pure and synchronous: the ingest path feeds it (`observe`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from outrider.v1 import admin_pb2, events_pb2

LATENCY_SAMPLES = 2048
MAX_SESSIONS = 100_000  # per arm; beyond it sessions are no longer told apart (the count stops)


@dataclass
class _Arm:
    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    sessions: set[str] = field(default_factory=set)

    def add(self, latency_ms: float, error: bool, session: str) -> None:
        self.requests += 1
        self.errors += error
        self.latencies.append(latency_ms)
        if session and len(self.sessions) < MAX_SESSIONS:
            self.sessions.add(session)

    def metrics(self, on: bool) -> admin_pb2.FlagArmMetrics:
        return admin_pb2.FlagArmMetrics(
            on=on,
            requests=self.requests,
            errors=self.errors,
            error_rate=self.errors / self.requests if self.requests else 0.0,
            latency_p95_ms=p95(self.latencies),
            sessions=len(self.sessions),
        )


def p95(values: Iterable[float]) -> float:
    """The nearest-rank 95th percentile; 0 for none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class FlagMetrics:
    def __init__(self) -> None:
        self._arms: dict[tuple[str, str, bool], _Arm] = {}

    def observe(self, event: events_pb2.Event) -> None:
        """Count one event (counted once by the ingest path) in each of its flags' arms."""
        if not event.flags:
            return
        body = event.WhichOneof("body")
        if body == "call":
            latency, error = event.call.latency_ms, event.call.outcome == events_pb2.OUTCOME_ERROR
        elif body == "tool":
            latency, error = event.tool.latency_ms, event.tool.outcome == events_pb2.OUTCOME_ERROR
        else:
            return
        for name, on in event.flags.items():
            key = (event.agent, name, bool(on))
            arm = self._arms.get(key)
            if arm is None:
                arm = self._arms[key] = _Arm()
            arm.add(latency, error, event.session_id)

    def observe_all(self, events: Iterable[events_pb2.Event]) -> None:
        for event in events:
            self.observe(event)

    def reset(self, agent: str, name: str) -> None:
        """Start a flag's figures afresh (it was just set or cleared)."""
        for on in (True, False):
            self._arms.pop((agent, name, on), None)

    def names(self, agent: str) -> set[str]:
        """The flags of `agent` seen in its events."""
        return {name for (a, name, _) in self._arms if a == agent}

    def arms(self, agent: str, name: str) -> list[admin_pb2.FlagArmMetrics]:
        """The flag on, then off."""
        return [self._arms.get((agent, name, on), _Arm()).metrics(on) for on in (True, False)]
