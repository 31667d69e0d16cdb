"""Rolling windows of request counts, errors and latency per (agent, version, role).

Pure and clock-driven: the caller passes `now`. Time is cut into fixed buckets (by the
event's own time); each bucket holds counts and a DDSketch, and a window merges the
buckets it covers. Buckets older than the retention horizon are evicted, so memory is
bounded by the number of live series times `retention_s / bucket_s`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from cachetools import TTLCache
from ddsketch import DDSketch

from outrider.v1 import events_pb2

RELATIVE_ACCURACY = 0.01
DEFAULT_BUCKET_S = 5.0
DEFAULT_RETENTION_S = 900.0
DEFAULT_DEDUPE_SIZE = 200_000

SeriesKey = tuple[str, str, int]  # (agent, version_id, role)


@dataclass(frozen=True)
class WindowStats:
    """What a window holds. Latencies are 0 when there are no requests."""

    requests: int = 0
    errors: int = 0
    error_rate: float = 0.0
    latency_p95_ms: float = 0.0
    latency_p50_ms: float = 0.0


class Ingest(enum.Enum):
    """What happened to one event."""

    COUNTED = "counted"
    DUPLICATE = "duplicate"
    STALE = "stale"  # older than the retention horizon
    IGNORED = "ignored"  # a body that carries no request (feedback)


@dataclass
class _Bucket:
    requests: int = 0
    errors: int = 0
    sketch: DDSketch = field(default_factory=lambda: DDSketch(RELATIVE_ACCURACY))


class RollingWindows:
    """Time-bucketed request, error and latency series, with duplicate-event dropping."""

    def __init__(
        self,
        bucket_s: float = DEFAULT_BUCKET_S,
        retention_s: float = DEFAULT_RETENTION_S,
        dedupe_size: int = DEFAULT_DEDUPE_SIZE,
    ) -> None:
        if bucket_s <= 0 or retention_s < bucket_s:
            raise ValueError("need bucket_s > 0 and retention_s >= bucket_s")
        if dedupe_size < 1:
            raise ValueError("dedupe_size must be at least 1")
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self._series: dict[SeriesKey, dict[int, _Bucket]] = {}
        self._now = 0.0
        # an id is remembered as long as a redelivered copy could still land in a window
        self._seen: TTLCache[str, bool] = TTLCache(
            maxsize=dedupe_size, ttl=retention_s * 2, timer=lambda: self._now
        )

    def _index(self, t: float) -> int:
        return math.floor(t / self.bucket_s)

    def add_event(self, event: events_pb2.Event, now: float) -> Ingest:
        """Count one decoded event; duplicates (by event_id) and feedback are not counted."""
        body = event.WhichOneof("body")
        if body == "call":
            latency, error = event.call.latency_ms, event.call.outcome == events_pb2.OUTCOME_ERROR
        elif body == "tool":
            latency, error = event.tool.latency_ms, event.tool.outcome == events_pb2.OUTCOME_ERROR
        else:
            return Ingest.IGNORED
        self._advance(now)
        if event.event_id in self._seen:
            return Ingest.DUPLICATE
        self._seen[event.event_id] = True
        t = event.time_unix_nano / 1e9 if event.time_unix_nano > 0 else now
        return self.record(event.agent, event.version_id, int(event.role), t, latency, error, now)

    def record(
        self, agent: str, version_id: str, role: int, t: float, latency_ms: float, error: bool, now: float
    ) -> Ingest:
        """Count one request that happened at `t` (no dedupe)."""
        self._advance(now)
        # a sidecar clock ahead of ours: count it now rather than in a bucket no window reaches yet
        t = min(t, now)
        if t < now - self.retention_s:
            return Ingest.STALE
        buckets = self._series.setdefault((agent, version_id, role), {})
        bucket = buckets.get(index := self._index(t))
        if bucket is None:
            bucket = buckets[index] = _Bucket()
        bucket.requests += 1
        bucket.errors += int(error)
        if math.isfinite(latency_ms):
            bucket.sketch.add(max(latency_ms, 0.0))
        return Ingest.COUNTED

    def _advance(self, now: float) -> None:
        # TTLCache's timer must not go backwards
        self._now = max(self._now, now)

    def evict(self, now: float) -> int:
        """Drop buckets older than the retention horizon; the number dropped."""
        self._advance(now)
        oldest = self._index(now - self.retention_s)
        dropped = 0
        for key in list(self._series):
            buckets = self._series[key]
            for index in [i for i in buckets if i < oldest]:
                del buckets[index]
                dropped += 1
            if not buckets:
                del self._series[key]
        self._seen.expire()
        return dropped

    def series(self) -> list[SeriesKey]:
        return list(self._series)

    def bucket_count(self) -> int:
        return sum(len(b) for b in self._series.values())

    def snapshot(
        self, agent: str, version_id: str, role: int | None, window_s: float, now: float
    ) -> WindowStats:
        """Merge the buckets of the last `window_s` seconds (all roles when `role` is None).

        The window is aligned to buckets: it covers every bucket that overlaps it, so it can
        reach back up to one bucket further than `window_s`, never further than retention.
        """
        first = self._index(now - min(window_s, self.retention_s))
        last = self._index(now)
        requests = errors = 0
        merged = DDSketch(RELATIVE_ACCURACY)
        for (a, v, r), buckets in self._series.items():
            if a != agent or v != version_id or (role is not None and r != role):
                continue
            for index, bucket in buckets.items():
                if first <= index <= last:
                    requests += bucket.requests
                    errors += bucket.errors
                    merged.merge(bucket.sketch)
        if requests == 0:
            return WindowStats()
        return WindowStats(
            requests=requests,
            errors=errors,
            error_rate=errors / requests,
            latency_p95_ms=_quantile(merged, 0.95),
            latency_p50_ms=_quantile(merged, 0.5),
        )


def _quantile(sketch: DDSketch, q: float) -> float:
    value = sketch.get_quantile_value(q) if sketch.count else None
    return float(value) if value is not None else 0.0
