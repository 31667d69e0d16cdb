"""Helpers for the shadow tests: real ShadowRecord and JudgeRecord events, and a harness that
feeds them through the collector's EvidenceBook to a controller on a manual clock."""

from __future__ import annotations

import itertools

from collector import ShadowEvidence
from outrider.v1 import common_pb2, control_pb2, events_pb2
from tests.unit.rollout_support import AGENT, CANDIDATE_V, STABLE_V, Harness

SHADOW = control_pb2.ROLLOUT_PHASE_SHADOW
_ids = itertools.count()


def shadow_event(
    rollout_id: str,
    t: float,
    session: str,
    *,
    agree: bool = True,
    similarity: float = 0.9,
    error: bool = False,
    stable_error: bool = False,
    latency_ms: tuple[float, float] = (100.0, 100.0),  # stable, candidate
    cost_usd: tuple[float, float] = (0.002, 0.002),
    tokens: tuple[int, int] = (100, 100),
    pair_id: str = "",
) -> events_pb2.Event:
    """One mirrored call of stable session `session`, as a sidecar reports it."""
    e = events_pb2.Event(
        event_id=f"sh{next(_ids)}",
        time_unix_nano=round(t * 1e9),
        agent=AGENT,
        version_id=CANDIDATE_V,
        role=common_pb2.ROLE_SHADOW,
        session_id=session,
        rollout_id=rollout_id,
    )
    s = e.shadow
    s.stable_version_id, s.operation = STABLE_V, "chat"
    s.outcome = events_pb2.OUTCOME_ERROR if error else events_pb2.OUTCOME_OK
    s.error_class = "bad_request" if error else ""
    s.stable_outcome = events_pb2.OUTCOME_ERROR if stable_error else events_pb2.OUTCOME_OK
    s.tools_agree = agree
    if not agree:
        s.differing_fields.append("tool_calls[0].name")
    s.text_similarity, s.similarity_measure = similarity, "token_set_ratio"
    s.stable_latency_ms, s.candidate_latency_ms = latency_ms
    s.stable_cost_usd, s.candidate_cost_usd = cost_usd
    s.stable_input_tokens, s.candidate_input_tokens = tokens
    s.pair_id = pair_id or e.event_id
    return e


def judge_event(
    rollout_id: str,
    t: float,
    session: str,
    *,
    score: float = 0.8,
    stable_score: float = 0.8,
    preference: str = "tie",
    parsed: bool = True,
    kind: str = "pair",
    version: str = CANDIDATE_V,
    role: int = common_pb2.ROLE_SHADOW,
    cost_usd: float = 0.001,
) -> events_pb2.Event:
    e = events_pb2.Event(
        event_id=f"j{next(_ids)}",
        time_unix_nano=round(t * 1e9),
        agent=AGENT,
        version_id=version,
        role=role,
        session_id=session,
        rollout_id=rollout_id,
    )
    j = e.judge
    j.kind, j.judge, j.parsed = kind, "openai/judge-1", parsed
    j.score, j.stable_score, j.preference, j.cost_usd = score, stable_score, preference, cost_usd
    j.outcome = events_pb2.OUTCOME_OK
    return e


def intercepted_write(rollout_id: str, t: float, session: str) -> events_pb2.Event:
    e = events_pb2.Event(
        event_id=f"w{next(_ids)}",
        time_unix_nano=round(t * 1e9),
        agent=AGENT,
        version_id=CANDIDATE_V,
        role=common_pb2.ROLE_SHADOW,
        session_id=session,
        rollout_id=rollout_id,
    )
    e.tool.tool_name, e.tool.intercepted, e.tool.side_effects = "refund", True, "write"
    e.tool.arguments_sha256 = "ab" * 32
    e.tool.outcome = events_pb2.OUTCOME_OK
    return e


class ShadowHarness(Harness):
    """The rollout Harness, whose looks also see the shadow evidence."""

    @property
    def shadow(self) -> ShadowEvidence:
        shadow = self.book.shadow(AGENT)
        assert shadow is not None
        return shadow

    def tick(self, seconds: float = 1.0) -> control_pb2.RolloutState | None:
        self.clock.advance(seconds)
        state = self.ctl.evaluate(self.evidence, self.clock.now(), self.book.shadow(AGENT))
        if state is not None:
            self.book.sync(state, self.ctl.spec)
        return state

    def pairs(self, sessions: int, per_session: int = 2, **kwargs: object) -> None:
        """`per_session` mirrored calls in each of `sessions` new stable sessions, now."""
        now, rollout = self.clock.now(), self.state.rollout_id
        events = []
        for _ in range(sessions):
            session = f"st{next(_ids)}"
            events += [shadow_event(rollout, now, session, **kwargs) for _ in range(per_session)]  # type: ignore[arg-type]
        assert self.add(events) == len(events)
