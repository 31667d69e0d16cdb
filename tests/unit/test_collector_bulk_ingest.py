"""The ingest step's batch paths give exactly what adding the same events one by one gives:
the windows (duplicates within a batch too), the totals, the sightings and the whole
`Ingestor.apply` with garbage and forged records mixed in."""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import outrider
from collector import RollingWindows
from collector import _ingest as ingest_module
from collector import _sightings as sightings_module
from collector import _totals as totals_module
from collector._checkpoint import gc_paused
from collector._flag_metrics import FlagMetrics
from collector._ingest import Ingestor
from collector._metrics import CollectorMetrics
from collector._sightings import VersionSightings
from collector._totals import AgentTotals
from collector._windows import Ingest
from outrider.v1 import common_pb2, events_pb2, sidecar_pb2

T0 = 1_700_000_000.0
NOW = T0 + 100


def _event(i: int, body: str, *, agent: str = "", t: float = T0, event_id: str = "") -> events_pb2.Event:
    e = events_pb2.Event(
        event_id=event_id or f"e{i}",
        time_unix_nano=int(t * 1e9),
        agent=agent or ("bot", "helper", "triage")[i % 3],
        version_id=("v1", "v2", "")[i % 3],
        role=(common_pb2.ROLE_STABLE, common_pb2.ROLE_CANARY, common_pb2.ROLE_SHADOW)[i % 3],
        session_id=f"s{i % 4}" if i % 5 else "",
        sidecar_id=f"sc{i % 2}",
        sequence=i + 1 + (i // 7) * 2,  # jumps: gaps to report
    )
    if body == "call":
        c = e.call
        c.model = ("gpt-4o", "gpt-4o-mini", "claude")[i // 3 % 3] if i % 4 else ""
        c.latency_ms = (120.0, -5.0, math.nan, 0.0, math.inf)[i % 5]
        c.time_to_first_token_ms = (30.0, 0.0, math.inf)[i % 3]
        c.input_tokens, c.output_tokens, c.cached_input_tokens = 100 + i, (-3, 20)[i % 2], i % 3
        c.cost_usd = (0.01, math.nan, -1.0, math.inf, 0.0)[i % 5]
        c.outcome = events_pb2.OUTCOME_ERROR if i % 3 == 0 else events_pb2.OUTCOME_OK
        c.error_class = ("provider_5xx", "quota", "timeout", "")[i % 4]
        c.fallback_tier, c.degraded = i % 2, i % 3 == 1
        c.quota_wait_ms = (0.0, 40.0, math.nan)[i % 3]
    elif body == "tool":
        e.tool.tool_name, e.tool.latency_ms = "lookup", (8.0, math.nan, -1.0)[i % 3]
        e.tool.outcome = events_pb2.OUTCOME_ERROR if i % 2 else events_pb2.OUTCOME_OK
        e.tool.error_class = ("tool_5xx", "")[i % 2]
        e.tool.intercepted = i % 4 == 0
    elif body == "feedback":
        e.feedback.kind = (sidecar_pb2.FEEDBACK_KIND_THUMBS_UP, sidecar_pb2.FEEDBACK_KIND_SCORE)[i % 2]
        e.feedback.score = 0.5 * (i % 2)
    elif body == "safety":
        e.safety.category, e.safety.count, e.safety.action = "pii", i % 3, "redact"
    elif body == "breaker":
        e.breaker.upstream, e.breaker.new_state = "provider:openai", "open"
    elif body == "judge":
        e.judge.kind, e.judge.parsed, e.judge.score, e.judge.cost_usd = "single", True, 0.7, 0.001
    elif body == "shadow":
        e.shadow.tools_agree = i % 2 == 0
    elif body == "usage":
        e.usage.resource = "openai/gpt-4o"
    elif body == "versions_report":
        e.versions_report.versions.add(version_id="v9", model="gpt-4o", label="blue")
    return e


BODIES = ("call", "call", "call", "tool", "feedback", "safety", "breaker", "judge", "shadow", "usage")


def mixed(n: int = 120) -> list[events_pb2.Event]:
    """Every counted body, an ignored one, redeliveries within the batch, a stale and a future event."""
    events = [_event(i, BODIES[i % len(BODIES)]) for i in range(n)]
    events += [events[3], events[10], events[3]]  # redelivered, twice for one
    events.append(_event(n, "call", t=T0 - 10_000))  # older than any window
    events.append(_event(n + 1, "call", t=NOW + 3600))  # a sidecar clock ahead
    events.append(_event(n + 2, "tool", t=T0 + 7))  # another bucket
    return events


def pairs(events: list[events_pb2.Event]) -> list[tuple[events_pb2.Event, str | None]]:
    return [(e, e.WhichOneof("body")) for e in events]


def test_windows_batch_equals_one_by_one() -> None:
    one, batch = RollingWindows(bucket_s=5, retention_s=900), RollingWindows(bucket_s=5, retention_s=900)
    events = mixed()
    singles = [one.add_event(e, NOW) for e in events]
    assert batch.add_events(pairs(events), NOW) == singles
    assert singles.count(Ingest.DUPLICATE) == 3 and Ingest.STALE in singles and Ingest.IGNORED in singles
    assert batch.to_state() == one.to_state()
    for agent, version, role in one.series():
        assert batch.snapshot(agent, version, role, 900, NOW) == one.snapshot(agent, version, role, 900, NOW)


def test_windows_batch_drops_what_earlier_batches_saw_and_respects_the_id_cap() -> None:
    one = RollingWindows(bucket_s=5, retention_s=900, dedupe_size=7)
    batch = RollingWindows(bucket_s=5, retention_s=900, dedupe_size=7)
    events = [_event(i, "call") for i in range(12)]
    again = [events[0], events[11], events[6]]  # e0 was pushed out by the cap; e11 and e6 were not
    singles = [one.add_event(e, NOW) for e in [*events, *again]]
    results = batch.add_events(pairs(events), NOW) + batch.add_events(pairs(again), NOW + 1)
    assert results[: len(events)] == singles[: len(events)]
    assert results[len(events) :] == [Ingest.COUNTED, Ingest.DUPLICATE, Ingest.DUPLICATE]
    assert singles[len(events) :] == [Ingest.COUNTED, Ingest.DUPLICATE, Ingest.DUPLICATE]


def test_windows_batch_of_ignored_events_leaves_the_clock() -> None:
    w = RollingWindows(bucket_s=5, retention_s=900)
    assert w.add_events(pairs([_event(9, "usage")]), NOW) == [Ingest.IGNORED]
    assert w.to_state()["now"] == 0.0


def _counted(events: list[events_pb2.Event]) -> list[tuple[events_pb2.Event, str | None]]:
    w = RollingWindows(bucket_s=5, retention_s=900)
    return [
        (e, b)
        for (e, b), r in zip(pairs(events), w.add_events(pairs(events), NOW), strict=True)
        if r in (Ingest.COUNTED, Ingest.STALE)
    ]


def test_totals_batch_equals_one_by_one() -> None:
    counted = _counted(mixed())
    one, batch = AgentTotals(), AgentTotals()
    for e, _ in counted:
        one.add_event(e)
    batch.add_events(counted[:50])
    batch.add_events(counted[50:])
    assert batch.to_state() == one.to_state()
    assert [list(m.samples) for m in batch.families()] == [list(m.samples) for m in one.families()]


def test_totals_batch_of_roles_unknown_to_this_build_shares_their_series() -> None:
    # two roles this build has no name for both read "unknown": one series, nothing lost
    events = [_event(i, ("call", "tool")[i % 2], agent="bot") for i in range(12)]
    for i, e in enumerate(events):
        e.version_id, e.role = "v1", (77, 78, common_pb2.ROLE_CANARY)[i % 3]
    one, batch = AgentTotals(), AgentTotals()
    for e in events:
        one.add_event(e)
    batch.add_events(pairs(events))
    assert batch.to_state() == one.to_state()
    unknown = ("bot", "v1", "unknown")
    assert batch.value("outrider_requests_total", unknown) == 8.0
    assert batch.value("outrider_llm_calls_total", unknown) == 4.0
    assert batch.value("outrider_tool_calls_total", unknown) == 4.0


def test_totals_batch_near_the_series_cap_refuses_the_same_label_sets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(totals_module, "MAX_SERIES", 6)
    counted = _counted([_event(i, "call", agent=f"agent-{i}") for i in range(20)])
    one, batch = AgentTotals(), AgentTotals()
    for e, _ in counted:
        one.add_event(e)
    batch.add_events(counted)
    assert batch.to_state() == one.to_state()
    assert batch.dropped_series == one.dropped_series > 0


def _sightings(s: VersionSightings) -> list[Any]:
    return [(key, seen.last_seen, seen.models) for key, seen in s._seen.items()]


def test_sightings_batch_equals_one_by_one() -> None:
    events = mixed()
    events.insert(0, _event(1, "call", t=T0 + 50))  # a newer time first, then older ones of its version
    one, batch = VersionSightings(), VersionSightings()
    for e in events:
        one.observe(e, NOW)
    batch.observe_all(pairs(events)[:40], NOW)
    batch.observe_all(pairs(events)[40:], NOW)
    assert _sightings(batch) == _sightings(one)
    assert any(len(models) > 1 for _, _, models in _sightings(one))


def test_sightings_batch_past_the_cap_evicts_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sightings_module, "MAX_VERSIONS", 4)
    events = [_event(i, "call", agent=f"agent-{i % 6}") for i in range(30)]
    one, batch = VersionSightings(), VersionSightings()
    for e in events:
        one.observe(e, NOW)
    batch.observe_all(pairs(events), NOW)
    assert _sightings(batch) == _sightings(one)


@dataclass
class Record:
    """The fields of an aiokafka ConsumerRecord the ingest step reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any


def records(events: list[events_pb2.Event]) -> list[Record]:
    """The events as records, with garbage and forged ones in between."""
    out: list[Record] = []
    bodyless = events_pb2.Event(event_id="x", agent="bot").SerializeToString()
    garbage: list[tuple[bytes | None, Any]] = [
        (b"\xff\x00 not a protobuf", ()),
        (None, ()),
        (bodyless, ()),
        (b"{}", (("content-type", b"application/json"),)),  # a foreign record
        (b"x", [("content-type", b"application/json")]),  # headers in a list: not hashable
        (_event(0, "call").SerializeToString(), (("outrider-schema", b"9"),)),  # a newer schema
        (_event(0, "call").SerializeToString(), (("outrider-schema", b"one"),)),  # a forged header
    ]
    for i, e in enumerate(events):
        value, headers = outrider.encode_event(e)
        out.append(Record(outrider.EVENTS_TOPIC, i % 2, 0, e.agent.encode(), value, tuple(headers)))
        if i % 9 == 4:
            value, headers = garbage[(i // 9) % len(garbage)]
            out.append(Record(outrider.EVENTS_TOPIC, i % 2, 0, b"k", value, headers))
    for offset, r in enumerate(out):
        r.offset = offset
    return out


def _ingestor() -> Ingestor:
    return Ingestor(RollingWindows(bucket_s=5, retention_s=900, dedupe_size=1000), CollectorMetrics())


def _samples(metrics: CollectorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def assert_same(a: Ingestor, b: Ingestor) -> None:
    assert a.positions == b.positions and a.applied == b.applied
    assert a.windows.to_state() == b.windows.to_state()
    assert a.metrics.totals.to_state() == b.metrics.totals.to_state()
    assert a.gaps.to_state() == b.gaps.to_state()
    assert _sightings(a.sightings) == _sightings(b.sightings)
    assert _samples(a.metrics) == _samples(b.metrics)


def test_ingest_of_a_batch_equals_record_by_record() -> None:
    recs = records(mixed())
    one, batch = _ingestor(), _ingestor()
    dead_one = [d for r in recs for d in one.apply([r], NOW)]
    dead_batch = batch.apply(recs, NOW)
    assert dead_batch == dead_one
    assert len(dead_one) == sum(1 for r in recs if r.key == b"k") > 5
    assert_same(batch, one)
    # the same records again (a redelivery after a restart from an older checkpoint): all duplicates
    before = batch.windows.to_state()["series"]
    batch.apply(recs, NOW)
    assert batch.windows.to_state()["series"] == before


def test_rows_read_off_the_wire_give_what_upb_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """`collector._fastrow` against `OUTRIDER_NATIVE=0`: the same state, the same dead letters."""
    events = mixed()
    for e in events[::7]:  # feature flags: those events are left to upb
        e.flags["new-prompt"] = e.sequence % 2 == 0
    recs = records(events)
    native, upb = _ingestor(), _ingestor()
    native.flag_metrics, upb.flag_metrics = FlagMetrics(), FlagMetrics()
    if ingest_module.fast_row is None:
        pytest.skip("collector._fastrow is off or not built")
    dead_native = native.apply(recs, NOW)
    monkeypatch.setattr(ingest_module, "fast_row", None)
    assert upb.apply(recs, NOW) == dead_native
    assert_same(native, upb)
    flags = [native.flag_metrics.arms(agent, "new-prompt") for agent in ("bot", "helper", "triage")]
    assert flags == [upb.flag_metrics.arms(agent, "new-prompt") for agent in ("bot", "helper", "triage")]
    assert any(arm.requests for arms in flags for arm in arms)


def test_undecodable_records_give_the_same_reason_every_time() -> None:
    forged = Record(outrider.EVENTS_TOPIC, 0, 0, b"k", b"x", (("outrider-schema", b"7"),))
    reasons = {d.reason for _ in range(3) for d in _ingestor().apply([forged], NOW)}
    assert reasons == {"schema version 7 is newer than 1"}
    with pytest.raises(outrider.DecodeError, match="unexpected content type"):
        outrider.decode_event(b"x", [("content-type", b"text/plain")])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(BODIES), st.integers(0, 30), st.floats(-2000, 200)), max_size=60),
    st.lists(st.integers(1, 20), min_size=1, max_size=8),
)
def test_any_split_into_batches_gives_the_same_state(
    items: list[tuple[str, int, float]], sizes: list[int]
) -> None:
    """Whatever the events (ids repeat: redeliveries) and however they are cut into batches."""
    events = [
        _event(ident, body, t=T0 + offset, event_id=f"id{ident}-{body}") for body, ident, offset in items
    ]
    recs = records(events)
    one, batch = _ingestor(), _ingestor()
    for r in recs:
        one.apply([r], NOW)
    start, k = 0, 0
    while start < len(recs):
        size = sizes[k % len(sizes)]
        batch.apply(recs[start : start + size], NOW)
        start, k = start + size, k + 1
    assert_same(batch, one)


def test_a_log_that_goes_back_within_a_batch_is_told_as_one_by_one() -> None:
    recs = records([_event(i, "call") for i in range(6)])
    for r, offset in zip(recs, (5, 6, 2, 3, 9, 1), strict=False):
        r.partition, r.offset = 0, offset
    one, batch = _ingestor(), _ingestor()
    for r in recs:
        one.apply([r], NOW)
    batch.apply(recs, NOW)
    assert_same(batch, one)
    resets = batch.metrics.registry.get_sample_value("outrider_collector_offset_resets_total")
    assert resets == 2


def test_a_partial_state_keeps_the_ids_of_the_chosen_agents_in_order() -> None:
    w = RollingWindows(bucket_s=5, retention_s=900)
    w.add_events(pairs(mixed()), NOW)
    asked: list[str] = []

    def chosen(agent: str) -> bool:
        asked.append(agent)
        return agent != "helper"

    everything = w.to_state()
    assert w.to_state(chosen)["seen"] == [
        [key, t] for key, t in everything["seen"] if not key.startswith("helper\x00")
    ]
    # once per series and once per agent for the ids, not once per id
    assert set(asked) == {"bot", "helper", "triage"} and len(asked) == len(w.series()) + 3 < len(
        everything["seen"]
    )


def test_gc_paused_restores_the_collector_as_it_was() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
