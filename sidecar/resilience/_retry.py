"""Retry decisions: jittered backoff, server hints, one deadline, a budget per upstream.

Pure functions and one small state object; the async layer sleeps and calls. ``attempt``
is always the 1-based number of the attempt that just failed (tenacity's
``attempt_number``), so the first retry waits ``uniform(0, min(cap, base))``, the second
``uniform(0, min(cap, 2 * base))`` and so on (exponential backoff with full jitter).

A failed attempt is retried only when all of these hold (``should_retry``):
the failure is retryable (connect error, timeout, or a status in ``retryable_statuses``);
the call is idempotent (tools must be marked so; LLM calls pass ``idempotent=True``);
fewer than ``max_attempts`` attempts were made; and the delay plus the time one more
attempt needs (``max(min_attempt_s, expected_attempt_s)``) fits in what is left of the
call's single deadline, so no retry starts that cannot finish. The ``RetryBudget`` is asked
last, by the caller, because it holds a slot that must be given back.

``RetryBudget`` follows Envoy's retry budget: concurrent retries are capped at
``max(min_retries, ratio * active requests)``; it is a concurrency cap, not a per-window
count, so there is no window to tune and an outage cannot multiply load beyond 1 + ratio.

The tenacity adapters at the bottom (``TenacityRetry``, ``TenacityWait``, ``TenacityStop``)
apply the same rules inside ``tenacity.AsyncRetrying``; the caller supplies ``classify``
to map its exceptions to an ``AttemptFailure`` (``None`` = not retryable).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from tenacity import RetryCallState

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BASE_S = 0.1
DEFAULT_CAP_S = 2.0
DEFAULT_RETRY_AFTER_CAP_S = 10.0
DEFAULT_MIN_ATTEMPT_S = 0.05
RETRYABLE_STATUSES: frozenset[int] = frozenset({429, 500, 502, 503, 504})
DEFAULT_BUDGET_RATIO = 0.2
DEFAULT_BUDGET_MIN_RETRIES = 3


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # attempts in all, the first included
    base_s: float = DEFAULT_BASE_S
    cap_s: float = DEFAULT_CAP_S
    retry_after_cap_s: float = DEFAULT_RETRY_AFTER_CAP_S
    retryable_statuses: frozenset[int] = RETRYABLE_STATUSES
    min_attempt_s: float = DEFAULT_MIN_ATTEMPT_S  # the least time worth starting an attempt with

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not self.base_s >= 0:
            raise ValueError("base_s must be >= 0")
        if not self.cap_s >= self.base_s:
            raise ValueError("cap_s must be >= base_s")
        if not self.retry_after_cap_s >= 0:
            raise ValueError("retry_after_cap_s must be >= 0")
        if not self.min_attempt_s >= 0:
            raise ValueError("min_attempt_s must be >= 0")
        if any(not 100 <= s <= 599 for s in self.retryable_statuses):
            raise ValueError("retryable_statuses must be HTTP status codes (100-599)")


class FailureKind(enum.Enum):
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    HTTP_STATUS = "http_status"
    OTHER = "other"  # malformed body, protocol error...: never retried


@dataclass(frozen=True)
class AttemptFailure:
    kind: FailureKind
    status: int | None = None
    retry_after_s: float | None = None  # the server's hint, from parse_retry_after


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay_s: float
    reason: str  # "retry", "not_retryable", "not_idempotent", "attempts_exhausted", "deadline"


def is_retryable(failure: AttemptFailure, policy: RetryPolicy) -> bool:
    if failure.kind in (FailureKind.CONNECT_ERROR, FailureKind.TIMEOUT):
        return True
    return failure.kind is FailureKind.HTTP_STATUS and failure.status in policy.retryable_statuses


def backoff_s(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**(attempt - 1)))."""
    if attempt < 1:
        raise ValueError("attempt must be >= 1")
    exp = attempt - 1
    ceiling = policy.cap_s if exp >= 64 else min(policy.cap_s, policy.base_s * 2.0**exp)
    return rng.uniform(0.0, ceiling)


