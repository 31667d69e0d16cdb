"""The async side of global tokens-per-minute quotas: one `GlobalQuota` per configured
resource (``provider/model``), grants from the control topic, usage reports to telemetry.

Admission (`admit`) reserves the estimated tokens. A QUEUE verdict waits in a bounded
queue (at most ``queue_max`` waiters, each for at most ``queue_timeout`` and never past the
call's deadline), asking again after the hint; a full queue, a timeout or a REFUSE is a
refusal with a retry-after. A grant record (``ControlMessage.quota``) names every
sidecar's share; a record without our id means the collector has not seen our report yet,
so we keep what we have (the safe share unless a fresh grant is in force).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

from outrider.clock import Clock
from outrider.v1 import control_pb2, events_pb2
from sidecar._config import GlobalQuotaConfig
from sidecar.resilience._quota import BoundedWaitQueue, GlobalQuota, Verdict
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.telemetry._producer import TelemetryProducer
from sidecar.telemetry._producer_policy import new_event_id

log = logging.getLogger(__name__)

MIN_POLL_S = 0.01
MAX_POLL_S = 0.25


@dataclass(frozen=True, slots=True)
class QuotaTicket:
    """An admission: settle it with `GlobalQuotas.reconcile` once the call's usage is known."""

    resource: str
    reserved: float
    waited_s: float
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class QuotaRefusal:
    resource: str
    retry_after_s: float
    reason: str


