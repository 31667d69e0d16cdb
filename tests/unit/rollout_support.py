"""Helpers for the rollout decision tests: real outrider.v1 events, and a controller harness
that feeds them through the collector's `EvidenceBook` on a manual clock."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator

from collector import (
    EvidenceBook,
    ManualClock,
    RolloutController,
    RolloutEvidence,
    RolloutSpec,
    Rows,
    load_spec_text,
)
from collector._evidence import CALL, LAT, REQ, T_CALLS, T_ERR, T_REQ, TCOLS
from collector._evidence import F as FAMILIES
from outrider.v1 import common_pb2, control_pb2, events_pb2, sidecar_pb2

AGENT = "bot"
STABLE_V, CANDIDATE_V = "1a2b3c4d5e6f", "9f8e7d6c5b4a"
ROLE = {0: common_pb2.ROLE_STABLE, 1: common_pb2.ROLE_CANARY}
VERSION = {0: STABLE_V, 1: CANDIDATE_V}

RUNNING = control_pb2.ROLLOUT_PHASE_RUNNING
PROMOTED = control_pb2.ROLLOUT_PHASE_PROMOTED
ROLLED_BACK = control_pb2.ROLLOUT_PHASE_ROLLED_BACK
ABORTED = control_pb2.ROLLOUT_PHASE_ABORTED
HOLD = control_pb2.ROLLOUT_PHASE_HOLD
NO_DATA = control_pb2.ROLLOUT_PHASE_NO_DATA
TERMINAL = frozenset({PROMOTED, ROLLED_BACK, ABORTED})

_ids = itertools.count()


def new_session() -> str:
    return f"s{next(_ids)}"


def _event(rollout_id: str, arm: int, t: float, session: str, agent: str = AGENT) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"e{next(_ids)}",
        time_unix_nano=round(t * 1e9),
        agent=agent,
        version_id=VERSION[arm],
        role=ROLE[arm],
        session_id=session,
        rollout_id=rollout_id,
    )


def call_event(
    rollout_id: str,
    arm: int,
    t: float,
    session: str | None = None,
    *,
    error_class: str = "",
    latency_ms: float = 100.0,
    cost_usd: float = 0.003,
    fallback_tier: int = 0,
) -> events_pb2.Event:
    e = _event(rollout_id, arm, t, session or new_session())
    c = e.call
    c.operation, c.latency_ms, c.cost_usd, c.fallback_tier = "chat", latency_ms, cost_usd, fallback_tier
    c.outcome = events_pb2.OUTCOME_ERROR if error_class else events_pb2.OUTCOME_OK
    c.error_class = error_class
    return e


def tool_event(
    rollout_id: str, arm: int, t: float, session: str | None = None, *, error_class: str = ""
) -> events_pb2.Event:
    e = _event(rollout_id, arm, t, session or new_session())
    e.tool.tool_name, e.tool.latency_ms = "lookup", 20.0
    e.tool.outcome = events_pb2.OUTCOME_ERROR if error_class else events_pb2.OUTCOME_OK
    e.tool.error_class = error_class
    return e


def feedback_event(
    rollout_id: str, arm: int, t: float, session: str | None = None, *, kind: int, score: float = 0.0
) -> events_pb2.Event:
    e = _event(rollout_id, arm, t, session or new_session())
    e.feedback.kind, e.feedback.score = kind, score
    return e


def task_event(
    rollout_id: str, arm: int, t: float, session: str | None = None, *, failed: bool
) -> events_pb2.Event:
    kind = sidecar_pb2.FEEDBACK_KIND_TASK_FAILURE if failed else sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS
    return feedback_event(rollout_id, arm, t, session, kind=kind)


def safety_event(
    rollout_id: str,
    arm: int,
    t: float,
    session: str | None = None,
    *,
    category: str = "prompt_injection",
    direction: str = "input",
    count: int = 1,
) -> events_pb2.Event:
    e = _event(rollout_id, arm, t, session or new_session())
    s = e.safety
    s.category, s.direction, s.count, s.action, s.guard = category, direction, count, "flag", "test"
    return e


def jittered(rng: random.Random, median_ms: float, sigma: float = 0.3) -> float:
    """A lognormal latency: constant latencies have no spread, so no test can bound them."""
    return median_ms * math.exp(rng.gauss(0.0, sigma))


class Harness:
    """One agent's controller and evidence, fed with real events on a manual clock."""

    def __init__(self, spec_yaml: str, seed: int = 0) -> None:
        self.clock = ManualClock()
        self.yaml = spec_yaml
        self.spec: RolloutSpec = load_spec_text(spec_yaml, "test.yaml")
        self.ctl = RolloutController(AGENT)
        self.book = EvidenceBook()
        self.rng = random.Random(seed)

    # -- the rollout -------------------------------------------------------------------------

    def start(self, decided_by: str = "test", generation_base: int = 0) -> control_pb2.RolloutState:
        state = self.ctl.start(self.spec, self.yaml, self.clock.now(), decided_by, generation_base)
        self.book.sync(state, self.spec)
        return state

    @property
    def state(self) -> control_pb2.RolloutState:
        assert self.ctl.state is not None
        return self.ctl.state

    @property
    def evidence(self) -> RolloutEvidence:
        evidence = self.book.get(AGENT)
        assert evidence is not None
        return evidence

    def tick(self, seconds: float = 1.0) -> control_pb2.RolloutState | None:
        """Advance the clock, let the controller look, and keep the evidence's stages in step."""
        self.clock.advance(seconds)
        state = self.ctl.evaluate(self.evidence, self.clock.now())
        if state is not None:
            self.book.sync(state, self.ctl.spec)
        return state

    # -- traffic -----------------------------------------------------------------------------

    def add(self, events: list[events_pb2.Event]) -> int:
        return self.book.add_events(events, self.clock.now())

    def feed(
        self,
        n: int,
        *,
        canary: bool,
        error_every: int = 0,
        latency_ms: float = 100.0,
        error_class: str = "provider_5xx",
    ) -> None:
        """`n` calls, each in a session of its own, every `error_every`-th one failed."""
        arm, now = int(canary), self.clock.now()
        events = [
            call_event(
                self.state.rollout_id,
                arm,
                now,
                error_class=error_class if error_every > 0 and i % error_every == 0 else "",
                latency_ms=jittered(self.rng, latency_ms),
            )
            for i in range(n)
        ]
        assert self.add(events) == n

    def healthy_traffic_for(
        self, seconds: int, *, latency_ms: float = 100.0, stable: int = 5, candidate: int = 2
    ) -> list[control_pb2.RolloutState]:
        changes = []
        for _ in range(seconds):
            self.feed(stable, canary=False)
            self.feed(candidate, canary=True, latency_ms=latency_ms)
            if (state := self.tick()) is not None:
                changes.append(state)
        return changes


def session_rows(
    evidence: RolloutEvidence,
    rows: Rows,
    arm: int,
    t: float,
    sessions: int,
    *,
    calls: int = 3,
    error_rate: float = 0.0,
    latency_ms: float = 100.0,
    rng: random.Random,
    units: Iterator[int],
) -> None:
    """`sessions` new units of `calls` calls each as the simulator builds them (one row a unit),
    for tests that need more traffic than protobufs can give quickly."""
    for _ in range(sessions):
        errors = sum(rng.random() < error_rate for _ in range(calls))
        logs = [math.log(jittered(rng, latency_ms)) for _ in range(calls)]
        dn, ds, trig = [0.0] * FAMILIES, [0.0] * FAMILIES, [0.0] * TCOLS
        dn[REQ], ds[REQ] = calls, errors
        dn[CALL] = calls
        dn[LAT], ds[LAT] = calls, sum(logs)
        trig[T_REQ], trig[T_ERR], trig[T_CALLS] = calls, errors, calls
        rows.keys.append(next(units))
        rows.arms.append(arm)
        rows.times.append(t)
        rows.dn.append(dn)
        rows.ds.append(ds)
        rows.trig.append(trig)
