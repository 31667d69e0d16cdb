"""Prometheus metrics of one collector instance, and the aiohttp server for /metrics.

Each Collector has its own CollectorRegistry, so several can live in one process (tests).
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from outrider.v1 import common_pb2, control_pb2, events_pb2

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PHASE_NAMES = {
    p: control_pb2.RolloutPhase.Name(p).removeprefix("ROLLOUT_PHASE_").lower()
    for p in control_pb2.RolloutPhase.values()
    if p != control_pb2.ROLLOUT_PHASE_UNSPECIFIED
}


def role_label(role: int) -> str:
    try:
        return common_pb2.Role.Name(role).removeprefix("ROLE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return "unknown"


class CollectorMetrics:
    """The collector's instruments, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("agent", "version", "role")
        self.requests = Counter(
            "outrider_requests_total",
            "Agent requests (LLM and tool calls) seen in events",
            labels,
            registry=self.registry,
        )
        self.errors = Counter(
            "outrider_errors_total", "Agent requests that ended in an error", labels, registry=self.registry
        )
        self.duration = Histogram(
            "outrider_request_duration_seconds",
            "Agent request latency",
            labels,
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.phase = Gauge(
            "outrider_rollout_phase",
            "1 for the rollout's current phase, 0 for the others",
            ("agent", "phase"),
            registry=self.registry,
        )
        self.weight = Gauge(
            "outrider_rollout_candidate_weight",
            "Share of new sessions sent to the candidate",
            ("agent",),
            registry=self.registry,
        )
        self.consumed = Counter(
            "outrider_collector_events_consumed_total",
            "Records read from outrider.events",
            registry=self.registry,
        )
        self.duplicates = Counter(
            "outrider_collector_events_duplicate_total",
            "Events dropped as duplicates (same event_id)",
            registry=self.registry,
        )
        self.undecodable = Counter(
            "outrider_collector_records_undecodable_total",
            "Records on outrider.events that did not decode",
            registry=self.registry,
        )
        self.stale = Counter(
            "outrider_collector_events_stale_total",
            "Events older than the rolling-window retention",
            registry=self.registry,
        )
        self.publish_failures = Counter(
            "outrider_collector_control_publish_failures_total",
            "Failed writes of rollout states to outrider.control",
            registry=self.registry,
        )
        self.quota_limit = Gauge(
            "outrider_quota_limit_tokens_per_minute",
            "Configured global tokens-per-minute limit",
            ("resource",),
            registry=self.registry,
        )
        self.quota_granted = Gauge(
            "outrider_quota_granted_tokens_per_minute",
            "Share of the global limit granted to each sidecar in the last published grant",
            ("resource", "sidecar"),
            registry=self.registry,
        )
        self.quota_used = Gauge(
            "outrider_quota_used_tokens_per_minute",
            "Tokens per minute used, summed over the sidecars holding live leases",
            ("resource",),
            registry=self.registry,
        )
        self.quota_demand = Gauge(
            "outrider_quota_demand_tokens_per_minute",
            "Tokens per minute demanded, summed over the sidecars holding live leases",
            ("resource",),
            registry=self.registry,
        )
        self.quota_sidecars = Gauge(
            "outrider_quota_sidecars",
            "Sidecars holding a live lease",
            ("resource",),
            registry=self.registry,
        )
        self.quota_reports = Counter(
            "outrider_quota_usage_reports_total",
            "Usage reports read from outrider.events, by what was done with them",
            ("result",),
            registry=self.registry,
        )
        self.quota_grants = Counter(
            "outrider_quota_grants_published_total",
            "Quota grants written to outrider.control",
            ("resource",),
            registry=self.registry,
        )
        self.quota_publish_failures = Counter(
            "outrider_quota_grant_publish_failures_total",
            "Failed writes of quota grants to outrider.control (retried next interval)",
            ("resource",),
            registry=self.registry,
        )
        self._granted_sidecars: dict[str, set[str]] = {}

    def observe_event(self, event: events_pb2.Event) -> None:
        body = event.WhichOneof("body")
        if body not in ("call", "tool"):
            return
        record = event.call if body == "call" else event.tool
        labels = (event.agent, event.version_id, role_label(event.role))
        self.requests.labels(*labels).inc()
        if record.outcome == events_pb2.OUTCOME_ERROR:
            self.errors.labels(*labels).inc()
        self.duration.labels(*labels).observe(max(record.latency_ms, 0.0) / 1000)

    def observe_grant(self, grant: control_pb2.QuotaGrant) -> None:
        """Show a published grant; sidecars that lost their share lose their series."""
        current = set(grant.grants_tpm)
        for sidecar in self._granted_sidecars.get(grant.resource, set()) - current:
            self.quota_granted.remove(grant.resource, sidecar)
        for sidecar, tpm in grant.grants_tpm.items():
            self.quota_granted.labels(grant.resource, sidecar).set(tpm)
        self._granted_sidecars[grant.resource] = current
        self.quota_grants.labels(grant.resource).inc()

    def observe_state(self, state: control_pb2.RolloutState) -> None:
        for phase, name in _PHASE_NAMES.items():
            self.phase.labels(state.agent, name).set(1 if phase == state.phase else 0)
        self.weight.labels(state.agent).set(state.candidate_weight)


class MetricsServer:
    """GET /metrics on an aiohttp server; start/stop idempotent."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> int:
        if self._runner is not None:
            assert self.bound_port is not None
            return self.bound_port
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.bound_port = int(runner.addresses[0][1])
        log.info("collector metrics on http://%s:%d/metrics", self._host, self.bound_port)
        return self.bound_port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
