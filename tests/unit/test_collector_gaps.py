"""Gaps in each sidecar's event sequence numbers: what never arrived."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from collector._gaps import GapTracker
from collector._ingest import Ingestor
from collector._metrics import CollectorMetrics
from collector._windows import RollingWindows
from outrider.v1 import events_pb2


def test_gaps_count_what_never_arrived_once() -> None:
    gaps = GapTracker()
    assert gaps.observe("sc-1", "bot", 5) == 0  # the first sets the baseline
    assert gaps.observe("sc-1", "bot", 6) == 0
    assert gaps.observe("sc-1", "bot", 10) == 3
    assert gaps.observe("sc-1", "bot", 10) == 0  # a duplicate
    assert gaps.observe("sc-1", "bot", 8) == 0  # late: already counted
    assert gaps.observe("sc-2", "bot", 1) == 0
    assert gaps.observe("sc-2", "bot", 3) == 1
    assert gaps.observe("", "bot", 9) == 0 and gaps.observe("sc-3", "bot", 0) == 0
    assert gaps.missing_by_agent == {"bot": 4}
    restored = GapTracker()
    restored.load_state(gaps.to_state())
    assert restored.observe("sc-1", "bot", 11) == 0 and restored.observe("sc-1", "bot", 13) == 1
    assert restored.missing_by_agent == {"bot": 5}


def test_bounded_number_of_sidecars() -> None:
    gaps = GapTracker(max_sidecars=2)
    for name in ("a", "b", "c"):
        gaps.observe(name, "bot", 1)
    assert gaps.observe("a", "bot", 5) == 0  # forgotten: a new baseline


class _Record:
    def __init__(self, offset: int, event: events_pb2.Event) -> None:
        self.topic, self.partition, self.offset = "outrider.events", 0, offset
        self.key, self.value, self.headers = b"bot", event.SerializeToString(), []


def test_ingest_exposes_outrider_events_missing_total() -> None:
    metrics = CollectorMetrics()
    ingestor = Ingestor(RollingWindows(1.0, 60.0, 1000), metrics)
    records = []
    for offset, sequence in enumerate((1, 2, 7)):
        event = events_pb2.Event(
            event_id=f"e{sequence}", agent="bot", sidecar_id="sc-1", sequence=sequence, time_unix_nano=1
        )
        event.call.latency_ms = 5.0
        records.append(_Record(offset, event))
    ingestor.apply(records, now=1.0)
    value = metrics.registry.get_sample_value(
        "outrider_events_missing_total", {"sidecar": "sc-1", "agent": "bot"}
    )
    assert value == 4


def test_a_consumer_that_went_back_is_never_silent() -> None:
    metrics = CollectorMetrics()
    ingestor = Ingestor(RollingWindows(1.0, 60.0, 1000), metrics)
    event = events_pb2.Event(event_id="e", agent="bot", sidecar_id="sc", sequence=1, time_unix_nano=1)
    event.call.latency_ms = 1.0
    ingestor.apply([_Record(100, event)], now=1.0)
    assert metrics.registry.get_sample_value("outrider_collector_offset_resets_total") == 0
    ingestor.apply([_Record(0, event)], now=1.0)  # a new log under the same name
    assert metrics.registry.get_sample_value("outrider_collector_offset_resets_total") == 1


SIDECARS = st.sampled_from(["", "a", "b", "c", "d", "e"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(SIDECARS, st.sampled_from(["bot", "helper"]), st.integers(-1, 12)), max_size=40),
    st.lists(st.tuples(st.sampled_from(["a", "b", "c", "z"]), st.integers(1, 6)), max_size=4),
    st.integers(2, 8),
)
def test_a_batch_observes_what_one_by_one_observes(
    seen: list[tuple[str, str, int]], before: list[tuple[str, int]], cap: int
) -> None:
    """The same gaps, missing counts and state, the order of sidecars and the cap included."""
    one, batch = GapTracker(max_sidecars=cap), GapTracker(max_sidecars=cap)
    for tracker in (one, batch):
        for sidecar, sequence in before:
            tracker.observe(sidecar, "bot", sequence)
    singles = [(s, a, q, m) for s, a, q in seen if (m := one.observe(s, a, q))]
    assert batch.observe_all(seen) == singles
    assert batch.to_state() == one.to_state()
