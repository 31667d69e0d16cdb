"""One time bucket of one series: the counts, sums and DDSketches a window merges, and what
each event body adds to it (see `collector._windows` for the list). Split from the windows so
the per-event fold stays small and can be read in one place."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ddsketch import DDSketch
from ddsketch.pb.ddsketch_pb2 import DDSketch as DDSketchMessage
from ddsketch.pb.proto import DDSketchProto

from collector._errclass import QUOTA, classify
from collector._native import native
from collector._rows import Row, event_of
from outrider.v1 import events_pb2, sidecar_pb2

RELATIVE_ACCURACY = 0.01
MAX_SESSIONS_PER_BUCKET = 10_000  # beyond this a bucket's cost still counts, not per session


def _sketch() -> DDSketch:
    return DDSketch(RELATIVE_ACCURACY)


# `DDSketch.add(value)` for the sketches above, inlined (`sketch_add_many`): it is the hottest
# call of ingest (two per LLM call), and the library's own path is five Python calls deep (add,
# key, _log_gamma, store.add, _get_index). The same arithmetic in the same order, so the result
# is the same sketch bit for bit (tests/unit/test_collector_sketch_add.py holds it to
# `DDSketch.add`); it reads ddsketch 3's internals, hence the pin below 4 in pyproject.
_MAPPING = _sketch()._mapping
_MULTIPLIER, _KEY_OFFSET, _MIN_POSSIBLE = _MAPPING._multiplier, _MAPPING._offset, _MAPPING.min_possible
_ceil, _log = math.ceil, math.log
# `math.log(value, 2)`, as ddsketch takes it, is `log(value) / log(2)` computed just so in C;
# dividing by the same `log(2)` here gives the same float and saves a log per value
_LN2 = math.log(2)
# `int(ceil(x) + offset)` is `ceil(x) + offset` in ints while the offset is a whole number (it
# is 0 for this mapping), which saves a float round trip per value
_WHOLE_KEY_OFFSET = int(_KEY_OFFSET)
if _WHOLE_KEY_OFFSET != _KEY_OFFSET:
    raise RuntimeError(f"ddsketch's key offset {_KEY_OFFSET!r} is not a whole number; see _buckets.py")


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


@dataclass(slots=True)  # slots: faster attribute updates, on every event
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


_ERROR = events_pb2.OUTCOME_ERROR
_isfinite = math.isfinite


_fastsketch = native("_fastsketch")  # the loop below in C (collector/_fastsketch.c), or None


def sketch_add_many(sketch: DDSketch, values: list[float]) -> None:
    """`sketch.add(value)` of each value in order (finite, >= 0: latencies), for a sketch made by
    `_sketch`, with the same result: the bins are read once and again only when a value grows
    them; the counts (whole numbers) are added at the end, the sum value by value, in order."""
    if not values:
        return
    store = sketch._store
    binned = zeros = 0
    total = sketch._sum
    if _fastsketch is not None:
        add_run, start = _fastsketch.add_run, 0
        while True:
            start, total, more, zero, key = add_run(
                values, start, store.bins, store.offset, store.min_key, store.max_key, total,
                _MULTIPLIER, _LN2, _MIN_POSSIBLE, _WHOLE_KEY_OFFSET,
            )  # fmt: skip
            binned, zeros = binned + more, zeros + zero
            if start >= len(values):
                break
            store.add(key, 1.0)  # grows the bins
            start += 1
    else:
        bins, offset, low, high = store.bins, store.offset, store.min_key, store.max_key
        for value in values:
            total += value
            if value > _MIN_POSSIBLE:
                key = _ceil(_log(value) / _LN2 * _MULTIPLIER) + _WHOLE_KEY_OFFSET
                if low <= key <= high:
                    bins[key - offset] += 1.0
                    binned += 1
                else:
                    store.add(key, 1.0)  # grows the bins: read them again
                    bins, offset, low, high = store.bins, store.offset, store.min_key, store.max_key
            else:
                zeros += 1
    store.count += float(binned)
    sketch._zero_count += float(zeros)
    sketch._count += float(len(values))
    sketch._sum = total
    if (least := min(values)) < sketch._min:
        sketch._min = least
    if (most := max(values)) > sketch._max:
        sketch._max = most


def fold_rows(bucket: _Bucket, rows: Sequence[Row]) -> None:
    """Add each row (`collector._rows`) to the bucket, in order.

    The hot path of ingest. Calls and tool calls are summed in locals and written once; the
    latencies go to the sketches in bulk. The floats are added one by one in the rows' order,
    so the bucket ends as it would event by event. The other bodies (few) take `_apply`."""
    calls = tools = tool_failures = input_tokens = output_tokens = cached = 0
    fallbacks = degraded = waits = refusals = 0
    cost_usd, waited = bucket.cost_usd, bucket.quota_wait_ms
    costs = bucket.session_cost
    latencies: list[float] = []
    ttfts: list[float] = []
    for body, _, _, _, _, _, session, event, detail in rows:
        if body == "call":
            outcome, error_class, latency, ttft, inputs, outputs, cached_in, cost, tier, worse, wait, _ = (
                detail  # type: ignore[misc]
            )
            calls += 1
            if outcome == _ERROR:
                error_class = classify(error_class)
                bucket.error(error_class)
                refusals += error_class == QUOTA
            if _isfinite(latency):
                latencies.append(latency if latency > 0.0 else 0.0)  # max(latency, 0), finite
            if ttft > 0 and _isfinite(ttft):
                ttfts.append(ttft)
            if inputs > 0:
                input_tokens += inputs
            if outputs > 0:
                output_tokens += outputs
            if cached_in > 0:
                cached += cached_in
            if not (cost > 0 and _isfinite(cost)):
                cost = 0.0
            cost_usd += cost
            if session:
                if session in costs:
                    costs[session] += cost
                elif len(costs) < MAX_SESSIONS_PER_BUCKET:
                    costs[session] = 0.0 + cost
            if tier > 0:
                fallbacks += 1
            if worse:
                degraded += 1
            if wait > 0 and _isfinite(wait):
                waits += 1
                waited += wait
        elif body == "tool":
            outcome, error_class, latency, _ = detail  # type: ignore[misc]
            tools += 1
            if outcome == _ERROR:
                bucket.error(classify(error_class, tool=True))
                tool_failures += 1
            if _isfinite(latency):
                latencies.append(latency if latency > 0.0 else 0.0)
        else:
            _apply(bucket, event_of(event), body)
    bucket.requests += calls + tools
    bucket.calls += calls
    bucket.tool_calls += tools
    bucket.tool_failures += tool_failures
    bucket.input_tokens += input_tokens
    bucket.output_tokens += output_tokens
    bucket.cached_tokens += cached
    bucket.fallbacks += fallbacks
    bucket.degraded += degraded
    bucket.quota_waits += waits
    bucket.quota_refusals += refusals
    bucket.cost_usd, bucket.quota_wait_ms = cost_usd, waited
    sketch_add_many(bucket.sketch, latencies)
    sketch_add_many(bucket.ttft, ttfts)


def _apply(bucket: _Bucket, event: events_pb2.Event, body: str | None) -> None:
    """What an event other than a call or a tool call adds (those: `fold_rows`)."""
    if body == "feedback":
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
