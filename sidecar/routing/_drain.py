"""Drain: sessions pinned to a rolled-back or aborted version end at its drain deadline.

The router says which sessions are drained (from the control state, so every replica
agrees); this module turns that into the agent-facing answer and the telemetry:

- `precondition_status` builds FAILED_PRECONDITION with a `google.rpc.ErrorInfo` whose
  `reason` (the constants live in the contract, `outrider.SESSION_DRAINED` etc., for
  clients) tells an agent what to do: SESSION_DRAINED and SESSION_EXPIRED both mean
  "open a new session" (it lands on the version new sessions get: stable after a rollback).
- `DrainTracker.check` runs for every call on a session: None serves it (and counts it as
  draining while its version is retired but before the deadline); a retired entry refuses it.
- `outrider_sidecar_sessions_draining{version}`: sessions seen on a retired version within
  its drain period, active in the last `active_window_s` (a bounded TTL cache per version).
- one `VersionDrained` event per retired version and sidecar, when its deadline passes or,
  after an active window without a call, no session of it remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
from cachetools import TTLCache
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from outrider import ERROR_DOMAIN, SESSION_DRAINED
from outrider.clock import Clock
from outrider.v1 import control_pb2, events_pb2
from sidecar.routing._router import Router
from sidecar.routing._session import Session
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.telemetry._producer import TelemetryProducer
from sidecar.telemetry._producer_policy import new_event_id

log = logging.getLogger(__name__)

DEFAULT_ACTIVE_WINDOW_S = 300.0  # a session without a call for this long no longer counts as draining
MAX_TRACKED_SESSIONS = 10_000  # per retired version: bounds memory whatever the traffic
TICK_INTERVAL_S = 1.0


def precondition_status(reason: str, message: str, metadata: dict[str, str] | None = None) -> grpc.Status:
    """FAILED_PRECONDITION carrying ErrorInfo(reason, domain outrider.io), for `abort_with_status`."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {})
    proto = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=message)
    proto.details.add().Pack(info)
    return rpc_status.to_status(proto)


def drained_status(entry: control_pb2.RetiredVersion) -> grpc.Status:
    why = "rolled back" if entry.reason == "rolled_back" else entry.reason or "retired"
    return precondition_status(
        SESSION_DRAINED,
        f"session_id: version {entry.version_id} was {why} (rollout {entry.rollout_id}) and its drain "
        "timeout has passed; open a new session",
        {
            "version_id": entry.version_id,
            "rollout_id": entry.rollout_id,
            "retired_reason": entry.reason,
            "drain_deadline_unix_nano": str(entry.drain_deadline_unix_nano),
        },
    )


@dataclass(slots=True)
class _Retired:
    entry: control_pb2.RetiredVersion
    first_seen: float  # sidecar clock: when this sidecar first saw the entry
    active: TTLCache[str, bool]  # session nonce -> seen, expiring after the active window
    announced: bool = False


class DrainTracker:
    """Per-call drain checks, the draining gauge and the VersionDrained events of one sidecar."""

    def __init__(
        self,
        router: Router,
        *,
        agent: str,
        sidecar_id: str,
        clock: Clock,
        metrics: SidecarMetrics,
        telemetry: TelemetryProducer,
        active_window_s: float = DEFAULT_ACTIVE_WINDOW_S,
    ) -> None:
        self._router = router
        self._agent = agent
        self._sidecar_id = sidecar_id
        self._clock = clock
        self._metrics = metrics
        self._telemetry = telemetry
        self._window = active_window_s
        self._retired: dict[tuple[str, str], _Retired] = {}
        self._task: asyncio.Task[None] | None = None
        self.cut = 0  # calls refused with SESSION_DRAINED

    def check(self, session: Session) -> control_pb2.RetiredVersion | None:
        """None to serve the call; the retired entry when the session's drain has ended."""
        entry = self._router.retirement_of(session)
        if entry is None:
            return None
        now = self._clock.now()
        tracked = self._track(entry, now)
        if self._router.drained(session, now):
            self.cut += 1
            self._settle(tracked, now)
            return entry
        tracked.active[session.nonce] = True
        self._metrics.sessions_draining.labels(entry.version_id).set(len(tracked.active))
        return None

    def tick(self) -> None:
        """Follow the router's retired list: gauges, and the events of drains that ended."""
        now = self._clock.now()
        listed = {(e.version_id, e.rollout_id): e for e in self._router.retired}
        for key in [k for k in self._retired if k not in listed]:
            gone = self._retired.pop(key)
            with contextlib.suppress(KeyError):  # another rollout's entry may share the label
                self._metrics.sessions_draining.remove(gone.entry.version_id)
        for entry in listed.values():
            self._settle(self._track(entry, now), now)

    def _track(self, entry: control_pb2.RetiredVersion, now: float) -> _Retired:
        key = (entry.version_id, entry.rollout_id)
        tracked = self._retired.get(key)
        if tracked is None:
            cache: TTLCache[str, bool] = TTLCache(MAX_TRACKED_SESSIONS, self._window, timer=self._clock.now)
            # a drain that ended before this sidecar heard of it (a restart within the retention)
            # was announced by the sidecars that served it: not again
            over = round(now * 1e9) >= entry.drain_deadline_unix_nano
            tracked = self._retired[key] = _Retired(entry, now, cache, announced=over)
        return tracked

    def _settle(self, tracked: _Retired, now: float) -> None:
        tracked.active.expire()
        ended = round(now * 1e9) >= tracked.entry.drain_deadline_unix_nano
        # sessions still active when the deadline passes are cut: they get SESSION_DRAINED next
        remaining = len(tracked.active)
        self._metrics.sessions_draining.labels(tracked.entry.version_id).set(0 if ended else remaining)
        if tracked.announced:
            return
        if ended or (remaining == 0 and now - tracked.first_seen >= self._window):
            tracked.announced = True
            self._announce(tracked.entry, remaining if ended else 0)

    def _announce(self, entry: control_pb2.RetiredVersion, sessions_cut: int) -> None:
        log.info(
            "drain: version %s (rollout %s) has no sessions left on this sidecar (%d cut)",
            entry.version_id,
            entry.rollout_id,
            sessions_cut,
        )
        event = events_pb2.Event(
            event_id=new_event_id(),
            time_unix_nano=round(self._clock.now() * 1e9),
            agent=self._agent,
            version_id=entry.version_id,
            sidecar_id=self._sidecar_id,
            rollout_id=entry.rollout_id,
        )
        event.drained.version_id = entry.version_id
        event.drained.rollout_id = entry.rollout_id
        event.drained.sessions_cut = sessions_cut
        self._telemetry.emit(event)

    # lifecycle: one owned task that ticks

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outrider-drain")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a bad state must not stop the drain loop
                log.exception("drain: tick failed")
            await asyncio.sleep(TICK_INTERVAL_S)
