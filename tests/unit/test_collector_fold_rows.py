"""A bucket folded from rows in bulk (`fold_rows`) is the bucket a plain event-by-event fold
gives: every count, every float sum bit for bit, the errors by class in the same order, the
per-session cost with its cap, and both sketches. The reference below is written against the
event's fields and `DDSketch.add` directly, not against the rows, so it holds the bulk path
to what one event adds, for any mix of calls, tool calls and other bodies, however odd their
numbers (negative, zero, NaN, infinite)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import _buckets
from collector._buckets import MAX_SESSIONS_PER_BUCKET, _Bucket, fold_rows
from collector._errclass import QUOTA, classify
from collector._rows import heads, read_rows
from outrider.v1 import events_pb2, sidecar_pb2

odd_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 1e-300, 0.25, 120.0, 1e9]),
)
tokens = st.integers(-(2**40), 2**40)
error_classes = st.sampled_from(["", "provider_5xx", "quota", "rate_limited", "timeout", "tool_5xx", "guard"])
sessions = st.sampled_from(["", "s1", "s2", "s3"])


@st.composite
def events(draw: st.DrawFn) -> events_pb2.Event:
    e = events_pb2.Event(event_id="e", agent="bot", version_id="v1", session_id=draw(sessions))
    body = draw(st.sampled_from(["call", "call", "tool", "feedback", "safety", "breaker", "judge", "none"]))
    outcome = draw(st.sampled_from([events_pb2.OUTCOME_OK, events_pb2.OUTCOME_ERROR]))
    if body == "call":
        c = e.call
        c.outcome, c.error_class = outcome, draw(error_classes)
        c.latency_ms, c.time_to_first_token_ms = draw(odd_floats), draw(odd_floats)
        c.input_tokens, c.output_tokens, c.cached_input_tokens = draw(tokens), draw(tokens), draw(tokens)
        c.cost_usd, c.quota_wait_ms = draw(odd_floats), draw(odd_floats)
        c.fallback_tier, c.degraded = draw(st.integers(-2, 3)), draw(st.booleans())
    elif body == "tool":
        e.tool.outcome, e.tool.error_class = outcome, draw(error_classes)
        e.tool.latency_ms, e.tool.intercepted = draw(odd_floats), draw(st.booleans())
    elif body == "feedback":
        e.feedback.kind = draw(st.sampled_from(list(sidecar_pb2.FeedbackKind.values())))
        e.feedback.score = draw(odd_floats)
    elif body == "safety":
        e.safety.category, e.safety.count = draw(st.sampled_from(["", "pii"])), draw(st.integers(-1, 3))
    elif body == "breaker":
        e.breaker.new_state = "open"
    elif body == "judge":
        e.judge.kind, e.judge.parsed, e.judge.score = "single", draw(st.booleans()), draw(odd_floats)
    return e


def reference_fold(bucket: _Bucket, event: events_pb2.Event) -> None:
    """What one event adds, field by field (calls and tool calls; the rest as the bucket does)."""
    body = event.WhichOneof("body")
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
        cost = call.cost_usd if call.cost_usd > 0 and math.isfinite(call.cost_usd) else 0.0
        bucket.cost_usd += cost
        session = event.session_id
        if session and (session in bucket.session_cost or len(bucket.session_cost) < MAX_SESSIONS_PER_BUCKET):
            bucket.session_cost[session] = bucket.session_cost.get(session, 0.0) + cost
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
    else:
        _buckets._apply(bucket, event, body)


def _same(ours: _Bucket, theirs: _Bucket) -> None:
    a, b = ours.to_state(), theirs.to_state()
    assert list(a["errors_by_class"].items()) == list(b["errors_by_class"].items())
    assert a.keys() == b.keys()
    for key in a:  # floats compared by their bits: NaN == NaN, and -0.0 apart from 0.0
        if isinstance(a[key], float):
            assert math.copysign(1, a[key]) == math.copysign(1, b[key]) and (
                a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key]))
            ), key
        else:
            assert a[key] == b[key], key
    assert ours.sketch.count == theirs.sketch.count and ours.ttft.count == theirs.ttft.count


@settings(max_examples=300, deadline=None)
@given(st.lists(events(), max_size=60), st.lists(st.integers(1, 25), min_size=1, max_size=4))
def test_bulk_fold_is_the_event_by_event_fold(batch: list[events_pb2.Event], cuts: list[int]) -> None:
    ours, theirs = _Bucket(), _Bucket()
    rows = read_rows(heads((e, e.WhichOneof("body")) for e in batch))
    start, k = 0, 0
    while start < len(rows):  # folded in runs of the sizes drawn, as batches arrive
        size = cuts[k % len(cuts)]
        fold_rows(ours, rows[start : start + size])
        start, k = start + size, k + 1
    for event in batch:
        reference_fold(theirs, event)
    _same(ours, theirs)


def test_session_costs_stop_at_the_cap_but_the_bucket_cost_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_buckets, "MAX_SESSIONS_PER_BUCKET", 2)
    batch = []
    for i, session in enumerate(["a", "b", "c", "a", "d"]):
        e = events_pb2.Event(event_id=f"e{i}", session_id=session)
        e.call.cost_usd, e.call.latency_ms = 0.5, 10.0
        batch.append(e)
    bucket = _Bucket()
    fold_rows(bucket, read_rows(heads((e, "call") for e in batch)))
    assert bucket.session_cost == {"a": 1.0, "b": 0.5}
    assert bucket.cost_usd == 2.5 and bucket.calls == bucket.requests == 5
    assert bucket.sketch.count == 5
