"""Rolling windows: buckets by event time, eviction, sketch accuracy, duplicate dropping."""

from __future__ import annotations

import math
import random

import pytest

from collector import Ingest, RollingWindows, WindowStats
from outrider.v1 import common_pb2, events_pb2

T0 = 1_700_000_000.0
STABLE, CANARY = common_pb2.ROLE_STABLE, common_pb2.ROLE_CANARY


def call_event(
    event_id: str,
    t: float,
    latency_ms: float = 10.0,
    error: bool = False,
    role: int = STABLE,
    version: str = "v1",
    agent: str = "bot",
) -> events_pb2.Event:
    event = events_pb2.Event(
        event_id=event_id, time_unix_nano=int(t * 1e9), agent=agent, version_id=version, role=role
    )  # type: ignore[arg-type]
    event.call.latency_ms = latency_ms
    event.call.outcome = events_pb2.OUTCOME_ERROR if error else events_pb2.OUTCOME_OK
    return event


def test_counts_requests_errors_by_series() -> None:
    w = RollingWindows(bucket_s=5, retention_s=300)
    for i in range(10):
        assert w.add_event(call_event(f"s{i}", T0 + i, error=i < 2), T0 + 10) is Ingest.COUNTED
    for i in range(4):
        w.add_event(call_event(f"c{i}", T0 + i, error=True, role=CANARY, version="v2"), T0 + 10)
    stable = w.snapshot("bot", "v1", STABLE, 60, T0 + 10)
    assert (stable.requests, stable.errors) == (10, 2)
    assert stable.error_rate == pytest.approx(0.2)
    canary = w.snapshot("bot", "v2", CANARY, 60, T0 + 10)
    assert (canary.requests, canary.errors, canary.error_rate) == (4, 4, 1.0)
    assert w.snapshot("bot", "v2", STABLE, 60, T0 + 10) == WindowStats()
    assert w.snapshot("other", "v1", None, 60, T0 + 10) == WindowStats()


def test_tool_errors_count_and_usage_reports_are_ignored() -> None:
    w = RollingWindows()
    tool = events_pb2.Event(
        event_id="t", time_unix_nano=int(T0 * 1e9), agent="bot", version_id="v1", role=STABLE
    )
    tool.tool.outcome = events_pb2.OUTCOME_ERROR
    tool.tool.latency_ms = 3
    tool.tool.error_class = "tool_5xx"
    usage = events_pb2.Event(event_id="u", time_unix_nano=int(T0 * 1e9), agent="bot", sidecar_id="s")
    usage.usage.resource = "openai/gpt-4o"
    assert w.add_event(tool, T0) is Ingest.COUNTED
    assert w.add_event(usage, T0) is Ingest.IGNORED
    stats = w.snapshot("bot", "v1", None, 60, T0)
    assert (stats.requests, stats.errors, stats.error_rate) == (1, 1, 1.0)
    assert stats.latency_p95_ms == pytest.approx(3, rel=0.02)
    assert stats.latency_p50_ms == pytest.approx(3, rel=0.02)
    assert (stats.tool_calls, stats.tool_failures, stats.tool_failure_rate) == (1, 1, 1.0)
    assert stats.errors_by_class == {"tool": 1} and stats.calls == 0


def test_window_covers_only_recent_buckets() -> None:
    w = RollingWindows(bucket_s=5, retention_s=600)
    w.add_event(call_event("old", T0), T0)
    w.add_event(call_event("new", T0 + 100), T0 + 100)
    assert w.snapshot("bot", "v1", STABLE, 30, T0 + 100).requests == 1
    assert w.snapshot("bot", "v1", STABLE, 200, T0 + 100).requests == 2
    assert w.snapshot("bot", "v1", None, 200, T0 + 100).requests == 2


def test_eviction_bounds_memory_and_drops_stale_events() -> None:
    w = RollingWindows(bucket_s=1, retention_s=10)
    for i in range(100):
        w.add_event(call_event(f"e{i}", T0 + i), T0 + i)
        w.evict(T0 + i)
        assert w.bucket_count() <= 12
    assert w.snapshot("bot", "v1", STABLE, 1000, T0 + 99).requests <= 11
    assert w.add_event(call_event("ancient", T0), T0 + 99) is Ingest.STALE
    w.evict(T0 + 1000)
    assert w.series() == [] and w.bucket_count() == 0


def test_future_events_are_counted_now() -> None:
    w = RollingWindows(bucket_s=5, retention_s=60)
    assert w.add_event(call_event("future", T0 + 3600), T0) is Ingest.COUNTED
    assert w.snapshot("bot", "v1", STABLE, 5, T0).requests == 1


def test_events_without_time_use_now() -> None:
    w = RollingWindows(bucket_s=5, retention_s=60)
    event = call_event("no-time", 0)
    event.time_unix_nano = 0
    assert w.add_event(event, T0) is Ingest.COUNTED
    assert w.snapshot("bot", "v1", STABLE, 5, T0).requests == 1


def test_duplicates_are_dropped_until_they_expire() -> None:
    w = RollingWindows(bucket_s=5, retention_s=60, dedupe_size=1000)
    assert w.add_event(call_event("dup", T0), T0) is Ingest.COUNTED
    assert w.add_event(call_event("dup", T0), T0 + 1) is Ingest.DUPLICATE
    assert w.snapshot("bot", "v1", STABLE, 60, T0 + 1).requests == 1
    # long after, the id is forgotten, but the event is also too old to count
    assert w.add_event(call_event("dup", T0), T0 + 1000) is Ingest.STALE


def test_dedupe_cache_is_bounded() -> None:
    w = RollingWindows(dedupe_size=10)
    for i in range(50):
        w.add_event(call_event(f"e{i}", T0), T0)
    assert w.add_event(call_event("e49", T0), T0) is Ingest.DUPLICATE
    assert w.add_event(call_event("e0", T0), T0) is Ingest.COUNTED  # forgotten: the cache holds 10


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quantiles_within_sketch_accuracy(seed: int) -> None:
    rng = random.Random(seed)
    w = RollingWindows(bucket_s=1, retention_s=120)
    latencies = [rng.lognormvariate(4, 1) for _ in range(3000)]
    for i, latency in enumerate(latencies):
        t = T0 + i * 0.02  # spread over 60 buckets, merged by the snapshot
        w.add_event(call_event(f"e{i}", t, latency_ms=latency), t)
    stats = w.snapshot("bot", "v1", STABLE, 100, T0 + 61)
    ordered = sorted(latencies)
    for q, got in ((0.95, stats.latency_p95_ms), (0.5, stats.latency_p50_ms)):
        exact = ordered[math.floor(q * (len(ordered) - 1))]
        assert got == pytest.approx(exact, rel=0.011)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="bucket_s"):
        RollingWindows(bucket_s=0)
    with pytest.raises(ValueError, match="dedupe_size"):
        RollingWindows(dedupe_size=0)
