"""Circuit breaker: example behaviours and a property test over any interleaving of inputs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.clock import ManualClock
from sidecar.resilience._breaker import (
    MAX_PENDING_TRANSITIONS,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
)

OPEN, CLOSED, HALF = BreakerState.OPEN, BreakerState.CLOSED, BreakerState.HALF_OPEN


def make(**overrides: float) -> tuple[CircuitBreaker, ManualClock]:
    clock = ManualClock()
    return CircuitBreaker("openai/gpt-x", BreakerConfig(**overrides), clock), clock  # type: ignore[arg-type]


def trip(b: CircuitBreaker, n: int = 5) -> None:
    for _ in range(n):
        assert b.allow()
        b.record_failure()


def test_opens_after_consecutive_failures_and_a_success_resets_the_count() -> None:
    b, _ = make()
    trip(b, 4)
    b.record_success()
    trip(b, 4)
    assert b.state is CLOSED
    b.record_failure()
    assert b.state is OPEN
    [t] = b.drain_transitions()
    assert (t.old, t.new, t.reason, t.breaker) == (CLOSED, OPEN, "consecutive_failures", "openai/gpt-x")


def test_opens_on_failure_rate_only_with_enough_requests() -> None:
    b, _ = make(min_requests=20)
    for _ in range(9):  # alternate: never 2 failures in a row
        b.record_success()
        b.record_failure()
    assert b.state is CLOSED  # 9/18 failed, but 18 < min_requests
    b.record_success()
    b.record_failure()  # 10/20 = 0.5
    assert b.state is OPEN
    assert b.drain_transitions()[0].reason == "failure_rate"


def test_old_outcomes_leave_the_window() -> None:
    b, clock = make(min_requests=4, window_s=10.0)
    b.record_failure()
    b.record_failure()
    clock.advance(12)
    b.record_success()
    b.record_success()
    b.record_failure()  # in window: 1 failure of 3 requests
    assert b.state is CLOSED


def test_open_refuses_until_cooldown_then_half_open_admits_bounded_probes() -> None:
    b, clock = make(cooldown_s=5.0, half_open_probes=3)
    trip(b)
    assert not b.allow()
    assert b.retry_after_s() == pytest.approx(5.0)
    clock.advance(4.9)
    assert not b.allow()
    assert b.retry_after_s() == pytest.approx(0.1)
    clock.advance(0.1)
    assert [b.allow() for _ in range(5)] == [True, True, True, False, False]
    assert b.state is HALF
    assert b.retry_after_s() == 0.0
    b.record_success()
    b.record_success()
    assert b.state is HALF and not b.allow()  # 2 done + 1 in flight = 3
    b.record_success()
    assert b.state is CLOSED
    assert [(t.old, t.new) for t in b.drain_transitions()] == [(CLOSED, OPEN), (OPEN, HALF), (HALF, CLOSED)]


def test_release_frees_a_probe_slot_without_counting() -> None:
    b, clock = make(half_open_probes=1)
    trip(b)
    clock.advance(5)
    assert b.allow()
    assert not b.allow()
    b.release()
    assert b.state is HALF
    assert b.allow()
    b.record_success()
    assert b.state is CLOSED


def test_cooldown_grows_on_each_reopen_is_capped_and_resets_after_close() -> None:
    b, clock = make(cooldown_s=5.0, cooldown_multiplier=2.0, cooldown_max_s=30.0, half_open_probes=1)
    trip(b)
    seen = []
    for _ in range(5):
        clock.advance(b.retry_after_s())
        assert b.allow()
        b.record_failure()
        seen.append(b.retry_after_s())
    assert seen == [10.0, 20.0, 30.0, 30.0, 30.0]
    assert b.drain_transitions()[-1].cooldown_s == 30.0
    clock.advance(30)
    assert b.allow()
    b.record_success()
    assert b.state is CLOSED and b.cooldown_s == 5.0
    trip(b)
    assert b.retry_after_s() == 5.0


def test_results_arriving_while_open_are_ignored() -> None:
    b, _ = make()
    trip(b)
    b.record_success()
    b.record_failure()
    assert b.state is OPEN
    assert len(b.drain_transitions()) == 1


def test_pending_transitions_are_bounded_and_overflow_is_counted() -> None:
    b, clock = make(half_open_probes=1, cooldown_max_s=5.0, cooldown_multiplier=1.0)
    trip(b)
    for _ in range(MAX_PENDING_TRANSITIONS):
        clock.advance(5)
        assert b.allow()
        b.record_failure()
    assert len(b.drain_transitions()) == MAX_PENDING_TRANSITIONS
    assert b.dropped_transitions == MAX_PENDING_TRANSITIONS + 1
    assert b.drain_transitions() == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("consecutive_failures", 0),
        ("failure_rate", 1.5),
        ("window_s", 0),
        ("min_requests", 0),
        ("cooldown_s", 0),
        ("cooldown_max_s", 1.0),
        ("cooldown_multiplier", 0.5),
        ("half_open_probes", 0),
    ],
)
def test_config_errors_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        BreakerConfig(**{field: value})  # type: ignore[arg-type]


LEGAL = {(CLOSED, OPEN), (OPEN, HALF), (HALF, OPEN), (HALF, CLOSED)}
ops = st.lists(
    st.one_of(
        st.sampled_from(["allow", "success", "failure", "release"]),
        st.floats(min_value=0.0, max_value=40.0),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=ops,
    probes=st.integers(1, 4),
    consecutive=st.integers(1, 6),
    min_requests=st.integers(1, 10),
    rate=st.floats(0.1, 1.0),
)
def test_any_interleaving_keeps_a_valid_state(
    ops: list[str | float], probes: int, consecutive: int, min_requests: int, rate: float
) -> None:
    config = BreakerConfig(
        consecutive_failures=consecutive,
        failure_rate=rate,
        min_requests=min_requests,
        window_s=10.0,
        cooldown_s=1.0,
        cooldown_max_s=8.0,
        half_open_probes=probes,
    )
    clock = ManualClock()
    b = CircuitBreaker("up", config, clock)
    state = CLOSED
    opened_at = None
    for op in ops:
        if isinstance(op, float):
            clock.advance(op)
        elif op == "allow":
            was_open_early = b.state is OPEN and b.retry_after_s() > 0
            admitted = b.allow()
            if was_open_early:
                assert not admitted, "OPEN admitted before its cooldown"
        elif op == "success":
            b.record_success()
        elif op == "failure":
            b.record_failure()
        else:
            b.release()
        assert b.state in (CLOSED, OPEN, HALF)
        assert 0 <= b.probes_in_flight <= probes
        assert b.probes_in_flight == 0 or b.state is HALF
        assert config.cooldown_s <= b.cooldown_s <= config.cooldown_max_s
        assert 0.0 <= b.retry_after_s() <= config.cooldown_max_s
        for t in b.drain_transitions():
            assert t.old is state and (t.old, t.new) in LEGAL
            if t.new is OPEN:
                opened_at = t.at
            if t.old is OPEN:
                assert opened_at is not None and t.at >= opened_at + config.cooldown_s
            state = t.new
        assert state is b.state