def parse_retry_after(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, then ``Retry-After`` as
    delay-seconds or an HTTP-date. Case-insensitive names; garbage or negative -> None."""
    ms: str | None = None
    plain: str | None = None
    for name, value in headers.items():
        lowered = name.lower()
        if lowered == "retry-after-ms" and ms is None:
            ms = value
        elif lowered == "retry-after" and plain is None:
            plain = value
    if ms is not None and (seconds := _non_negative(ms)) is not None:
        return seconds / 1000.0
    if plain is None:
        return None
    if (seconds := _non_negative(plain)) is not None:
        return seconds
    try:
        when = parsedate_to_datetime(plain.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": HTTP-dates are GMT anyway
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_epoch)


def _non_negative(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def next_delay(attempt: int, policy: RetryPolicy, rng: random.Random, retry_after_s: float | None) -> float:
    """The jittered backoff, or the server's hint (capped) when that is longer."""
    delay = backoff_s(attempt, policy, rng)
    if retry_after_s is not None:
        delay = max(delay, min(max(retry_after_s, 0.0), policy.retry_after_cap_s))
    return delay


def should_retry(
    failure: AttemptFailure,
    attempt: int,
    policy: RetryPolicy,
    *,
    delay_s: float,
    deadline_remaining_s: float,
    idempotent: bool,
    expected_attempt_s: float = 0.0,
) -> RetryDecision:
    """Decide about retrying after ``attempt`` failed; ``delay_s`` comes from next_delay."""
    if not is_retryable(failure, policy):
        return RetryDecision(False, 0.0, "not_retryable")
    if not idempotent:
        return RetryDecision(False, 0.0, "not_idempotent")
    if attempt >= policy.max_attempts:
        return RetryDecision(False, 0.0, "attempts_exhausted")
    if delay_s + max(policy.min_attempt_s, expected_attempt_s) > deadline_remaining_s:
        return RetryDecision(False, 0.0, "deadline")
    return RetryDecision(True, delay_s, "retry")


class RetryBudget:
    """Per upstream: concurrent retries <= max(min_retries, ratio * active requests)."""

    def __init__(
        self, ratio: float = DEFAULT_BUDGET_RATIO, min_retries: int = DEFAULT_BUDGET_MIN_RETRIES
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("ratio must be in [0, 1]")
        if min_retries < 0:
            raise ValueError("min_retries must be >= 0")
        self.ratio = ratio
        self.min_retries = min_retries
        self.active = 0
        self.retries_in_flight = 0
        self.refused = 0  # retries the budget said no to, for a metric

    def on_request(self) -> None:
        self.active += 1

    def on_request_done(self) -> None:
        self.active = max(0, self.active - 1)

    def limit(self) -> int:
        return max(self.min_retries, math.floor(self.ratio * self.active))

    def try_acquire_retry(self) -> bool:
        if self.retries_in_flight >= self.limit():
            self.refused += 1
            return False
        self.retries_in_flight += 1
        return True

    def release_retry(self) -> None:
        self.retries_in_flight = max(0, self.retries_in_flight - 1)


Classify = Callable[[BaseException], AttemptFailure | None]


def _failure(state: RetryCallState, classify: Classify) -> AttemptFailure | None:
    outcome = state.outcome
    if outcome is None or not outcome.failed:
        return None
    exc = outcome.exception()
    return classify(exc) if exc is not None else None


class TenacityRetry:
    """tenacity ``retry=``: retry only retryable failures of idempotent calls."""

    def __init__(self, policy: RetryPolicy, classify: Classify, *, idempotent: bool) -> None:
        self._policy, self._classify, self._idempotent = policy, classify, idempotent

    def __call__(self, state: RetryCallState) -> bool:
        failure = _failure(state, self._classify)
        return failure is not None and self._idempotent and is_retryable(failure, self._policy)


class TenacityWait:
    """tenacity ``wait=``: next_delay with the failure's server hint."""

    def __init__(self, policy: RetryPolicy, rng: random.Random, classify: Classify) -> None:
        self._policy, self._rng, self._classify = policy, rng, classify

    def __call__(self, state: RetryCallState) -> float:
        failure = _failure(state, self._classify)
        hint = failure.retry_after_s if failure is not None else None
        return next_delay(state.attempt_number, self._policy, self._rng, hint)


class TenacityStop:
    """tenacity ``stop=``: attempts exhausted, or the upcoming sleep plus one attempt
    would overrun the deadline (tenacity computes the wait before asking stop)."""

    def __init__(
        self, policy: RetryPolicy, deadline_remaining: Callable[[], float], expected_attempt_s: float = 0.0
    ) -> None:
        self._policy, self._remaining, self._expected = policy, deadline_remaining, expected_attempt_s

    def __call__(self, state: RetryCallState) -> bool:
        if state.attempt_number >= self._policy.max_attempts:
            return True
        need = state.upcoming_sleep + max(self._policy.min_attempt_s, self._expected)
        return need > self._remaining()
