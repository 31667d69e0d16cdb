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

import base64
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ddsketch import DDSketch
from ddsketch.pb.ddsketch_pb2 import DDSketch as DDSketchMessage
from ddsketch.pb.proto import DDSketchProto

from collector._dedupe import SeenIds
from collector._errclass import QUOTA, classify
from outrider.v1 import events_pb2, sidecar_pb2

RELATIVE_ACCURACY = 0.01
DEFAULT_BUCKET_S = 5.0
DEFAULT_RETENTION_S = 900.0
DEFAULT_DEDUPE_SIZE = 200_000
MAX_SESSIONS_PER_BUCKET = 10_000  # beyond this a bucket's cost still counts, not per session
STATE_FORMAT = 1

SeriesKey = tuple[str, str, int]  # (agent, version_id, role)
AgentFilter = Callable[[str], bool]  # which agents a partial state covers (one partition's)
_ID_SEP = "\x00"  # seen ids are "<agent>\x00<event id>", so a partition's ids can be told apart


def _seen_key(agent: str, event_id: str) -> str:
    return f"{agent}{_ID_SEP}{event_id}"


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


def _sketch() -> DDSketch:
    return DDSketch(RELATIVE_ACCURACY)


def _dump_sketch(sketch: DDSketch) -> str:
    message = DDSketchProto.to_proto(sketch)  # type: ignore[no-untyped-call]
    return base64.b64encode(message.SerializeToString()).decode("ascii")


def _load_sketch(text: str) -> DDSketch:
    message = DDSketchMessage()
    message.ParseFromString(base64.b64decode(text))
    return DDSketchProto.from_proto(message)  # type: ignore[no-untyped-call,no-any-return]


# counters every bucket has, by name (all ints but the sums of floats)
_INT_FIELDS = (
    "requests",
    "errors",
    "calls",
    "tool_calls",
    "tool_failures",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "fallbacks",
    "degraded",
    "quota_waits",
    "quota_refusals",
    "thumbs_up",
    "thumbs_down",
    "task_successes",
    "task_failures",
    "scores",
    "breaker_changes",
    "judge_scores",
)
_FLOAT_FIELDS = ("cost_usd", "quota_wait_ms", "score_sum", "judge_score_sum")


@dataclass
class _Bucket:
    requests: int = 0
    errors: int = 0
    calls: int = 0
    tool_calls: int = 0
    tool_failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    fallbacks: int = 0
    degraded: int = 0
    quota_waits: int = 0
    quota_refusals: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    task_successes: int = 0
    task_failures: int = 0
    scores: int = 0
    breaker_changes: int = 0
    judge_scores: int = 0
    cost_usd: float = 0.0
    quota_wait_ms: float = 0.0
    score_sum: float = 0.0
    judge_score_sum: float = 0.0
    errors_by_class: dict[str, int] = field(default_factory=dict)
    safety: dict[str, int] = field(default_factory=dict)
    session_cost: dict[str, float] = field(default_factory=dict)
    sketch: DDSketch = field(default_factory=_sketch)  # request latency, ms
    ttft: DDSketch = field(default_factory=_sketch)  # time to first token, ms

    def error(self, error_class: str) -> None:
        self.errors += 1
        self.errors_by_class[error_class] = self.errors_by_class.get(error_class, 0) + 1

    def to_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name) for name in _INT_FIELDS + _FLOAT_FIELDS}
        state.update(
            errors_by_class=self.errors_by_class,
            safety=self.safety,
            session_cost=self.session_cost,
            sketch=_dump_sketch(self.sketch),
            ttft=_dump_sketch(self.ttft),
        )
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _Bucket:
        bucket = cls()
        for name in _INT_FIELDS:
            setattr(bucket, name, int(state.get(name, 0)))
        for name in _FLOAT_FIELDS:
            setattr(bucket, name, float(state.get(name, 0.0)))
        bucket.errors_by_class = {str(k): int(v) for k, v in state.get("errors_by_class", {}).items()}
        bucket.safety = {str(k): int(v) for k, v in state.get("safety", {}).items()}
        bucket.session_cost = {str(k): float(v) for k, v in state.get("session_cost", {}).items()}
        bucket.sketch = _load_sketch(state["sketch"])
        bucket.ttft = _load_sketch(state["ttft"])
        return bucket


