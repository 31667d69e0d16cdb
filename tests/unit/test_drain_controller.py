"""The controller's retired list: a rolled-back or aborted candidate with its drain deadline,
carried on every later state (a new rollout's too) and bounded."""

from __future__ import annotations

import pytest

from collector._rollout import MAX_RETIRED, RETIRED_RETENTION_S, retired_after
from outrider.v1 import control_pb2
from tests.unit.rollout_support import ABORTED, CANDIDATE_V, ROLLED_BACK, RUNNING, STABLE_V, Harness

SPEC = f"""
agent: bot
stable: {STABLE_V}
candidate: {CANDIDATE_V}
look_interval: 1s
drain_timeout: 2m
steps:
  - {{weight: 10, min_duration: 30s, min_samples: 20}}
gates:
  - {{name: errors, metric: error_rate, max_increase: 0.05, window: 1m, min_samples: 20}}
"""


def test_drain_rollback_retires_candidate_with_deadline() -> None:
    h = Harness(SPEC)
    started = h.start()
    assert started.drain_timeout_s == 120 and not started.retired
    h.feed(200, canary=False)
    h.feed(99, canary=True, error_every=3)
    state = h.tick()
    assert state is not None and state.phase == ROLLED_BACK
    [entry] = state.retired
    assert entry.version_id == CANDIDATE_V and entry.rollout_id == started.rollout_id
    assert entry.reason == "rolled_back"
    assert entry.drain_deadline_unix_nano == state.decided_at_unix_nano + 120 * 10**9


def test_drain_abort_retires_candidate_and_default_timeout_is_ten_minutes() -> None:
    h = Harness(SPEC.replace("drain_timeout: 2m\n", ""))
    started = h.start()
    assert started.drain_timeout_s == 600
    h.clock.advance(5)
    state = h.ctl.abort("bad prompt", h.clock.now(), "ops")
    assert state.phase == ABORTED
    [entry] = state.retired
    assert entry.reason == "aborted" and entry.version_id == CANDIDATE_V
    assert entry.drain_deadline_unix_nano == round((h.clock.now() + 600) * 1e9)


def test_drain_entries_survive_a_new_rollout_until_retention_ends() -> None:
    h = Harness(SPEC)
    first = h.start()
    aborted = h.ctl.abort("x", h.clock.now(), "ops")
    h.clock.advance(3600)  # past the drain deadline: still listed, the tokens may still be valid
    second = h.start(generation_base=aborted.generation)
    assert second.phase == RUNNING and second.rollout_id != first.rollout_id
    assert [(e.version_id, e.rollout_id) for e in second.retired] == [(CANDIDATE_V, first.rollout_id)]
    h.clock.advance(10)
    again = h.ctl.abort("y", h.clock.now(), "ops")
    assert [e.rollout_id for e in again.retired] == [second.rollout_id, first.rollout_id]
    h.clock.advance(RETIRED_RETENTION_S)
    third = h.start(generation_base=again.generation)
    assert [e.rollout_id for e in third.retired] == [second.rollout_id]


def test_drain_retired_list_is_bounded_newest_first() -> None:
    old = [
        control_pb2.RetiredVersion(version_id=f"v{i}", rollout_id=f"r{i}", drain_deadline_unix_nano=10**18)
        for i in range(MAX_RETIRED + 5)
    ]
    added = control_pb2.RetiredVersion(version_id="new", rollout_id="rn", drain_deadline_unix_nano=10**18)
    kept = retired_after(old, 1e9, added)
    assert len(kept) == MAX_RETIRED and kept[0].version_id == "new"
    assert [e.version_id for e in kept[1:3]] == ["v0", "v1"]
    # the same entry twice (a republished state) is listed once
    assert len(retired_after([added, added], 1e9)) == 1


@pytest.mark.parametrize("drain", ["0s", "90s"])
def test_drain_timeout_from_spec(drain: str) -> None:
    h = Harness(SPEC.replace("drain_timeout: 2m", f"drain_timeout: {drain}"))
    h.start()
    state = h.ctl.abort("x", h.clock.now(), "ops")
    expected = 0 if drain == "0s" else 90
    assert state.retired[0].drain_deadline_unix_nano == state.decided_at_unix_nano + expected * 10**9


def test_drain_collector_ignores_version_drained_events() -> None:
    """A sidecar's VersionDrained is not a version's evidence: ignored, never dead-lettered."""
    import outrider
    from collector._ingest import Ingestor
    from collector._metrics import CollectorMetrics
    from collector._windows import Ingest, RollingWindows
    from outrider.v1 import events_pb2
    from tests.unit.test_collector_evidence import Record

    h = Harness(SPEC)
    h.start()
    event = events_pb2.Event(event_id="d1", agent="bot", version_id=CANDIDATE_V, sidecar_id="sc")
    event.drained.version_id, event.drained.rollout_id, event.drained.sessions_cut = CANDIDATE_V, "r", 3
    windows = RollingWindows(bucket_s=1, retention_s=900)
    assert windows.add_event(event, h.clock.now()) is Ingest.IGNORED
    value, headers = outrider.encode_event(event)
    ingestor = Ingestor(windows, CollectorMetrics(), evidence=h.book)
    assert ingestor.apply([Record("outrider.events", 0, 0, b"bot", value, headers)], h.clock.now()) == []
    assert ingestor.positions == {("outrider.events", 0): 1}
    assert h.evidence.candidate_requests(0) == 0
