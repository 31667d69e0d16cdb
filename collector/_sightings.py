"""Which versions sidecars report serving, and with which models: for `rollout status`.

Kept in memory only (bounded): after a collector restart a version counts as unseen until its
next event, which errs toward a warning rather than a false all-clear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from outrider.v1 import events_pb2

MAX_MODELS = 8  # per version: a version names one model, plus its fallbacks
MAX_VERSIONS = 10_000  # (agent, version) pairs; the oldest sighting goes first


@dataclass
class Sighting:
    last_seen: float = 0.0  # the newest event's time, seconds since the epoch
    models: list[str] = field(default_factory=list)


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

    def get(self, agent: str, version_id: str) -> Sighting | None:
        return self._seen.get((agent, version_id))
