"""Token buckets, alone and keyed by user or tenant, with an injected clock.

A ``TokenBucket`` holds at most ``capacity`` tokens and refills continuously at
``refill_per_s``; refilling is lazy (computed from the clock on each call), so an idle
bucket costs nothing. ``try_take`` is all or nothing. ``force_take`` may drive the level
below zero: that is a debt, paid back by refill before anything else is admitted, used
when a call's actual usage exceeds what it reserved. ``set_rate`` keeps the current
level, clipped to the new capacity, so a bigger grant never hands out a burst.

Over any interval of length T a bucket admits (via ``try_take``) at most
``capacity + refill_per_s * T`` tokens.

A ``KeyedLimiter`` keeps a pair of buckets per key (tokens per minute, requests per
minute; each bucket holds one minute's worth) in a ``cachetools.TTLCache``: bounded to
``max_keys`` entries, and a key untouched for ``idle_ttl_s`` is forgotten. Because a
bucket refills fully in 60 s, forgetting a key idle for >= 60 s gives nothing away; only
eviction by size pressure can (documented trade-off for bounded memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from cachetools import TTLCache

from outrider.clock import Clock, SystemClock

DEFAULT_MAX_KEYS = 100_000
DEFAULT_IDLE_TTL_S = 600.0
FULL_REFILL_S = 60.0  # per-minute limits: a bucket holds, and refills in, one minute

Limit = Literal["tokens", "requests"]


class TokenBucket:
    def __init__(self, capacity: float, refill_per_s: float, clock: Clock | None = None) -> None:
        _check_rate(capacity, refill_per_s)
        self._clock: Clock = clock or SystemClock()
        self._capacity = float(capacity)
        self._rate = float(refill_per_s)
        self._level = self._capacity  # a new bucket starts full
        self._last = self._clock.now()

    @property
    def capacity(self) -> float:
        return self._capacity

    @property
    def refill_per_s(self) -> float:
        return self._rate

    @property
    def level(self) -> float:
        """Tokens available now (negative while in debt)."""
        self._refill()
        return self._level

    def try_take(self, n: float) -> bool:
        _check_amount(n)
        self._refill()
        if n > self._level:
            return False
        self._level -= n
        return True

    def time_until(self, n: float) -> float:
        """Seconds until try_take(n) would succeed (0 now; inf if it never can)."""
        _check_amount(n)
        self._refill()
        if n <= self._level:
            return 0.0
        if n > self._capacity or self._rate == 0:
            return math.inf
        return (n - self._level) / self._rate

    def refund(self, n: float) -> None:
        _check_amount(n)
        self._refill()
        self._level = min(self._capacity, self._level + n)

    def force_take(self, n: float) -> None:
        _check_amount(n)
        self._refill()
        self._level -= n

    def set_rate(self, capacity: float, refill_per_s: float) -> None:
        _check_rate(capacity, refill_per_s)
        self._refill()  # what accrued so far accrued at the old rate
        self._capacity = float(capacity)
        self._rate = float(refill_per_s)
        self._level = min(self._level, self._capacity)

    def _refill(self) -> None:
        now = self._clock.now()
        if now > self._last:
            self._level = min(self._capacity, self._level + (now - self._last) * self._rate)
            self._last = now


def _check_rate(capacity: float, refill_per_s: float) -> None:
    if not (math.isfinite(capacity) and capacity >= 0):
        raise ValueError("capacity must be a finite number >= 0")
    if not (math.isfinite(refill_per_s) and refill_per_s >= 0):
        raise ValueError("refill_per_s must be a finite number >= 0")


def _check_amount(n: float) -> None:
    if not (math.isfinite(n) and n >= 0):
        raise ValueError("n (tokens) must be a finite number >= 0")


@dataclass(frozen=True)
class Admission:
    ok: bool
    retry_after_s: float = 0.0  # inf: the call exceeds a per-minute limit and can never pass
    which: Limit | None = None  # the limit that refused


class KeyedLimiter:
    """Per-key (user or tenant) tokens-per-minute and requests-per-minute buckets.

    ``None`` for a limit means that dimension is unlimited.
    """

    def __init__(
        self,
        tokens_per_min: float | None,
        requests_per_min: float | None,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        idle_ttl_s: float = DEFAULT_IDLE_TTL_S,
        clock: Clock | None = None,
    ) -> None:
        for field, value in (("tokens_per_min", tokens_per_min), ("requests_per_min", requests_per_min)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{field} must be > 0 (or None for no limit)")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        if not idle_ttl_s >= FULL_REFILL_S:
            raise ValueError(f"idle_ttl_s must be >= {FULL_REFILL_S:g} (a bucket's full refill time)")
        self._clock: Clock = clock or SystemClock()
        self._tpm = tokens_per_min
        self._rpm = requests_per_min
        self._buckets: TTLCache[str, tuple[TokenBucket | None, TokenBucket | None]] = TTLCache(
            maxsize=max_keys, ttl=idle_ttl_s, timer=self._clock.now
        )

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, key: str, tokens: float) -> Admission:
        """Reserve ``tokens`` and one request for ``key``, both or neither."""
        _check_amount(tokens)
        pair = self._pair(key)
        self._buckets[key] = pair  # re-insert: a TTLCache entry's life runs from its last set
        tok, req = pair
        wait_tok = tok.time_until(tokens) if tok is not None else 0.0
        wait_req = req.time_until(1) if req is not None else 0.0
        if wait_tok > 0 or wait_req > 0:
            which: Limit = "tokens" if wait_tok >= wait_req else "requests"
            return Admission(False, max(wait_tok, wait_req), which)
        if tok is not None:
            tok.force_take(tokens)
        if req is not None:
            req.force_take(1)
        return Admission(True)

    def reconcile(self, key: str, reserved: float, actual: float) -> None:
        """Settle a call's reservation against its actual token usage."""
        _check_amount(reserved)
        _check_amount(actual)
        pair = self._buckets.get(key)
        if pair is None or pair[0] is None:
            return  # forgotten meanwhile: nothing to settle
        if actual < reserved:
            pair[0].refund(reserved - actual)
        else:
            pair[0].force_take(actual - reserved)

    def _pair(self, key: str) -> tuple[TokenBucket | None, TokenBucket | None]:
        pair = self._buckets.get(key)
        if pair is None:
            pair = (self._bucket(self._tpm), self._bucket(self._rpm))
        return pair

    def _bucket(self, per_min: float | None) -> TokenBucket | None:
        if per_min is None:
            return None
        return TokenBucket(per_min, per_min / FULL_REFILL_S, self._clock)
