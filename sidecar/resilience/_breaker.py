"""Circuit breaker per upstream: a pure state machine with an injected clock.

States and moves::

    CLOSED --(N consecutive failures, or failure rate >= R over the rolling window
              with >= min_requests calls)--> OPEN
    OPEN --(cooldown elapsed, noticed by the next allow())--> HALF_OPEN
    HALF_OPEN --(half_open_probes successes)--> CLOSED   (cooldown resets to the base)
    HALF_OPEN --(any probe failure)--> OPEN              (cooldown *= multiplier, capped)

OPEN answers ``allow() -> False`` at once, without touching the upstream, and
``retry_after_s()`` says when it will let a probe through. HALF_OPEN admits at most
``half_open_probes`` calls (in flight plus already succeeded), so exactly that many
successes close it. ``release()`` gives back the slot of an admitted call that never
produced a result (cancelled); it counts neither as success nor as failure.

Results are not tied to the state that admitted them: a result arriving while OPEN is
ignored; in HALF_OPEN a success counts as a probe only while probes are in flight, and
any failure re-opens (the conservative choice). Every state change is queued as a
``Transition`` (bounded; overflow is counted) for the async layer to turn into an event
via ``drain_transitions()``. The rolling window is a ring of time buckets, so memory
stays bounded whatever the request rate. A clock that steps backwards is tolerated.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from outrider.clock import Clock, SystemClock

DEFAULT_CONSECUTIVE_FAILURES = 5
DEFAULT_FAILURE_RATE = 0.5
DEFAULT_WINDOW_S = 30.0
DEFAULT_MIN_REQUESTS = 20
DEFAULT_COOLDOWN_S = 5.0
DEFAULT_COOLDOWN_MAX_S = 120.0
DEFAULT_COOLDOWN_MULTIPLIER = 2.0
DEFAULT_HALF_OPEN_PROBES = 3
WINDOW_BUCKETS = 10
MAX_PENDING_TRANSITIONS = 64


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    consecutive_failures: int = DEFAULT_CONSECUTIVE_FAILURES
    failure_rate: float = DEFAULT_FAILURE_RATE
    window_s: float = DEFAULT_WINDOW_S
    min_requests: int = DEFAULT_MIN_REQUESTS
    cooldown_s: float = DEFAULT_COOLDOWN_S
    cooldown_max_s: float = DEFAULT_COOLDOWN_MAX_S
    cooldown_multiplier: float = DEFAULT_COOLDOWN_MULTIPLIER
    half_open_probes: int = DEFAULT_HALF_OPEN_PROBES

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if not 0.0 < self.failure_rate <= 1.0:
            raise ValueError("failure_rate must be in (0, 1]")
        if not self.window_s > 0:
            raise ValueError("window_s must be > 0")
        if self.min_requests < 1:
            raise ValueError("min_requests must be >= 1")
        if not self.cooldown_s > 0:
            raise ValueError("cooldown_s must be > 0")
        if not self.cooldown_max_s >= self.cooldown_s:
            raise ValueError("cooldown_max_s must be >= cooldown_s")
        if not self.cooldown_multiplier >= 1.0:
            raise ValueError("cooldown_multiplier must be >= 1")
        if self.half_open_probes < 1:
            raise ValueError("half_open_probes must be >= 1")


@dataclass(frozen=True)
class Transition:
    """One state change, for the event the async layer emits.

    ``reason`` is one of consecutive_failures, failure_rate, cooldown_elapsed,
    probe_failed, probes_succeeded; ``cooldown_s`` is the cooldown in force after it.
    """

    breaker: str
    old: BreakerState
    new: BreakerState
    reason: str
    at: float
    cooldown_s: float


class _Window:
    """Success/failure counts over the last window_s, in WINDOW_BUCKETS time buckets."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._width = window_s / WINDOW_BUCKETS
        self._buckets: deque[list[float]] = deque()  # [start, successes, failures]

    def add(self, now: float, failed: bool) -> None:
        self._trim(now)
        if not self._buckets or now >= self._buckets[-1][0] + self._width:
            self._buckets.append([now, 0, 0])
        self._buckets[-1][2 if failed else 1] += 1

    def counts(self, now: float) -> tuple[int, int]:
        self._trim(now)
        return (int(sum(b[1] for b in self._buckets)), int(sum(b[2] for b in self._buckets)))

    def clear(self) -> None:
        self._buckets.clear()

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + self._width <= now - self._window_s:
            self._buckets.popleft()
        while len(self._buckets) > WINDOW_BUCKETS + 1:  # only if the clock misbehaves
            self._buckets.popleft()