def _apply(bucket: _Bucket, event: events_pb2.Event, body: str) -> None:
    if body == "call":
        call = event.call
        bucket.requests += 1
        bucket.calls += 1
        if call.outcome == events_pb2.OUTCOME_ERROR:
            error_class = classify(call.error_class)
            bucket.error(error_class)
            bucket.quota_refusals += error_class == QUOTA
        if math.isfinite(call.latency_ms):
            bucket.sketch.add(max(call.latency_ms, 0.0))
        if call.time_to_first_token_ms > 0 and math.isfinite(call.time_to_first_token_ms):
            bucket.ttft.add(call.time_to_first_token_ms)
        bucket.input_tokens += max(call.input_tokens, 0)
        bucket.output_tokens += max(call.output_tokens, 0)
        bucket.cached_tokens += max(call.cached_input_tokens, 0)
        cost = call.cost_usd if math.isfinite(call.cost_usd) and call.cost_usd > 0 else 0.0
        bucket.cost_usd += cost
        if event.session_id and (
            event.session_id in bucket.session_cost or len(bucket.session_cost) < MAX_SESSIONS_PER_BUCKET
        ):
            bucket.session_cost[event.session_id] = bucket.session_cost.get(event.session_id, 0.0) + cost
        bucket.fallbacks += call.fallback_tier > 0
        bucket.degraded += call.degraded
        if call.quota_wait_ms > 0 and math.isfinite(call.quota_wait_ms):
            bucket.quota_waits += 1
            bucket.quota_wait_ms += call.quota_wait_ms
    elif body == "tool":
        tool = event.tool
        bucket.requests += 1
        bucket.tool_calls += 1
        if tool.outcome == events_pb2.OUTCOME_ERROR:
            bucket.error(classify(tool.error_class, tool=True))
            bucket.tool_failures += 1
        if math.isfinite(tool.latency_ms):
            bucket.sketch.add(max(tool.latency_ms, 0.0))
    elif body == "feedback":
        kind, score = event.feedback.kind, event.feedback.score
        if kind == sidecar_pb2.FEEDBACK_KIND_THUMBS_UP:
            bucket.thumbs_up += 1
        elif kind == sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN:
            bucket.thumbs_down += 1
        elif kind == sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS:
            bucket.task_successes += 1
        elif kind == sidecar_pb2.FEEDBACK_KIND_TASK_FAILURE:
            bucket.task_failures += 1
        if (kind == sidecar_pb2.FEEDBACK_KIND_SCORE or score) and math.isfinite(score):
            bucket.scores += 1
            bucket.score_sum += score
    elif body == "safety":
        category = event.safety.category or "unknown"
        bucket.safety[category] = bucket.safety.get(category, 0) + max(event.safety.count, 1)
    elif body == "breaker":
        bucket.breaker_changes += 1
    elif body == "judge":
        judge = event.judge
        if judge.kind == "single" and judge.parsed and math.isfinite(judge.score):
            bucket.judge_scores += 1
            bucket.judge_score_sum += judge.score


_COUNTED_BODIES = frozenset({"call", "tool", "feedback", "safety", "breaker", "shadow", "judge"})


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
        body = event.WhichOneof("body")
        if body not in _COUNTED_BODIES:
            return Ingest.IGNORED
        self._advance(now)
        self._seen.expire(self._now)
        if not self._seen.add(_seen_key(event.agent, event.event_id), self._now):
            return Ingest.DUPLICATE
        t = event.time_unix_nano / 1e9 if event.time_unix_nano > 0 else now
        # a sidecar clock ahead of ours: count it now rather than in a bucket no window reaches yet
        t = min(t, now)
        if t < now - self.retention_s:
            return Ingest.STALE
        _apply(self._bucket((event.agent, event.version_id, int(event.role)), t), event, body)
        return Ingest.COUNTED

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
            "seen": self._seen.to_state(None if agents is None else lambda key: agents(_seen_agent(key))),
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


def _merge(acc: _Bucket, bucket: _Bucket, session_cost: dict[str, float]) -> None:
    for name in _INT_FIELDS + _FLOAT_FIELDS:
        setattr(acc, name, getattr(acc, name) + getattr(bucket, name))
    for key, count in bucket.errors_by_class.items():
        acc.errors_by_class[key] = acc.errors_by_class.get(key, 0) + count
    for key, count in bucket.safety.items():
        acc.safety[key] = acc.safety.get(key, 0) + count
    for session, cost in bucket.session_cost.items():
        session_cost[session] = session_cost.get(session, 0.0) + cost
    if bucket.sketch.count:
        acc.sketch.merge(bucket.sketch)
    if bucket.ttft.count:
        acc.ttft.merge(bucket.ttft)


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
