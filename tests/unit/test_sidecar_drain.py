"""The router's drained(), the drain tracker (gauge, VersionDrained once) and the ErrorInfo
statuses, on a ManualClock; max_session_duration on session tokens."""

from __future__ import annotations

import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from hypothesis import given
from hypothesis import strategies as st

from outrider import SESSION_DRAINED, SESSION_EXPIRED
from outrider.v1 import control_pb2, events_pb2
from sidecar import ManualClock, Router, SessionCodec, SessionExpired
from sidecar.routing._drain import DEFAULT_ACTIVE_WINDOW_S, DrainTracker, drained_status, precondition_status
from sidecar.routing._session import Session
from sidecar.telemetry._metrics import SidecarMetrics

STABLE, CANDIDATE = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
T0 = 1_700_000_000.0
DEADLINE = T0 + 600


def rolled_back(
    generation: int = 2, deadline: float = DEADLINE, rollout_id: str = "r1"
) -> control_pb2.RolloutState:
    return control_pb2.RolloutState(
        agent="bot",
        generation=generation,
        rollout_id=rollout_id,
        stable_version_id=STABLE,
        candidate_version_id=CANDIDATE,
        phase=control_pb2.ROLLOUT_PHASE_ROLLED_BACK,
        drain_timeout_s=600,
        retired=[
            control_pb2.RetiredVersion(
                version_id=CANDIDATE,
                drain_deadline_unix_nano=round(deadline * 1e9),
                reason="rolled_back",
                rollout_id=rollout_id,
            )
        ],
    )


def session(version: str = CANDIDATE, rollout_id: str = "r1", nonce: str = "n1") -> Session:
    return Session(nonce, version, 2, rollout_id, T0 + 3600)


def router(*states: control_pb2.RolloutState) -> Router:
    r = Router("bot", STABLE, (STABLE, CANDIDATE))
    for s in states:
        r.apply(s)
    return r


def test_drain_router_drained_only_past_the_deadline() -> None:
    r = router(rolled_back())
    assert not r.drained(session(), T0)
    assert not r.drained(session(), DEADLINE - 0.001)
    assert r.drained(session(), DEADLINE)
    assert r.drained(session(), DEADLINE + 3000)
    # stable sessions, and the candidate pinned by another rollout, are not drained
    assert not r.drained(session(STABLE), DEADLINE + 1)
    assert not r.drained(session(rollout_id="r2"), DEADLINE + 1)
    # no state, or a state without retired versions: nothing drains
    assert not router().drained(session(), DEADLINE + 1)
    assert r.retirement_of(session()) == rolled_back().retired[0]


def test_drain_router_keeps_the_newest_states_list() -> None:
    r = router(rolled_back(generation=2))
    newer = rolled_back(generation=3)
    del newer.retired[:]
    assert r.apply(newer)
    assert not r.drained(session(), DEADLINE + 1) and not r.retired
    assert not r.apply(rolled_back(generation=3))  # not newer: ignored, the list stays empty
    assert not r.retired


