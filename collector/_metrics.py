"""Prometheus metrics of one collector instance, and the aiohttp server for /metrics.

Each Collector has its own CollectorRegistry, so several can live in one process (tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collector._rows import Row
from collector._shadow_evidence import ShadowEvidence
from collector._totals import LATENCY_BUCKETS_S, AgentTotals, AgentTotalsCollector, role_label
from outrider.v1 import admin_pb2, control_pb2, events_pb2

__all__ = ["LATENCY_BUCKETS_S", "CollectorMetrics", "MetricsServer", "role_label"]

log = logging.getLogger(__name__)

_PHASE_NAMES = {
    p: control_pb2.RolloutPhase.Name(p).removeprefix("ROLLOUT_PHASE_").lower()
    for p in control_pb2.RolloutPhase.values()
    if p != control_pb2.ROLLOUT_PHASE_UNSPECIFIED
}


class CollectorMetrics:
    """The collector's instruments, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # agent traffic: cumulative, exactly once, checkpointed (collector._totals)
        self.totals = AgentTotals()
        self.registry.register(AgentTotalsCollector(self.totals))
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
        # below 1: a scaled demo (every plan duration x this), so no dashboard takes it for real
        self.time_scale = Gauge(
            "outrider_rollout_time_scale",
            "The rollout spec's time_scale: 1 for a real rollout, below 1 for a scaled demo",
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
        self.deadletter = Counter(
            "outrider_collector_deadletter_total",
            "Records written to outrider.deadletter, by reason",
            ("reason",),
            registry=self.registry,
        )
        self.deadletter_failures = Counter(
            "outrider_collector_deadletter_failures_total",
            "Dead-letter writes that failed (the record is skipped and logged)",
            registry=self.registry,
        )
        self.checkpoints = Counter(
            "outrider_collector_checkpoints_total",
            "Window-state checkpoints written, by result",
            ("result",),
            registry=self.registry,
        )
        self.checkpoint_duration = Histogram(
            "outrider_collector_checkpoint_duration_seconds",
            "Time to serialize and write one checkpoint",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.checkpoint_bytes = Gauge(
            "outrider_collector_checkpoint_bytes",
            "Size of the last checkpoint written",
            registry=self.registry,
        )
        self.notifications = Counter(
            "outrider_collector_notifications_total",
            "Webhook notifications of rollout state changes, by result (sent, failed, dropped)",
            ("result",),
            registry=self.registry,
        )
        self.deployment_records = Counter(
            "outrider_collector_deployment_records_total",
            "Deployment records of ended rollouts, by result (saved, published, failed, dropped, rejected)",
            ("result",),
            registry=self.registry,
        )
        self.publish_failures = Counter(
            "outrider_collector_control_publish_failures_total",
            "Failed writes of rollout states to outrider.control",
            registry=self.registry,
        )
        self.control_rejected = Counter(
            "outrider_control_rejected",
            "Control records dropped on read: unsigned, bad_signature, unknown_key, bad_key, undecodable",
            ("reason",),
            registry=self.registry,
        )
        self.commands = Counter(
            "outrider_collector_commands",
            "Admin calls relayed between replicas on outrider.commands, by outcome: sent, run, "
            "answered, not_owner, expired, rejected (bad or missing signature), duplicate, timeout",
            ("outcome",),
            registry=self.registry,
        )
        self.versions_rejected = Counter(
            "outrider_collector_versions_rejected",
            "Records of outrider.versions dropped on read: unsigned, bad_signature, unknown_key, "
            "bad_key, undecodable, not_canonical, id_mismatch",
            ("reason",),
            registry=self.registry,
        )
        self.registry_versions = Gauge(
            "outrider_collector_registry_versions",
            "Verified versions in this replica's view of outrider.versions",
            registry=self.registry,
        )
        self.republished = Counter(
            "outrider_collector_control_republished_total",
            "Rollout states written again (at start, periodically, after a new broker)",
            registry=self.registry,
        )
        self.new_broker = Counter(
            "outrider_collector_new_broker_total",
            "Times the collector found a new or emptied broker and re-created its topics",
            registry=self.registry,
        )
        self.offset_resets = Counter(
            "outrider_collector_offset_resets_total",
            "Times the events consumer found its position out of range and started over",
            registry=self.registry,
        )
        self.events_missing = Counter(
            "outrider_events_missing",
            "Events that never arrived: gaps in each sidecar's sequence numbers",
            ("sidecar", "agent"),
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
        self._shadow = _ShadowCollector(lambda: [])
        self.registry.register(self._shadow)

    def observe_event(self, event: events_pb2.Event) -> None:
        """Count an event the windows counted (so exactly once)."""
        self.totals.add_event(event)

    def observe_rows(self, rows: Sequence[Row]) -> None:
        """`observe_event` for each event, as rows (`collector._rows`), in order."""
        self.totals.add_rows(rows)

    def watch_shadow(self, shadows: Callable[[], list[tuple[str, ShadowEvidence]]]) -> None:
        """Show each current rollout's shadow figures (gauges of the evidence since it started)."""
        self._shadow.source = shadows

    def watch_relay(self, relay: SpanRelayStats) -> None:
        """Show the span relay's counters on /metrics."""
        self.registry.register(_RelayCollector(relay))

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
        self.time_scale.labels(state.agent).set(state.time_scale or 1.0)  # 0: a state from before it


class SpanRelayStats(Protocol):
    exported_spans: int
    exported_batches: int
    failed_batches: int
    rejected_batches: int
    rejected_spans: int
    undecodable: int
    retries: int


class _RelayCollector(Collector):
    def __init__(self, relay: SpanRelayStats) -> None:
        self._relay = relay

    def collect(self) -> Iterator[Metric]:
        r = self._relay
        spans = CounterMetricFamily(
            "outrider_collector_relayed_spans",
            "Spans relayed to the OTLP endpoint, by result",
            labels=["result"],
        )
        spans.add_metric(["exported"], r.exported_spans)
        spans.add_metric(["rejected"], r.rejected_spans)
        yield spans
        batches = CounterMetricFamily(
            "outrider_collector_relay_batches",
            "Span batches sent to the OTLP endpoint, by result",
            labels=["result"],
        )
        for result, value in (
            ("exported", r.exported_batches),
            ("failed", r.failed_batches),
            ("rejected", r.rejected_batches),
        ):
            batches.add_metric([result], value)
        yield batches
        yield CounterMetricFamily(
            "outrider_collector_relay_retries", "OTLP export attempts retried", value=r.retries
        )
        yield CounterMetricFamily(
            "outrider_collector_spans_undecodable",
            "Records on outrider.spans that were not OTLP trace requests",
            value=r.undecodable,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _ShadowCollector(Collector):
    """Gauges of every current rollout's mirrored pairs, labelled agent and (candidate) version."""

    def __init__(self, source: Callable[[], list[tuple[str, ShadowEvidence]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        labels = ["agent", "version"]
        agreement = GaugeMetricFamily(
            "outrider_shadow_tool_agreement_ratio",
            "Share of mirrored calls whose tool decisions agree",
            labels=labels,
        )
        similarity = GaugeMetricFamily(
            "outrider_shadow_text_similarity_ratio", "Mean text similarity of mirrored answers", labels=labels
        )
        judge = GaugeMetricFamily(
            "outrider_shadow_judge_score", "Mean pair judge score, by side", labels=[*labels, "side"]
        )
        preference = GaugeMetricFamily(
            "outrider_shadow_judge_preference_ratio",
            "Share of judged pairs preferring each side",
            labels=[*labels, "preference"],
        )
        errors = GaugeMetricFamily(
            "outrider_shadow_error_ratio",
            "Error rate of the mirrored calls, by side",
            labels=[*labels, "side"],
        )
        for agent, evidence in self.source():
            summary: admin_pb2.ShadowSummary = evidence.summary()
            key = [agent, evidence.candidate]
            if summary.pairs:
                agreement.add_metric(key, summary.tool_agreement)
                similarity.add_metric(key, summary.similarity_mean)
                errors.add_metric([*key, "candidate"], summary.error_rate)
                errors.add_metric([*key, "stable"], summary.stable_error_rate)
            if summary.judged:
                judge.add_metric([*key, "candidate"], summary.judge_score)
                judge.add_metric([*key, "stable"], summary.stable_judge_score)
                for side, share in (
                    ("candidate", summary.prefer_candidate),
                    ("stable", summary.prefer_stable),
                    ("tie", summary.prefer_tie),
                ):
                    preference.add_metric([*key, side], share)
        yield from (agreement, similarity, judge, preference, errors)

    def describe(self) -> Iterator[Metric]:
        return iter(())


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
