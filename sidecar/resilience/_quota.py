"""The sidecar's side of global tokens-per-minute quotas (Doorman-style leases).

One ``GlobalQuota`` per resource (provider + model). The collector grants this sidecar a
share of the global limit (``apply_grant``); the share is enforced with a local
``TokenBucket`` refilling at ``grant / 60`` tokens per second and holding ``burst_s``
seconds' worth (small, so the sum over sidecars tracks the global limit closely). A grant
stays fresh for ``grant_ttl_s``; without a fresh one the bucket falls back to
``safe_share_tpm``. A call larger than the bucket is admitted once the bucket is full,
which puts the bucket in debt, so big calls are slowed, never starved.

``admit(tokens, priority)`` reserves the estimate (prompt estimate + max_tokens):

- REFUSE (with ``retry_after_s``): a priority call the bucket cannot cover now.
- QUEUE (with a ``retry_after_s`` hint): a non-priority call that the bucket cannot cover,
  or that would lift *utilisation* above ``priority_threshold``. Utilisation is of the
  *global* limit: the tokens this sidecar admitted (as reconciled) over the last
  ``window_s`` seconds, per minute, over its part of the grant's ``limit_tpm`` (the limit
  times its grant over all the grants the record hands out). Summed over sidecars,
  non-priority work stays within 80 % of the global limit, the rest is kept for priority
  work; a lone sidecar far below the limit uses its whole grant. On the safe share (no
  fresh grant, so no global view) it is the use of the local share.
  The async layer holds queued calls in a ``BoundedWaitQueue`` and asks
  again with ``requeued=True``; a full queue or a timeout becomes a refusal.
- ADMIT otherwise; settle later with ``reconcile(reserved, actual)``.

``admit_shadow(tokens, max_share)`` is for mirrored (shadow) calls, which no user waits for:
ADMIT only when the bucket covers them now, the non-priority room has them (so above the
priority threshold they are the first refused, before any user call waits) and the shadow
calls of the window stay within ``max_share`` of this sidecar's part of the limit; REFUSE
otherwise, never QUEUE. Their unmet demand is not reported: the collector grants for users.

``usage_report()`` gives ``(used_tpm, demand_tpm)`` over the window, per minute; demand is
used plus unmet (refused and queued tokens, a requeued call counted once), so the
collector sees what the sidecar would have used.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from outrider.clock import Clock, SystemClock

from ._buckets import TokenBucket

DEFAULT_PRIORITY_THRESHOLD = 0.8
DEFAULT_WINDOW_S = 60.0
DEFAULT_BURST_S = 6.0
MAX_RETRY_AFTER_S = 60.0
WINDOW_SLOTS = 12
PER_MINUTE = 60.0

T = TypeVar("T")


class Verdict(enum.Enum):
    ADMIT = "admit"
    QUEUE = "queue"
    REFUSE = "refuse"


@dataclass(frozen=True)
class QuotaDecision:
    verdict: Verdict
    retry_after_s: float = 0.0
    utilisation: float = 0.0  # before this call, see the module docstring


class _RollingSum:
    """A sum over the last window_s seconds in WINDOW_SLOTS fixed slots (bounded memory)."""

    def __init__(self, window_s: float) -> None:
        self._width = window_s / WINDOW_SLOTS
        self._slots: deque[list[float]] = deque()  # [slot index, amount]

    def add(self, now: float, amount: float) -> None:
        idx = math.floor(now / self._width)
        self._trim(idx)
        if self._slots and self._slots[-1][0] >= idx:
            self._slots[-1][1] += amount  # same slot (or the clock stepped back)
        else:
            self._slots.append([idx, amount])

    def total(self, now: float) -> float:
        self._trim(math.floor(now / self._width))
        return max(0.0, sum(s[1] for s in self._slots))

    def until_oldest_leaves(self, now: float) -> float:
        self._trim(math.floor(now / self._width))
        if not self._slots:
            return 0.0
        return max(0.0, (self._slots[0][0] + WINDOW_SLOTS) * self._width - now)

    def _trim(self, idx: int) -> None:
        while self._slots and (self._slots[0][0] <= idx - WINDOW_SLOTS or len(self._slots) > WINDOW_SLOTS):
            self._slots.popleft()


class GlobalQuota:
    def __init__(
        self,
        resource: str,
        safe_share_tpm: float,
        grant_ttl_s: float,
        clock: Clock | None = None,
        *,
        priority_threshold: float = DEFAULT_PRIORITY_THRESHOLD,
        window_s: float = DEFAULT_WINDOW_S,
        burst_s: float = DEFAULT_BURST_S,
    ) -> None:
        if not (math.isfinite(safe_share_tpm) and safe_share_tpm >= 0):
            raise ValueError("safe_share_tpm must be a finite number >= 0")
        if not grant_ttl_s > 0:
            raise ValueError("grant_ttl_s must be > 0")
        if not 0.0 < priority_threshold <= 1.0:
            raise ValueError("priority_threshold must be in (0, 1]")
        if not window_s > 0:
            raise ValueError("window_s must be > 0")
        if not burst_s > 0:
            raise ValueError("burst_s must be > 0")
        self.resource = resource
        self.safe_share_tpm = float(safe_share_tpm)
        self.grant_ttl_s = grant_ttl_s
        self.priority_threshold = priority_threshold
        self._clock: Clock = clock or SystemClock()
        self._window_s = window_s
        self._burst_s = burst_s
        self._tpm = self.safe_share_tpm
        self._bucket = TokenBucket(*self._shape(self._tpm), self._clock)
        self._expires_at: float | None = None  # of the grant in force; None: on the safe share
        self._generation: int | None = None
        self._global: tuple[float, float] | None = None  # (limit, all grants), tpm, of the grant
        self._used = _RollingSum(window_s)
        self._unmet = _RollingSum(window_s)
        self._shadow_used = _RollingSum(window_s)

    @property
    def tpm(self) -> float:
        """The share in force: the fresh grant, else the safe share."""
        self._refresh(self._clock.now())
        return self._tpm

    @property
    def has_fresh_grant(self) -> bool:
        self._refresh(self._clock.now())
        return self._expires_at is not None

    def new_writer(self) -> None:
        """A grant from a newer writer epoch follows: its generations start afresh."""
        self._generation = None

    def apply_grant(
        self,
        tpm: float,
        *,
        issued_at: float | None = None,
        generation: int | None = None,
        limit_tpm: float | None = None,
        granted_tpm: float | None = None,
    ) -> bool:
        """Adopt a grant from the collector; False (ignored) if stale or out of order.

        ``limit_tpm`` (the global limit) and ``granted_tpm`` (every sidecar's grant, ours
        included; default ours) make the priority threshold a share of the global limit,
        see the module docstring."""
        if not (math.isfinite(tpm) and tpm >= 0):
            raise ValueError("tpm must be a finite number >= 0")
        if limit_tpm is not None and not (math.isfinite(limit_tpm) and limit_tpm > 0):
            raise ValueError("limit_tpm must be a finite number > 0")
        if granted_tpm is not None and not (math.isfinite(granted_tpm) and granted_tpm >= tpm):
            raise ValueError("granted_tpm must be a finite number >= tpm")
        now = self._clock.now()
        if generation is not None and self._generation is not None and generation < self._generation:
            return False
        expires_at = (now if issued_at is None else min(issued_at, now)) + self.grant_ttl_s
        if expires_at <= now:
            return False  # e.g. replayed from the control topic's history
        if generation is not None:
            self._generation = generation
        self._expires_at = expires_at
        total = float(tpm if granted_tpm is None else granted_tpm)
        self._global = None if limit_tpm is None else (float(limit_tpm), total)
        self._set_tpm(float(tpm))
        return True

    def utilisation(self) -> float:
        now = self._clock.now()
        self._refresh(now)
        return self._utilisation(self._used.total(now))

    def admit(self, estimated_tokens: float, priority: bool, *, requeued: bool = False) -> QuotaDecision:
        """Decide for one call; ``requeued=True`` when asking again for a queued call."""
        if not (math.isfinite(estimated_tokens) and estimated_tokens >= 0):
            raise ValueError("estimated_tokens must be a finite number >= 0")
        now = self._clock.now()
        self._refresh(now)
        used = self._used.total(now)
        util = self._utilisation(used)
        need = min(estimated_tokens, self._bucket.capacity)
        wait = self._bucket.time_until(need) if self._bucket.capacity > 0 else math.inf
        non_priority_room = self._non_priority_room()
        if wait == 0 and (priority or used + estimated_tokens <= non_priority_room):
            self._bucket.force_take(estimated_tokens)
            self._used.add(now, estimated_tokens)
            if requeued:
                self._unmet.add(now, -estimated_tokens)  # it was counted as unmet when queued
            return QuotaDecision(Verdict.ADMIT, 0.0, util)
        if not requeued:
            self._unmet.add(now, estimated_tokens)
        if priority:
            return QuotaDecision(Verdict.REFUSE, min(wait, MAX_RETRY_AFTER_S), util)
        hint = wait if wait > 0 else self._used.until_oldest_leaves(now)
        return QuotaDecision(Verdict.QUEUE, min(hint, MAX_RETRY_AFTER_S), util)

    def admit_shadow(self, estimated_tokens: float, max_share: float) -> QuotaDecision:
        """Decide for one mirrored call (see the module docstring): ADMIT or REFUSE."""
        if not (math.isfinite(estimated_tokens) and estimated_tokens >= 0):
            raise ValueError("estimated_tokens must be a finite number >= 0")
        now = self._clock.now()
        self._refresh(now)
        used = self._used.total(now)
        util = self._utilisation(used)
        part = self._part_tpm() * self._window_s / PER_MINUTE
        fits = (
            estimated_tokens <= self._bucket.capacity
            and self._bucket.time_until(estimated_tokens) == 0
            and used + estimated_tokens <= self._non_priority_room()
            and self._shadow_used.total(now) + estimated_tokens <= max_share * part
        )
        if not fits:
            return QuotaDecision(Verdict.REFUSE, 0.0, util)
        self._bucket.force_take(estimated_tokens)
        self._used.add(now, estimated_tokens)
        self._shadow_used.add(now, estimated_tokens)
        return QuotaDecision(Verdict.ADMIT, 0.0, util)

    def reconcile(self, reserved: float, actual: float, *, shadow: bool = False) -> None:
        """Settle an admitted call: refund the unused part, or charge the excess."""
        if not (math.isfinite(reserved) and reserved >= 0):
            raise ValueError("reserved must be a finite number >= 0")
        if not (math.isfinite(actual) and actual >= 0):
            raise ValueError("actual must be a finite number >= 0")
        now = self._clock.now()
        if actual < reserved:
            self._bucket.refund(reserved - actual)
        else:
            self._bucket.force_take(actual - reserved)
        self._used.add(now, actual - reserved)
        if shadow:
            self._shadow_used.add(now, actual - reserved)

    def usage_report(self) -> tuple[float, float]:
        """(used_tpm, demand_tpm) over the window, as per-minute rates."""
        now = self._clock.now()
        scale = PER_MINUTE / self._window_s
        used = self._used.total(now) * scale
        return used, used + self._unmet.total(now) * scale

    def _non_priority_room(self) -> float:
        """Tokens non-priority work may have used over the window (the bucket bounds the rest)."""
        return self.priority_threshold * self._part_tpm() * self._window_s / PER_MINUTE

    def _part_tpm(self) -> float:
        """The global limit's part that is ours (our grant's share of all grants), else our share."""
        if self._global is None:
            return self._tpm
        limit, total = self._global
        return limit if total <= 0 else limit * self._tpm / total

    def _utilisation(self, used_in_window: float) -> float:
        share = self._part_tpm() * self._window_s / PER_MINUTE
        if share <= 0:
            return 0.0 if used_in_window <= 0 else math.inf
        return used_in_window / share

    def _refresh(self, now: float) -> None:
        if self._expires_at is not None and now >= self._expires_at:
            self._expires_at = None
            self._global = None
            self._set_tpm(self.safe_share_tpm)

    def _set_tpm(self, tpm: float) -> None:
        self._tpm = tpm
        self._bucket.set_rate(*self._shape(tpm))

    def _shape(self, tpm: float) -> tuple[float, float]:
        return tpm * self._burst_s / PER_MINUTE, tpm / PER_MINUTE


class BoundedWaitQueue(Generic[T]):
    """FIFO of waiting calls, at most ``max_len``, each for at most ``timeout_s``.

    Call ``expire(now)`` before ``pop_ready`` so a timed-out call is never admitted.
    """

    def __init__(self, max_len: int, timeout_s: float) -> None:
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        self.max_len = max_len
        self.timeout_s = timeout_s
        self._items: deque[tuple[float, T]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: T, now: float) -> bool:
        """Enqueue; False when full (the caller refuses the call)."""
        if len(self._items) >= self.max_len:
            return False
        self._items.append((now + self.timeout_s, item))
        return True

    def expire(self, now: float) -> list[T]:
        """Remove and return the items whose timeout has passed, in queue order."""
        gone = [item for deadline, item in self._items if deadline <= now]
        if gone:
            self._items = deque((d, i) for d, i in self._items if d > now)
        return gone

    def pop_ready(self, ready: Callable[[T], bool]) -> list[T]:
        """Pop from the head while ``ready(head)`` is true (e.g. it tried and got admitted);
        stops at the first false, so order is kept and nobody jumps the queue."""
        out: list[T] = []
        while self._items and ready(self._items[0][1]):
            out.append(self._items.popleft()[1])
        return out

    def remove(self, item: T) -> bool:
        """Drop a waiting item (its caller went away); False if it was not there."""
        for entry in self._items:
            if entry[1] is item:
                self._items.remove(entry)
                return True
        return False

    def next_deadline(self) -> float | None:
        return min((d for d, _ in self._items), default=None)
