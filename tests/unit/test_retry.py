"""Retry decisions: backoff bounds, server hints, deadline, idempotency, budget, tenacity glue."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tenacity import AsyncRetrying, RetryError, Retrying

from sidecar.resilience._retry import (
    AttemptFailure,
    FailureKind,
    RetryBudget,
    RetryPolicy,
    TenacityRetry,
    TenacityStop,
    TenacityWait,
    backoff_s,
    is_retryable,
    next_delay,
    parse_retry_after,
    should_retry,
)

NOW = 1_700_000_000.0
POLICY = RetryPolicy()
TIMEOUT = AttemptFailure(FailureKind.TIMEOUT)


def http(status: int, hint: float | None = None) -> AttemptFailure:
    return AttemptFailure(FailureKind.HTTP_STATUS, status, hint)


# --- Retry-After ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"RETRY-AFTER": "0"}, 0.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After-Ms": "250", "Retry-After": "9"}, 0.25),  # the finer hint wins
        ({"retry-after-ms": "soon", "Retry-After": "9"}, 9.0),  # bad ms falls back
        ({"Retry-After": format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True)}, 30.0),
        ({"Retry-After": format_datetime(datetime.fromtimestamp(NOW - 30, UTC), usegmt=True)}, 0.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 -0000"}, 0.0),  # past, zone-less date
        ({"Retry-After": "tomorrow-ish"}, None),
        ({"Retry-After": "-3"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": ""}, None),
        ({"retry-after-ms": "-1"}, None),
        ({"Content-Type": "application/json"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    got = parse_retry_after(headers, NOW)
    assert got == (pytest.approx(expected) if expected is not None else None)


@given(st.dictionaries(st.sampled_from(["Retry-After", "retry-after-ms", "X"]), st.text(max_size=40)))
def test_parse_retry_after_never_raises_and_never_goes_negative(headers: dict[str, str]) -> None:
    got = parse_retry_after(headers, NOW)
    assert got is None or got >= 0


# --- backoff and delay ------------------------------------------------------------------


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    policy = RetryPolicy(base_s=0.1, cap_s=1.0)
    got = [backoff_s(n, policy, Top()) for n in range(1, 7)]
    assert got == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff_s(10_000, policy, Top()) == 1.0  # no overflow
    with pytest.raises(ValueError, match="attempt"):
        backoff_s(0, policy, Top())


@settings(max_examples=300)
@given(
    attempt=st.integers(1, 200),
    seed=st.integers(0, 2**32),
    hint=st.none() | st.floats(0, 1e6),
    base=st.floats(0, 1),
    cap=st.floats(1, 5),
)
def test_delay_is_jitter_in_range_or_the_capped_hint(
    attempt: int, seed: int, hint: float | None, base: float, cap: float
) -> None:
    policy = RetryPolicy(base_s=base, cap_s=cap, retry_after_cap_s=10.0)
    delay = next_delay(attempt, policy, random.Random(seed), hint)
    capped_hint = None if hint is None else min(hint, 10.0)
    assert 0 <= delay <= max(cap, capped_hint or 0.0)
    if capped_hint is not None:
        assert delay >= capped_hint
        assert delay <= cap or delay == capped_hint


def test_full_jitter_spreads_over_the_range() -> None:
    rng = random.Random(7)
    samples = [backoff_s(3, POLICY, rng) for _ in range(2000)]
    assert min(samples) < 0.05 and max(samples) > 0.35  # ceiling is 0.4
    assert 0.17 < sum(samples) / len(samples) < 0.23


# --- should_retry -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "retryable"),
    [
        (AttemptFailure(FailureKind.CONNECT_ERROR), True),
        (TIMEOUT, True),
        *[(http(s), True) for s in (429, 500, 502, 503, 504)],
        *[(http(s), False) for s in (400, 401, 404, 409, 501)],
        (AttemptFailure(FailureKind.OTHER), False),
    ],
)
def test_only_retryable_outcomes_are_retried(failure: AttemptFailure, retryable: bool) -> None:
    assert is_retryable(failure, POLICY) is retryable
    d = should_retry(failure, 1, POLICY, delay_s=0.1, deadline_remaining_s=30, idempotent=True)
    assert d.retry is retryable
    assert d.reason == ("retry" if retryable else "not_retryable")


def test_reasons_for_not_retrying() -> None:
    def ask(**kw: float | bool | int) -> str:
        args: dict[str, float | bool | int] = {
            "attempt": 1,
            "delay_s": 0.5,
            "deadline_remaining_s": 10.0,
            "idempotent": True,
        }
        args.update(kw)
        return should_retry(TIMEOUT, policy=POLICY, **args).reason  # type: ignore[arg-type]

    assert ask() == "retry"
    assert ask(idempotent=False) == "not_idempotent"
    assert ask(attempt=3) == "attempts_exhausted"
    assert ask(deadline_remaining_s=0.54) == "deadline"  # 0.5 + min_attempt_s 0.05 > 0.54
    assert ask(deadline_remaining_s=0.56) == "retry"
    assert ask(deadline_remaining_s=2.0, expected_attempt_s=1.6) == "deadline"


@settings(max_examples=300)
@given(
    kind=st.sampled_from(list(FailureKind)),
    status=st.integers(100, 599),
    attempt=st.integers(1, 10),
    delay=st.floats(0, 20),
    remaining=st.floats(-1, 20),
    expected=st.floats(0, 5),
    idempotent=st.booleans(),
)
def test_retry_never_overruns_deadline_nor_retries_non_idempotent(
    kind: FailureKind,
    status: int,
    attempt: int,
    delay: float,
    remaining: float,
    expected: float,
    idempotent: bool,
) -> None:
    d = should_retry(
        AttemptFailure(kind, status),
        attempt,
        POLICY,
        delay_s=delay,
        deadline_remaining_s=remaining,
        idempotent=idempotent,
        expected_attempt_s=expected,
    )
    if d.retry:
        assert idempotent
        assert attempt < POLICY.max_attempts
        assert d.delay_s + max(expected, POLICY.min_attempt_s) <= remaining


@pytest.mark.parametrize(
    ("field", "kw"),
    [
        ("max_attempts", {"max_attempts": 0}),
        ("base_s", {"base_s": -1}),
        ("cap_s", {"cap_s": 0.01}),
        ("retry_after_cap_s", {"retry_after_cap_s": -1}),
        ("min_attempt_s", {"min_attempt_s": -1}),
        ("retryable_statuses", {"retryable_statuses": frozenset({42})}),
    ],
)
def test_policy_errors_name_the_field(field: str, kw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**kw)  # type: ignore[arg-type]


# --- budget -----------------------------------------------------------------------------


def test_budget_floor_and_ratio() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=3)
    assert [budget.try_acquire_retry() for _ in range(4)] == [True, True, True, False]
    for _ in range(30):
        budget.on_request()
    assert budget.limit() == 6
    assert [budget.try_acquire_retry() for _ in range(4)] == [True, True, True, False]
    assert budget.refused == 2
    budget.release_retry()
    assert budget.try_acquire_retry()
    for _ in range(40):
        budget.on_request_done()
    assert budget.active == 0 and budget.limit() == 3


@given(st.lists(st.sampled_from(["req", "done", "acquire", "release"]), max_size=200))
def test_budget_never_exceeds_its_limit(ops: list[str]) -> None:
    budget = RetryBudget()
    for op in ops:
        if op == "req":
            budget.on_request()
        elif op == "done":
            budget.on_request_done()
        elif op == "acquire":
            before = budget.retries_in_flight
            if budget.try_acquire_retry():
                assert before < budget.limit()
        else:
            budget.release_retry()
        assert budget.active >= 0 and budget.retries_in_flight >= 0


# --- tenacity ---------------------------------------------------------------------------


class UpstreamStatus(Exception):
    def __init__(self, status: int, hint: float | None = None) -> None:
        super().__init__(status)
        self.status, self.hint = status, hint


def classify(exc: BaseException) -> AttemptFailure | None:
    if isinstance(exc, UpstreamStatus):
        return http(exc.status, exc.hint)
    if isinstance(exc, TimeoutError):
        return TIMEOUT
    return None


def retrying(policy: RetryPolicy, *, idempotent: bool = True, remaining: float = 60.0) -> Retrying:
    return Retrying(
        retry=TenacityRetry(policy, classify, idempotent=idempotent),
        wait=TenacityWait(policy, random.Random(1), classify),
        stop=TenacityStop(policy, lambda: remaining),
        sleep=sleeps.append,
    )


sleeps: list[float] = []


def run(r: Retrying, errors: list[BaseException]) -> tuple[str | None, int]:
    calls = 0

    def call() -> str:
        nonlocal calls
        calls += 1
        if errors:
            raise errors.pop(0)
        return "ok"

    try:
        return r(call), calls
    except (RetryError, UpstreamStatus, TimeoutError, KeyError):
        return None, calls


def test_tenacity_retries_then_succeeds_and_honours_the_hint() -> None:
    sleeps.clear()
    policy = RetryPolicy(max_attempts=3)
    assert run(retrying(policy), [UpstreamStatus(429, hint=4.0), TimeoutError()]) == ("ok", 3)
    assert sleeps[0] == 4.0 and 0 <= sleeps[1] <= 0.2


def test_tenacity_stops_on_non_retryable_non_idempotent_attempts_and_deadline() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert run(retrying(policy), [UpstreamStatus(400)]) == (None, 1)
    assert run(retrying(policy), [KeyError("bug")]) == (None, 1)
    assert run(retrying(policy, idempotent=False), [TimeoutError()]) == (None, 1)
    assert run(retrying(policy), [TimeoutError()] * 5) == (None, 3)
    assert run(retrying(policy, remaining=3.0), [UpstreamStatus(503, hint=5.0)]) == (None, 1)


async def test_tenacity_async_retrying_uses_the_same_callables() -> None:
    policy = RetryPolicy(max_attempts=2, base_s=0.001, cap_s=0.001)
    attempts = 0
    async for attempt in AsyncRetrying(
        retry=TenacityRetry(policy, classify, idempotent=True),
        wait=TenacityWait(policy, random.Random(1), classify),
        stop=TenacityStop(policy, lambda: 10.0),
    ):
        with attempt:
            attempts += 1
            if attempts == 1:
                raise TimeoutError
    assert attempts == 2
