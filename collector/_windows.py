"""Rolling windows of the gate metric set per (agent, version, role).

Pure and clock-driven: the caller passes `now`. Time is cut into fixed buckets (by the
event's own time); each bucket holds counts, sums and DDSketches (latency, time to first
token), and a window merges the buckets it covers. Buckets older than the retention
horizon are evicted, so memory is bounded by the number of live series times
`retention_s / bucket_s`. The whole state, duplicate ids included, round-trips through
`to_state` / `load_state` (plain JSON values) for checkpoints.

What each body adds to its bucket:
- call: a request (and an error by class), latency, TTFT, tokens, cost (per call and per
  session), fallback, degraded, quota wait or refusal;
- tool: a request and a tool call (and a failure by class), latency;
- feedback: thumbs up/down, task success/failure, score;
- safety: safety events by category; breaker: a state change;
- judge: a parsed "single" verdict on one answer of the series (pair verdicts and shadow
  records are counted once here, for the duplicates, and go to the shadow evidence).
Usage reports are not about a version and are left to the quota book.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ddsketch import DDSketch

from collector._buckets import _Bucket, _merge, fold_rows
from collector._dedupe import SeenIds
from collector._rows import Row, heads, read_rows
from outrider.v1 import events_pb2

DEFAULT_BUCKET_S = 5.0
DEFAULT_RETENTION_S = 900.0
DEFAULT_DEDUPE_SIZE = 200_000
STATE_FORMAT = 1

SeriesKey = tuple[str, str, int]  # (agent, version_id, role)
AgentFilter = Callable[[str], bool]  # which agents a partial state covers (one partition's)
_ID_SEP = "\x00"  # seen ids are "<agent>\x00<event id>", so a partition's ids can be told apart


def _seen_agent(key: str) -> str:
    return key.partition(_ID_SEP)[0]


@dataclass(frozen=True)
class WindowStats:
    """What a window holds. Quantiles are 0 when there is nothing to take them from; rates
    are 0 when their denominator is."""

    requests: int = 0  # LLM calls plus tool calls
    errors: int = 0
    error_rate: float = 0.0
    latency_p95_ms: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    errors_by_class: Mapping[str, int] = field(default_factory=dict)
    calls: int = 0  # LLM calls
    ttft_p50_ms: float = 0.0
    ttft_p95_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cost_per_call: float = 0.0
    sessions: int = 0  # distinct sessions with a call
    cost_per_session: float = 0.0  # mean
    cost_per_session_p50: float = 0.0  # median cost per task
    tool_calls: int = 0
    tool_failures: int = 0
    tool_failure_rate: float = 0.0
    fallbacks: int = 0
    fallback_rate: float = 0.0  # of calls
    degraded: int = 0
    degraded_rate: float = 0.0
    quota_waits: int = 0
    quota_wait_ms_mean: float = 0.0  # over the calls that waited
    quota_refusals: int = 0
    safety_events: int = 0
    safety_event_rate: float = 0.0  # per request
    safety_by_category: Mapping[str, int] = field(default_factory=dict)
    thumbs_up: int = 0
    thumbs_down: int = 0
    thumbs_up_rate: float = 0.0  # of thumbs given
    thumbs_down_rate: float = 0.0
    task_successes: int = 0
    task_failures: int = 0
    task_success_rate: float = 0.0
    scores: int = 0
    mean_score: float = 0.0
    breaker_changes: int = 0
    judge_scores: int = 0  # parsed judge verdicts on single answers
    judge_score: float = 0.0  # their mean

    @property
    def feedback_thumbs(self) -> int:
        return self.thumbs_up + self.thumbs_down


class Ingest(enum.Enum):
    """What happened to one event."""

    COUNTED = "counted"
    DUPLICATE = "duplicate"
    STALE = "stale"  # older than the retention horizon
    IGNORED = "ignored"  # a body that is not about a version (usage reports)


# a module constant is read faster than an enum member (Ingest.COUNTED), once per event
_COUNTED, _DUPLICATE, _STALE, _IGNORED = Ingest.COUNTED, Ingest.DUPLICATE, Ingest.STALE, Ingest.IGNORED
# the bodies about a version, which the windows count (the rest: `Ingest.IGNORED`)
COUNTED_BODIES = frozenset({"call", "tool", "feedback", "safety", "breaker", "shadow", "judge"})


class RollingWindows:
    """Time-bucketed gate metrics per series, with duplicate-event dropping."""

    def __init__(
        self,
        bucket_s: float = DEFAULT_BUCKET_S,
        retention_s: float = DEFAULT_RETENTION_S,
        dedupe_size: int = DEFAULT_DEDUPE_SIZE,
    ) -> None:
        if bucket_s <= 0 or retention_s < bucket_s:
            raise ValueError("need bucket_s > 0 and retention_s >= bucket_s")
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self._series: dict[SeriesKey, dict[int, _Bucket]] = {}
        self._now = 0.0
        # an id is remembered as long as a redelivered copy could still land in a window
        self._seen = SeenIds(dedupe_size, retention_s * 2)

    def _index(self, t: float) -> int:
        return math.floor(t / self.bucket_s)

    def _bucket(self, key: SeriesKey, t: float) -> _Bucket:
        buckets = self._series.setdefault(key, {})
        bucket = buckets.get(index := self._index(t))
        if bucket is None:
            bucket = buckets[index] = _Bucket()
        return bucket

    def add_event(self, event: events_pb2.Event, now: float) -> Ingest:
        """Count one decoded event once (duplicates by event_id are dropped)."""
        return self.add_events([(event, event.WhichOneof("body"))], now)[0]

    def add_events(self, events: Sequence[tuple[events_pb2.Event, str | None]], now: float) -> list[Ingest]:
        """`add_event` for each (event, its body) in order, at one `now`: what happened to each."""
        return self.add_rows(read_rows(heads(events)), now)

    def add_rows(self, rows: Sequence[Row], now: float) -> list[Ingest]:
        """`add_events` of the events as rows (`collector._rows`).

        The same as adding them one by one: the clock moves and old ids expire once (every
        event shares `now`, and an id seen at `now` cannot expire at `now`), duplicates are
        told in order, also within the batch. The rows counted are then folded per bucket,
        each bucket's in their order (buckets share nothing)."""
        results: list[Ingest] = []
        append, seen, bucket_s, floor = results.append, self._seen, self.bucket_s, math.floor
        horizon = now - self.retention_s
        groups: dict[tuple[str, str, int, int], list[Row]] = {}  # by series and bucket index
        buckets: list[tuple[_Bucket, list[Row]]] = []
        seen_at: float | None = None  # the clock, moved on at the first counted body
        for row in rows:
            body, agent, event_id, stamp, version, role, _, _, _ = row
            if body not in COUNTED_BODIES:
                append(_IGNORED)
                continue
            if seen_at is None:
                self._advance(now)
                seen_at = self._now
                seen.expire(seen_at)
            if not seen.add(agent + _ID_SEP + event_id, seen_at):
                append(_DUPLICATE)
                continue
            t = stamp / 1e9 if stamp > 0 else now
            if t > now:  # a sidecar clock ahead of ours: count it now, not in a bucket no window reaches yet
                t = now
            if t < horizon:
                append(_STALE)
                continue
            group = groups.get(where := (agent, version, role, floor(t / bucket_s)))
            if group is None:  # the bucket is made here, so buckets are made in the events' order
                group = groups[where] = []
                buckets.append((self._bucket((agent, version, role), t), group))
            group.append(row)
            append(_COUNTED)
        for bucket, group in buckets:
            fold_rows(bucket, group)
        return results

    def _advance(self, now: float) -> None:
        # the dedupe horizon must not go backwards
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
        self._seen.expire(self._now)
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
        acc = _Bucket()
        session_cost: dict[str, float] = {}
        for (a, v, r), buckets in self._series.items():
            if a != agent or v != version_id or (role is not None and r != role):
                continue
            for index, bucket in buckets.items():
                if first <= index <= last:
                    _merge(acc, bucket, session_cost)
        return _stats(acc, session_cost)

    def to_state(self, agents: AgentFilter | None = None) -> dict[str, Any]:
        """Everything (or the series and ids of `agents`), as plain JSON values (see `load_state`)."""
        return {
            "format": STATE_FORMAT,
            "bucket_s": self.bucket_s,
            "now": self._now,
            "series": [
                [agent, version, role, [[index, b.to_state()] for index, b in buckets.items()]]
                for (agent, version, role), buckets in self._series.items()
                if agents is None or agents(agent)
            ],
            "seen": (
                self._seen.to_state() if agents is None else self._seen.to_state_by_prefix(agents, _ID_SEP)
            ),
        }

    def load_state(self, state: Mapping[str, Any], agents: AgentFilter | None = None) -> None:
        """Replace everything with a `to_state` result; with `agents`, replace only what is about
        those agents (a partition taken over) and keep the rest. ValueError if it does not fit."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"window state format {state.get('format')!r}, expected {STATE_FORMAT}")
        if float(state["bucket_s"]) != self.bucket_s:
            raise ValueError(f"window state has bucket_s {state['bucket_s']}, configured {self.bucket_s}")
        series: dict[SeriesKey, dict[int, _Bucket]] = {}
        for agent, version, role, buckets in state["series"]:
            if agents is not None and not agents(str(agent)):
                continue
            series[(str(agent), str(version), int(role))] = {
                int(index): _Bucket.from_state(b) for index, b in buckets
            }
        seen = SeenIds(self._seen.maxsize, self._seen.ttl_s)
        seen.load_state(state["seen"])
        now = float(state["now"])
        # all parsed: only now replace anything, so a state that does not fit changes nothing
        if agents is None:
            self._series, self._seen, self._now = series, seen, now
            return
        self.forget(agents)
        self._series.update(series)
        self._seen.merge(seen, lambda key: agents(_seen_agent(key)))
        self._now = max(self._now, now)

    def forget(self, agents: AgentFilter) -> None:
        """Drop the series and seen ids of `agents` (a partition this replica no longer owns)."""
        for key in [k for k in self._series if agents(k[0])]:
            del self._series[key]
        self._seen.discard(lambda key: agents(_seen_agent(key)))


def _rate(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _stats(acc: _Bucket, session_cost: Mapping[str, float]) -> WindowStats:
    costs = sorted(session_cost.values())
    safety_events = sum(acc.safety.values())
    thumbs = acc.thumbs_up + acc.thumbs_down
    tasks = acc.task_successes + acc.task_failures
    return WindowStats(
        requests=acc.requests,
        errors=acc.errors,
        error_rate=_rate(acc.errors, acc.requests),
        latency_p95_ms=_quantile(acc.sketch, 0.95),
        latency_p50_ms=_quantile(acc.sketch, 0.5),
        latency_p99_ms=_quantile(acc.sketch, 0.99),
        errors_by_class=dict(acc.errors_by_class),
        calls=acc.calls,
        ttft_p50_ms=_quantile(acc.ttft, 0.5),
        ttft_p95_ms=_quantile(acc.ttft, 0.95),
        input_tokens=acc.input_tokens,
        output_tokens=acc.output_tokens,
        cost_usd=acc.cost_usd,
        cost_per_call=_rate(acc.cost_usd, acc.calls),
        sessions=len(costs),
        cost_per_session=_rate(sum(costs), len(costs)),
        cost_per_session_p50=_median(costs),
        tool_calls=acc.tool_calls,
        tool_failures=acc.tool_failures,
        tool_failure_rate=_rate(acc.tool_failures, acc.tool_calls),
        fallbacks=acc.fallbacks,
        fallback_rate=_rate(acc.fallbacks, acc.calls),
        degraded=acc.degraded,
        degraded_rate=_rate(acc.degraded, acc.calls),
        quota_waits=acc.quota_waits,
        quota_wait_ms_mean=_rate(acc.quota_wait_ms, acc.quota_waits),
        quota_refusals=acc.quota_refusals,
        safety_events=safety_events,
        safety_event_rate=_rate(safety_events, acc.requests),
        safety_by_category=dict(acc.safety),
        thumbs_up=acc.thumbs_up,
        thumbs_down=acc.thumbs_down,
        thumbs_up_rate=_rate(acc.thumbs_up, thumbs),
        thumbs_down_rate=_rate(acc.thumbs_down, thumbs),
        task_successes=acc.task_successes,
        task_failures=acc.task_failures,
        task_success_rate=_rate(acc.task_successes, tasks),
        scores=acc.scores,
        mean_score=_rate(acc.score_sum, acc.scores),
        breaker_changes=acc.breaker_changes,
        judge_scores=acc.judge_scores,
        judge_score=_rate(acc.judge_score_sum, acc.judge_scores),
    )


def _median(ordered: list[float]) -> float:
    if not ordered:
        return 0.0
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _quantile(sketch: DDSketch, q: float) -> float:
    value = sketch.get_quantile_value(q) if sketch.count else None
    return float(value) if value is not None else 0.0