@given(offset=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
def test_drain_router_drained_is_monotone_in_time(offset: float) -> None:
    r = router(rolled_back())
    assert r.drained(session(), DEADLINE + offset) == (
        round((DEADLINE + offset) * 1e9) >= round(DEADLINE * 1e9)
    )


class FakeTelemetry:
    def __init__(self) -> None:
        self.events: list[events_pb2.Event] = []

    def emit(self, event: events_pb2.Event) -> bool:
        self.events.append(event)
        return True


def tracker(r: Router, clock: ManualClock) -> tuple[DrainTracker, SidecarMetrics, FakeTelemetry]:
    metrics, telemetry = SidecarMetrics(), FakeTelemetry()
    t = DrainTracker(
        r,
        agent="bot",
        sidecar_id="sc",
        clock=clock,
        metrics=metrics,
        telemetry=telemetry,  # type: ignore[arg-type]
    )
    return t, metrics, telemetry


def draining(metrics: SidecarMetrics, version: str = CANDIDATE) -> float | None:
    return metrics.registry.get_sample_value("outrider_sidecar_sessions_draining", {"version": version})


def test_drain_tracker_serves_then_cuts_and_announces_once() -> None:
    clock = ManualClock(T0)
    t, metrics, telemetry = tracker(router(rolled_back()), clock)
    assert t.check(session(nonce="a")) is None
    assert t.check(session(nonce="b")) is None
    assert t.check(session(STABLE, nonce="c")) is None
    assert draining(metrics) == 2
    t.tick()
    assert telemetry.events == []
    clock.set(DEADLINE - 10)  # both still calling just before the deadline: served
    assert t.check(session(nonce="a")) is None and t.check(session(nonce="b")) is None
    clock.set(DEADLINE)
    entry = t.check(session(nonce="a"))
    assert entry is not None and entry.version_id == CANDIDATE and t.cut == 1
    assert draining(metrics) == 0
    [event] = telemetry.events
    assert event.WhichOneof("body") == "drained" and event.version_id == CANDIDATE
    assert event.drained.rollout_id == "r1" and event.drained.sessions_cut == 2
    t.tick()
    assert t.check(session(nonce="b")) is not None
    assert len(telemetry.events) == 1  # once


def test_drain_tracker_announces_early_when_no_session_remains() -> None:
    clock = ManualClock(T0)
    t, metrics, telemetry = tracker(router(rolled_back(deadline=T0 + 3 * DEFAULT_ACTIVE_WINDOW_S)), clock)
    t.check(session(nonce="a"))
    clock.advance(DEFAULT_ACTIVE_WINDOW_S - 1)
    t.tick()
    assert telemetry.events == [] and draining(metrics) == 1
    clock.advance(2)  # the last session has been idle for a whole window
    t.tick()
    [event] = telemetry.events
    assert event.drained.sessions_cut == 0 and draining(metrics) == 0


def test_drain_tracker_does_not_announce_drains_that_ended_before_it_started() -> None:
    clock = ManualClock(DEADLINE + 60)
    t, _, telemetry = tracker(router(rolled_back()), clock)
    t.tick()
    assert t.check(session()) is not None  # still refused
    t.tick()
    assert telemetry.events == []


def test_drain_tracker_forgets_entries_the_state_no_longer_lists() -> None:
    clock = ManualClock(T0)
    r = router(rolled_back())
    t, metrics, _ = tracker(r, clock)
    t.check(session())
    newer = rolled_back(generation=3)
    del newer.retired[:]
    r.apply(newer)
    t.tick()
    assert draining(metrics) is None


def test_drain_statuses_carry_error_info() -> None:
    entry = rolled_back().retired[0]
    status = drained_status(entry)
    assert status.code.name == "FAILED_PRECONDITION" and "open a new session" in status.details
    [(_, blob)] = [m for m in status.trailing_metadata if m[0] == "grpc-status-details-bin"]
    proto = status_pb2.Status.FromString(blob)
    info = error_details_pb2.ErrorInfo()
    assert proto.details[0].Unpack(info)
    assert (info.reason, info.domain) == (SESSION_DRAINED, "outrider.io")
    assert info.metadata["version_id"] == CANDIDATE and info.metadata["rollout_id"] == "r1"
    expired = precondition_status(SESSION_EXPIRED, "session_id: session expired; open a new one")
    assert expired.code.name == "FAILED_PRECONDITION"


def test_drain_max_session_duration_caps_every_token() -> None:
    clock = ManualClock(T0)
    long_lived = SessionCodec(b"k" * 32, clock, ttl_s=7200)
    capped = SessionCodec(b"k" * 32, clock, ttl_s=7200, max_age_s=600)
    token, issued = long_lived.issue(nonce="n", version_id=CANDIDATE, role=2, rollout_id="r1")
    assert issued.issued_at == T0 and issued.expires_at == T0 + 7200
    assert capped.issue(nonce="m", version_id=CANDIDATE, role=2, rollout_id="r1")[1].expires_at == T0 + 600
    clock.advance(599)
    assert capped.decode(token).issued_at == T0
    clock.advance(1)
    # a replica with the cap refuses a token another replica issued for longer
    with pytest.raises(SessionExpired, match="max_session_duration"):
        capped.decode(token)
    assert long_lived.decode(token).nonce == "n"
    assert capped.decode(token, allow_expired=True).nonce == "n"


@pytest.mark.parametrize(("value", "ok"), [("1h", True), ("24h", True), ("25h", False), ("0s", False)])
def test_drain_max_session_duration_config(value: str, ok: bool) -> None:
    from sidecar import ConfigError
    from sidecar._config import DEFAULT_MAX_SESSION_DURATION_S, parse_config
    from tests.unit.test_sidecar_config import base

    default = parse_config(base(), source="s.yaml").max_session_duration
    assert default == DEFAULT_MAX_SESSION_DURATION_S == 3600
    data = {**base(), "max_session_duration": value}
    if ok:
        assert parse_config(data, source="s.yaml").max_session_duration > 0
    else:
        with pytest.raises(ConfigError, match="max_session_duration"):
            parse_config(data, source="s.yaml")
