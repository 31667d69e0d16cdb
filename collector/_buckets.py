"""One time bucket of one series: the counts, sums and DDSketches a window merges, and what
each event body adds to it (see `collector._windows` for the list). Split from the windows so
the per-event fold stays small and can be read in one place."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ddsketch import DDSketch
from ddsketch.pb.ddsketch_pb2 import DDSketch as DDSketchMessage
from ddsketch.pb.proto import DDSketchProto

from collector._errclass import QUOTA, classify
from outrider.v1 import events_pb2, sidecar_pb2

RELATIVE_ACCURACY = 0.01
MAX_SESSIONS_PER_BUCKET = 10_000  # beyond this a bucket's cost still counts, not per session


def _sketch() -> DDSketch:
    return DDSketch(RELATIVE_ACCURACY)


# `DDSketch.add(value)` for the sketches above, inlined: it is the hottest call of ingest (two
# per LLM call), and the library's own path is five Python calls deep (add, key, _log_gamma,
# store.add, _get_index). The same arithmetic in the same order, so the result is the same
# sketch bit for bit (tests/unit/test_collector_sketch_add.py holds it to `DDSketch.add`);
# it reads ddsketch 3's internals, hence the pin below 4 in pyproject.
_MAPPING = _sketch()._mapping
_MULTIPLIER, _KEY_OFFSET, _MIN_POSSIBLE = _MAPPING._multiplier, _MAPPING._offset, _MAPPING.min_possible
_ceil, _log = math.ceil, math.log


def sketch_add(sketch: DDSketch, value: float) -> None:
    """`sketch.add(value)` for a finite value >= 0 (a latency) of a sketch made by `_sketch`."""
    if value > _MIN_POSSIBLE:
        key = int(_ceil(_log(value, 2) * _MULTIPLIER) + _KEY_OFFSET)
        store = sketch._store
        if store.min_key <= key <= store.max_key:  # within the bins: what store.add comes to
            store.bins[key - store.offset] += 1.0
            store.count += 1.0
        else:
            store.add(key, 1.0)  # grows the bins
    else:
        sketch._zero_count += 1.0
    sketch._count += 1.0
    sketch._sum += value
    if value < sketch._min:
        sketch._min = value
    if value > sketch._max:
        sketch._max = value


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


def _apply(bucket: _Bucket, event: events_pb2.Event, body: str) -> None:
    # the hot path of ingest: each field is read once, into a local
    if body == "call":
        call = event.call
        bucket.requests += 1
        bucket.calls += 1
        if call.outcome == _ERROR:
            error_class = classify(call.error_class)
            bucket.error(error_class)
            bucket.quota_refusals += error_class == QUOTA
        latency = call.latency_ms
        if _isfinite(latency):
            sketch_add(bucket.sketch, latency if latency > 0.0 else 0.0)  # max(latency, 0), finite
        ttft = call.time_to_first_token_ms
        if ttft > 0 and _isfinite(ttft):
            sketch_add(bucket.ttft, ttft)
        tokens = call.input_tokens
        if tokens > 0:
            bucket.input_tokens += tokens
        tokens = call.output_tokens
        if tokens > 0:
            bucket.output_tokens += tokens
        tokens = call.cached_input_tokens
        if tokens > 0:
            bucket.cached_tokens += tokens
        cost = call.cost_usd
        if not (cost > 0 and _isfinite(cost)):
            cost = 0.0
        bucket.cost_usd += cost
        session = event.session_id
        if session:
            costs = bucket.session_cost
            if session in costs:
                costs[session] += cost
            elif len(costs) < MAX_SESSIONS_PER_BUCKET:
                costs[session] = 0.0 + cost
        if call.fallback_tier > 0:
            bucket.fallbacks += 1
        if call.degraded:
            bucket.degraded += 1
        wait = call.quota_wait_ms
        if wait > 0 and _isfinite(wait):
            bucket.quota_waits += 1
            bucket.quota_wait_ms += wait
    elif body == "tool":
        tool = event.tool
        bucket.requests += 1
        bucket.tool_calls += 1
        if tool.outcome == _ERROR:
            bucket.error(classify(tool.error_class, tool=True))
            bucket.tool_failures += 1
        latency = tool.latency_ms
        if _isfinite(latency):
            sketch_add(bucket.sketch, latency if latency > 0.0 else 0.0)
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
