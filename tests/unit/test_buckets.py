"""Token buckets and the keyed (per user / per tenant) limiter."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.clock import ManualClock
from sidecar.resilience._buckets import Admission, KeyedLimiter, TokenBucket

EPS = 1e-6


def test_take_refill_and_time_until() -> None:
    clock = ManualClock()
    b = TokenBucket(10, 2, clock)
    assert b.try_take(10)
    assert not b.try_take(1)
    assert b.time_until(4) == pytest.approx(2.0)
    clock.advance(2)
    assert b.try_take(4)
    clock.advance(100)
    assert b.level == 10  # never above capacity
    assert b.time_until(11) == math.inf
    assert b.try_take(0)


def test_refund_is_clipped_and_force_take_makes_a_debt() -> None:
    clock = ManualClock()
    b = TokenBucket(10, 1, clock)
    assert b.try_take(3)
    b.refund(50)
    assert b.level == 10
    b.force_take(15)
    assert b.level == -5
    assert not b.try_take(1)
    assert b.time_until(1) == pytest.approx(6.0)  # the debt is paid first


def test_set_rate_keeps_the_level_clipped() -> None:
    clock = ManualClock()
    b = TokenBucket(100, 1, clock)
    assert b.try_take(60)
    b.set_rate(200, 10)
    assert b.level == 40  # no burst from a bigger grant
    clock.advance(1)
    assert b.level == 50
    b.set_rate(20, 1)
    assert b.level == 20


def test_zero_rate_never_refills() -> None:
    clock = ManualClock()
    b = TokenBucket(5, 0, clock)
    assert b.try_take(5)
    clock.advance(1e6)
    assert b.time_until(1) == math.inf and not b.try_take(1)


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("capacity", lambda: TokenBucket(-1, 1)),
        ("refill_per_s", lambda: TokenBucket(1, math.nan)),
        ("n", lambda: TokenBucket(1, 1).try_take(-1)),
        ("tokens_per_min", lambda: KeyedLimiter(0, 10)),
        ("requests_per_min", lambda: KeyedLimiter(10, -1)),
        ("max_keys", lambda: KeyedLimiter(10, 10, max_keys=0)),
        ("idle_ttl_s", lambda: KeyedLimiter(10, 10, idle_ttl_s=30)),
    ],
)
def test_bad_values_name_the_field(field: str, make: object) -> None:
    with pytest.raises(ValueError, match=field):
        make()  # type: ignore[operator]


steps = st.lists(
    st.tuples(st.floats(0, 5), st.floats(0, 30)),  # (advance seconds, tokens to take)
    max_size=80,
)


@settings(max_examples=300)
@given(capacity=st.floats(1, 100), rate=st.floats(0, 20), steps=steps)
def test_admitted_over_any_interval_within_capacity_plus_refill(
    capacity: float, rate: float, steps: list[tuple[float, float]]
) -> None:
    clock = ManualClock(0.0)
    b = TokenBucket(capacity, rate, clock)
    taken: list[tuple[float, float]] = []
    for advance, n in steps:
        clock.advance(advance)
        if b.try_take(n):
            taken.append((clock.now(), n))
        assert b.level <= capacity + EPS
    for i, (start, _) in enumerate(taken):
        total = 0.0
        for at, n in taken[i:]:
            total += n
            assert total <= capacity + rate * (at - start) + EPS


@settings(max_examples=300)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["take", "refund", "force", "rate", "wait"]),
            st.floats(0, 50),
            st.just(0.0) | st.floats(0.01, 10),  # a denormal rate would overflow the clock
        ),
        max_size=80,
    )
)
def test_level_never_exceeds_capacity_and_time_until_is_honest(ops: list[tuple[str, float, float]]) -> None:
    clock = ManualClock(0.0)
    b = TokenBucket(20, 2, clock)
    for op, x, y in ops:
        if op == "take":
            b.try_take(x)
        elif op == "refund":
            b.refund(x)
        elif op == "force":
            b.force_take(x)
        elif op == "rate":
            b.set_rate(x, y)
        else:
            clock.advance(y)
        assert b.level <= b.capacity + EPS
        wait = b.time_until(min(x, b.capacity))
        if math.isfinite(wait):
            clock.advance(wait)
            assert b.level >= min(x, b.capacity) - EPS


def test_keyed_limiter_keys_are_independent_and_requests_count() -> None:
    clock = ManualClock()
    lim = KeyedLimiter(tokens_per_min=600, requests_per_min=2, clock=clock)
    assert lim.admit("alice", 500).ok
    assert lim.admit("bob", 500).ok
    refused = lim.admit("alice", 200)
    assert (refused.ok, refused.which) == (False, "tokens")
    assert refused.retry_after_s == pytest.approx(10.0)  # 100 short at 10/s
    assert lim.admit("alice", 50).ok
    third = lim.admit("alice", 1)
    assert (third.ok, third.which) == (False, "requests")
    assert third.retry_after_s == pytest.approx(30.0)  # one request per 30 s
    assert lim.admit("carol", 601) == Admission(False, math.inf, "tokens")  # can never fit


def test_keyed_limiter_reconcile_refunds_or_charges() -> None:
    clock = ManualClock()
    lim = KeyedLimiter(tokens_per_min=600, requests_per_min=None, clock=clock)
    assert lim.admit("u", 600).ok
    lim.reconcile("u", reserved=600, actual=100)
    assert lim.admit("u", 500).ok
    lim.reconcile("u", reserved=500, actual=800)  # 300 over: a debt
    assert lim.admit("u", 1).retry_after_s == pytest.approx(30.1)
    lim.reconcile("nobody", 10, 0)  # unknown key: nothing to do


def test_keyed_limiter_unlimited_dimension() -> None:
    lim = KeyedLimiter(tokens_per_min=None, requests_per_min=1, clock=ManualClock())
    assert lim.admit("u", 1e9).ok
    assert lim.admit("u", 0).which == "requests"


def test_keyed_limiter_is_bounded_and_forgets_idle_keys() -> None:
    clock = ManualClock()
    lim = KeyedLimiter(tokens_per_min=100, requests_per_min=100, max_keys=3, idle_ttl_s=60, clock=clock)
    for key in "abcde":
        lim.admit(key, 100)
    assert len(lim) == 3
    clock.advance(30)
    assert not lim.admit("e", 100).ok  # still remembered: its use counts
    clock.advance(59)
    assert len(lim) == 1  # a..d gone, e refreshed by its last admit
    clock.advance(61)
    assert len(lim) == 0


@settings(max_examples=200)
@given(steps=st.lists(st.tuples(st.floats(0, 20), st.sampled_from("xy"), st.floats(0, 400)), max_size=60))
def test_keyed_limiter_per_key_admissions_within_the_per_minute_bound(
    steps: list[tuple[float, str, float]],
) -> None:
    clock = ManualClock(0.0)
    lim = KeyedLimiter(tokens_per_min=600, requests_per_min=10, clock=clock)
    admitted: dict[str, list[tuple[float, float]]] = {"x": [], "y": []}
    for advance, key, tokens in steps:
        clock.advance(advance)
        if lim.admit(key, tokens).ok:
            admitted[key].append((clock.now(), tokens))
    for calls in admitted.values():
        for i, (start, _) in enumerate(calls):
            tokens_sum = 0.0
            for count, (at, n) in enumerate(calls[i:], start=1):
                tokens_sum += n
                assert tokens_sum <= 600 + 10 * (at - start) + EPS
                assert count <= 10 + (at - start) / 6 + EPS