class CircuitBreaker:
    """One upstream's breaker. Not thread-safe; meant for a single event loop."""

    def __init__(self, name: str, config: BreakerConfig | None = None, clock: Clock | None = None) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock: Clock = clock or SystemClock()
        self._state = BreakerState.CLOSED
        self._window = _Window(self.config.window_s)
        self._consecutive = 0
        self._cooldown = self.config.cooldown_s
        self._opened_at = 0.0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._transitions: deque[Transition] = deque(maxlen=MAX_PENDING_TRANSITIONS)
        self.dropped_transitions = 0

    @property
    def state(self) -> BreakerState:
        """The stored state; OPEN becomes HALF_OPEN only when allow() is asked."""
        return self._state

    @property
    def cooldown_s(self) -> float:
        """The cooldown the breaker uses (or would use) for its current or next opening."""
        return self._cooldown

    @property
    def probes_in_flight(self) -> int:
        return self._probes_in_flight

    def allow(self) -> bool:
        """May a call go to the upstream now? An admitted call must end in record_* or release()."""
        now = self._clock.now()
        if self._state is BreakerState.OPEN:
            if now < self._opened_at + self._cooldown:
                return False
            self._move(BreakerState.HALF_OPEN, "cooldown_elapsed", now)
        if self._state is BreakerState.HALF_OPEN:
            if self._probes_in_flight + self._probe_successes >= self.config.half_open_probes:
                return False
            self._probes_in_flight += 1
        return True

    def record_success(self) -> None:
        now = self._clock.now()
        if self._state is BreakerState.CLOSED:
            self._consecutive = 0
            self._window.add(now, failed=False)
        elif self._state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._probes_in_flight -= 1
            self._probe_successes += 1
            if self._probe_successes >= self.config.half_open_probes:
                self._cooldown = self.config.cooldown_s
                self._move(BreakerState.CLOSED, "probes_succeeded", now)

    def record_failure(self) -> None:
        now = self._clock.now()
        if self._state is BreakerState.CLOSED:
            self._consecutive += 1
            self._window.add(now, failed=True)
            if self._consecutive >= self.config.consecutive_failures:
                self._open("consecutive_failures", now)
                return
            ok, failed = self._window.counts(now)
            total = ok + failed
            if total >= self.config.min_requests and failed / total >= self.config.failure_rate:
                self._open("failure_rate", now)
        elif self._state is BreakerState.HALF_OPEN:
            self._cooldown = min(self._cooldown * self.config.cooldown_multiplier, self.config.cooldown_max_s)
            self._open("probe_failed", now)

    def release(self) -> None:
        """An admitted call ended without a result (e.g. cancelled): free its probe slot."""
        if self._state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._probes_in_flight -= 1

    def retry_after_s(self) -> float:
        """Seconds until an OPEN breaker lets a probe through; 0 when not OPEN."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._cooldown - self._clock.now())

    def drain_transitions(self) -> list[Transition]:
        """Hand over (and forget) the state changes since the last drain, oldest first."""
        out = list(self._transitions)
        self._transitions.clear()
        return out

    def _open(self, reason: str, now: float) -> None:
        self._opened_at = now
        self._move(BreakerState.OPEN, reason, now)

    def _move(self, new: BreakerState, reason: str, now: float) -> None:
        old, self._state = self._state, new
        self._consecutive = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        if new is not BreakerState.HALF_OPEN:
            self._window.clear()
        if len(self._transitions) == self._transitions.maxlen:
            self.dropped_transitions += 1
        self._transitions.append(Transition(self.name, old, new, reason, now, self._cooldown))
