"""Which versions sidecars report serving, and with which models: for `rollout status`,
`outrider version list` and the registry check of `rollout start`.

Two sources: the events of calls (`observe`: last seen, models) and the sidecars'
`VersionsReport`s (`report`: which sidecar ids serve the version, when each said so last,
under which label). Kept in memory only (bounded): after a collector restart a version counts
as unseen until its next event or report (every 30 s by default), which errs toward a warning
rather than a false all-clear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from collector._rows import CALL_MODEL, ROW_EVENT, Row, event_of, heads, read_rows
from outrider.v1 import events_pb2

MAX_MODELS = 8  # per version: a version names one model, plus its fallbacks
MAX_VERSIONS = 10_000  # (agent, version) pairs; the oldest sighting goes first
MAX_REPORTERS = 256  # sidecar ids per version; the one heard from longest ago goes first


@dataclass
class Sighting:
    last_seen: float = 0.0  # the newest event's time, seconds since the epoch
    models: list[str] = field(default_factory=list)
    reporters: dict[str, Reporter] = field(default_factory=dict)  # by sidecar id, oldest first


@dataclass
class Reporter:
    last_seen: float  # the newest report's time, seconds since the epoch
    label: str = ""
    source: str = ""


class VersionSightings:
    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], Sighting] = {}

    def observe(self, event: events_pb2.Event, now: float) -> None:
        if not event.version_id:
            return
        key = (event.agent, event.version_id)
        seen = self._seen.pop(key, None) or Sighting()
        self._seen[key] = seen  # re-inserted: dict order is recency, the oldest is evicted
        at = event.time_unix_nano / 1e9 if event.time_unix_nano else now
        seen.last_seen = max(seen.last_seen, at)
        model = event.call.model if event.WhichOneof("body") == "call" else ""
        if model and model not in seen.models and len(seen.models) < MAX_MODELS:
            seen.models.append(model)
        if len(self._seen) > MAX_VERSIONS:
            del self._seen[next(iter(self._seen))]

    def observe_all(self, events: Sequence[tuple[events_pb2.Event, str | None]], now: float) -> None:
        """`observe` each (event, its body) in order, with the same result."""
        self.observe_rows(read_rows(heads(events)), now)

    def observe_rows(self, rows: Sequence[Row], now: float) -> None:
        """`observe_all` of the events as rows (`collector._rows`): each version is touched
        once, in the order of its last event (the recency order one by one leaves)."""
        if len(self._seen) + len(rows) > MAX_VERSIONS:  # evictions midway: keep their order
            for row in rows:
                self.observe(event_of(row[ROW_EVENT]), now)
            return
        batch: dict[tuple[str, str], list[Any]] = {}  # key -> [index of its last event, newest, models]
        for index, (body, agent, _, stamp, version, _, _, _, detail) in enumerate(rows):
            if not version:
                continue
            at = stamp / 1e9 if stamp else now
            entry = batch.get(key := (agent, version))
            if entry is None:
                entry = batch[key] = [index, at, []]
            else:
                entry[0] = index
                if at > entry[1]:
                    entry[1] = at
            if body == "call" and (model := detail[CALL_MODEL]) and model not in entry[2]:  # type: ignore[index,misc]
                entry[2].append(model)
        for key, (_, at, models) in sorted(batch.items(), key=lambda item: item[1][0]):
            seen = self._seen.pop(key, None) or Sighting()
            self._seen[key] = seen  # re-inserted in the order of the last events
            seen.last_seen = max(seen.last_seen, at)
            for model in models:
                if model not in seen.models and len(seen.models) < MAX_MODELS:
                    seen.models.append(model)

    def _entry(self, agent: str, version_id: str) -> Sighting:
        key = (agent, version_id)
        seen = self._seen.pop(key, None) or Sighting()
        self._seen[key] = seen  # re-inserted: dict order is recency, the oldest is evicted
        if len(self._seen) > MAX_VERSIONS:
            del self._seen[next(iter(self._seen))]
        return seen

    def report(self, event: events_pb2.Event, now: float) -> None:
        """A sidecar's `VersionsReport`: it serves each version listed."""
        if not event.agent or not event.sidecar_id:
            return
        at = min(event.time_unix_nano / 1e9, now) if event.time_unix_nano else now
        for reported in event.versions_report.versions[:MAX_VERSIONS]:
            if not reported.version_id:
                continue
            seen = self._entry(event.agent, reported.version_id)
            if reported.model and reported.model not in seen.models and len(seen.models) < MAX_MODELS:
                seen.models.append(reported.model)
            old = seen.reporters.pop(event.sidecar_id, None)
            last = max(at, old.last_seen) if old is not None else at
            seen.reporters[event.sidecar_id] = Reporter(last, reported.label[:64], reported.source[:16])
            if len(seen.reporters) > MAX_REPORTERS:
                del seen.reporters[min(seen.reporters, key=lambda s: seen.reporters[s].last_seen)]

    def reported(self, agent: str, version_id: str) -> bool:
        """Whether any sidecar reported serving the version (in a report or a call's event)."""
        seen = self._seen.get((agent, version_id))
        return seen is not None and (bool(seen.reporters) or seen.last_seen > 0)

    def versions(self, agent: str) -> list[tuple[str, Sighting]]:
        return [(vid, seen) for (a, vid), seen in self._seen.items() if a == agent]

    def get(self, agent: str, version_id: str) -> Sighting | None:
        return self._seen.get((agent, version_id))