class GlobalQuotas:
    def __init__(
        self,
        configs: Mapping[str, GlobalQuotaConfig],
        *,
        sidecar_id: str,
        agent: str,
        clock: Clock,
        metrics: SidecarMetrics,
        telemetry: TelemetryProducer,
        report_interval_s: float,
        shadow_max_share: float = 0.2,
    ) -> None:
        self.sidecar_id = sidecar_id
        self._shadow_max_share = shadow_max_share  # of each quota, for mirrored calls
        self._epochs: dict[str, int] = {}  # the writer epoch of the last grant, by resource
        self._agent = agent
        self._clock = clock
        self._metrics = metrics
        self._telemetry = telemetry
        self._interval = report_interval_s
        self.quotas: dict[str, GlobalQuota] = {}
        self._queues: dict[str, BoundedWaitQueue[object]] = {}
        self._windows = {resource: cfg.usage_window for resource, cfg in configs.items()}
        for resource, cfg in configs.items():
            self.quotas[resource] = GlobalQuota(
                resource,
                cfg.safe_share_tpm,
                cfg.grant_ttl,
                clock,
                priority_threshold=cfg.priority_threshold,
                window_s=cfg.usage_window,
            )
            self._queues[resource] = BoundedWaitQueue(cfg.queue_max, cfg.queue_timeout)
            metrics.global_quota_tpm.labels(resource).set(cfg.safe_share_tpm)
        self._task: asyncio.Task[None] | None = None
        self._since = clock.now()  # the usage windows start empty here

    def __contains__(self, resource: object) -> bool:
        return resource in self.quotas

    async def admit(
        self, resource: str, tokens: float, priority: bool, deadline: float, *, shadow: bool = False
    ) -> QuotaTicket | QuotaRefusal:
        """Reserve ``tokens`` of ``resource`` (``deadline``: time.monotonic() of the call's end).
        A mirrored call (``shadow``) is admitted at once or refused, never queued."""
        quota = self.quotas[resource]
        if shadow:
            if quota.admit_shadow(tokens, self._shadow_max_share).verdict is Verdict.ADMIT:
                return QuotaTicket(resource, tokens, 0.0, shadow=True)
            return QuotaRefusal(resource, 0.0, f"global quota {resource}: no room for mirrored calls")
        start = time.monotonic()
        decision = quota.admit(tokens, priority)
        if decision.verdict is Verdict.ADMIT:
            return QuotaTicket(resource, tokens, 0.0)
        if decision.verdict is Verdict.REFUSE:
            return QuotaRefusal(resource, decision.retry_after_s, f"global quota {resource} exhausted")
        queue = self._queues[resource]
        waiter = object()
        if not queue.offer(waiter, self._clock.now()):
            return QuotaRefusal(resource, decision.retry_after_s, f"global quota {resource}: wait queue full")
        give_up = min(start + queue.timeout_s, deadline)
        try:
            while True:
                left = give_up - time.monotonic()
                if left <= 0:
                    hint = max(decision.retry_after_s, MIN_POLL_S)
                    return QuotaRefusal(
                        resource, hint, f"global quota {resource} above its priority threshold"
                    )
                await asyncio.sleep(min(max(decision.retry_after_s, MIN_POLL_S), MAX_POLL_S, left))
                decision = quota.admit(tokens, priority, requeued=True)
                if decision.verdict is Verdict.ADMIT:
                    return QuotaTicket(resource, tokens, time.monotonic() - start)
        finally:
            queue.remove(waiter)

    def reconcile(self, ticket: QuotaTicket, actual_tokens: float) -> None:
        self.quotas[ticket.resource].reconcile(ticket.reserved, max(0.0, actual_tokens), shadow=ticket.shadow)

    def apply(self, grant: control_pb2.QuotaGrant) -> bool:
        """Adopt our share from a grant record; False if not ours to apply, stale or out of order."""
        quota = self.quotas.get(grant.resource)
        if quota is None or self.sidecar_id not in grant.grants_tpm:
            return False
        issued_at = grant.issued_at_unix_nano / 1e9 if grant.issued_at_unix_nano else None
        tpm = grant.grants_tpm[self.sidecar_id]
        if not math.isfinite(tpm) or tpm < 0:
            return False
        # ordered by the writer's epoch first: a restarted collector (on a new broker, say)
        # numbers its grants afresh, a stale one cannot win with a higher generation
        epoch = self._epochs.get(grant.resource, 0)
        if grant.epoch < epoch:
            return False
        if grant.epoch > epoch:
            quota.new_writer()
            self._epochs[grant.resource] = grant.epoch
        granted = sum(v for v in grant.grants_tpm.values() if math.isfinite(v) and v > 0)
        applied = quota.apply_grant(
            tpm,
            issued_at=issued_at,
            generation=grant.generation,
            limit_tpm=grant.limit_tpm if math.isfinite(grant.limit_tpm) and grant.limit_tpm > 0 else None,
            granted_tpm=max(granted, tpm),
        )
        if applied:
            self._metrics.global_quota_tpm.labels(grant.resource).set(tpm)
            log.debug("quota: %s grant %.0f tpm (generation %d)", grant.resource, tpm, grant.generation)
        return applied

    def report(self) -> list[events_pb2.Event]:
        """One usage event per resource (also what the background task emits)."""
        events = []
        # The quota's usage_report divides by its full window; until the window has been
        # observed for that long it would under-report the rate (a sidecar 6 s old reports
        # a tenth of what it uses) and the collector would shrink the grant to match.
        observed = max(self._clock.now() - self._since, self._interval, 1e-3)
        for resource, quota in self.quotas.items():
            scale = max(1.0, self._windows[resource] / observed)
            used, demand = (x * scale for x in quota.usage_report())
            event = events_pb2.Event(
                event_id=new_event_id(),
                time_unix_nano=int(self._clock.now() * 1e9),
                agent=self._agent,
                sidecar_id=self.sidecar_id,
            )
            event.usage.resource = resource
            event.usage.used_tpm = used
            event.usage.demand_tpm = demand
            event.usage.granted_tpm = quota.tpm
            self._metrics.global_quota_tpm.labels(resource).set(quota.tpm)
            events.append(event)
        return events

    async def start(self) -> None:
        if self._task is None and self.quotas:
            self._task = asyncio.create_task(self._run(), name="outrider-usage-reports")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            for event in self.report():
                self._telemetry.emit(event)
            await asyncio.sleep(self._interval)
