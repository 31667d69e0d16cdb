"""The sidecar's Prometheus metrics, on a per-instance registry, and the /metrics server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from outrider.v1 import control_pb2
from sidecar.telemetry._genai_metrics import GenAIMetrics


class SpanCounts(NamedTuple):
    """Cumulative span counts from the span exporter (kept on its own thread)."""

    exported: int
    dropped: dict[str, int]  # reason -> spans


class _SpanCollector(Collector):
    """`outrider_sidecar_spans_exported_total` and `..._spans_dropped_total{reason}`, read from
    the exporter's own counters at scrape time."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        source = self._metrics._span_counts
        counts = source() if source is not None else SpanCounts(0, {})
        exported = CounterMetricFamily(
            "outrider_sidecar_spans_exported", "Spans encoded and handed to the telemetry path"
        )
        exported.add_metric([], counts.exported)
        yield exported
        dropped = CounterMetricFamily(
            "outrider_sidecar_spans_dropped",
            "Spans lost before Kafka or the spill, by reason (queue_full, oversize, encode_failed)",
            labels=["reason"],
        )
        for reason, value in sorted(counts.dropped.items()):
            dropped.add_metric([reason], value)
        yield dropped


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "outrider_sidecar_requests",
            "gRPC calls handled, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.telemetry_sent = Counter(
            "outrider_sidecar_telemetry_sent",
            "Records (events, spans) acknowledged by Kafka",
            registry=r,
        )
        self.telemetry_dropped = Counter(
            "outrider_sidecar_telemetry_dropped",
            "Records lost, by reason: queue_full, send_failed, no_topic, spill_full, spill_error, shutdown",
            ["reason"],
            registry=r,
        )
        self.telemetry_queue_depth = Gauge(
            "outrider_sidecar_telemetry_queue_depth",
            "Records waiting in memory for Kafka or the spill",
            registry=r,
        )
        self.telemetry_spilled = Counter(
            "outrider_sidecar_telemetry_spilled",
            "Records written to the on-disk spill because Kafka was unreachable or behind",
            registry=r,
        )
        self.telemetry_spill_bytes = Gauge(
            "outrider_sidecar_telemetry_spill_bytes", "Bytes waiting in the on-disk spill", registry=r
        )
        self.telemetry_spill_records = Gauge(
            "outrider_sidecar_telemetry_spill_records", "Records waiting in the on-disk spill", registry=r
        )
        self.telemetry_kafka_up = Gauge(
            "outrider_sidecar_telemetry_kafka_up",
            "1 when the last send to Kafka worked, 0 while telemetry spills or waits",
            registry=r,
        )
        self._span_counts: Callable[[], SpanCounts] | None = None
        r.register(_SpanCollector(self))
        self.rollout_generation = Gauge(
            "outrider_sidecar_rollout_generation",
            "Generation of the rollout state applied",
            ["agent"],
            registry=r,
        )
        self.rollout_phase = Gauge(
            "outrider_sidecar_rollout_phase",
            "1 for the current rollout phase",
            ["agent", "phase"],
            registry=r,
        )
        self.candidate_weight = Gauge(
            "outrider_sidecar_candidate_weight",
            "Share of new sessions sent to the candidate",
            ["agent"],
            registry=r,
        )
        self.control_undecodable = Counter(
            "outrider_sidecar_control_undecodable",
            "Records on the control topic that could not be decoded",
            registry=r,
        )
        self.control_rejected = Counter(
            "outrider_control_rejected",
            "Control records dropped: unsigned, bad_signature, unknown_key, stale (a replay), "
            "bad_key, undecodable",
            ["reason"],
            registry=r,
        )
        self.control_unsigned_applied = Counter(
            "outrider_control_unsigned_applied",
            "Unsigned control records applied because verify is `warn`",
            registry=r,
        )
        self.control_ready = Gauge(
            "outrider_sidecar_control_ready",
            "1 once a control state is known (persisted or replayed from the topic)",
            registry=r,
        )
        self.control_wait_expired = Counter(
            "outrider_sidecar_control_wait_expired",
            "Times health went SERVING after control.ready_timeout without a control state",
            registry=r,
        )
        self.versions_rejected = Counter(
            "outrider_sidecar_versions_rejected",
            "Records of outrider.versions dropped: unsigned, bad_signature, unknown_key, bad_key, "
            "undecodable, not_canonical, id_mismatch, invalid, full",
            ["reason"],
            registry=r,
        )
        self.registry_versions = Gauge(
            "outrider_sidecar_registry_versions",
            "Verified versions loaded from outrider.versions",
            registry=r,
        )
        self.flag_unknown = Counter(
            "outrider_sidecar_flag_unknown",
            "Feature flag states naming a flag this sidecar's config lacks (ignored)",
            ["agent"],
            registry=r,
        )
        self.rollout_unknown_version = Counter(
            "outrider_sidecar_rollout_unknown_version",
            "Rollout states naming a version this sidecar lacks",
            ["agent"],
            registry=r,
        )

        self.sessions_draining = Gauge(
            "outrider_sidecar_sessions_draining",
            "Sessions on a retired (rolled-back or aborted) version still within its drain timeout, "
            "active in the last few minutes",
            ["version"],
            registry=r,
        )
        self.sessions_refused = Counter(
            "outrider_sidecar_sessions_refused",
            "Calls refused with FAILED_PRECONDITION, by ErrorInfo reason (SESSION_DRAINED, SESSION_EXPIRED)",
            ["reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "outrider_sidecar_breaker_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open",
            ["upstream"],
            registry=r,
        )
        self.upstream_attempts = Counter(
            "outrider_sidecar_upstream_attempts",
            "Calls made to an upstream (retries included), by outcome",
            ["upstream", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "outrider_sidecar_retries", "Retries started, by upstream", ["upstream"], registry=r
        )
        self.retry_budget_refused = Counter(
            "outrider_sidecar_retry_budget_refused",
            "Retries the retry budget refused",
            ["upstream"],
            registry=r,
        )
        self.fallbacks = Counter(
            "outrider_sidecar_fallbacks", "Calls served by a fallback tier, by tier", ["tier"], registry=r
        )
        self.quota_refused = Counter(
            "outrider_sidecar_quota_refused",
            "Calls refused by a quota, by scope (user, tenant, global)",
            ["scope"],
            registry=r,
        )
        self.global_quota_tpm = Gauge(
            "outrider_sidecar_global_quota_tpm", "The global-quota share in force", ["resource"], registry=r
        )
        self.guard_hits = Counter(
            "outrider_sidecar_guard_hits",
            "Guardrail hits by category and action",
            ["category", "action"],
            registry=r,
        )
        self.cost_usd = Counter(
            "outrider_sidecar_cost_usd", "USD spent on model calls", ["model"], registry=r
        )
        # shadow mode and the judge: background work, off every user's path
        self.shadow_calls = Counter(
            "outrider_sidecar_shadow_calls",
            "Calls mirrored to a shadow candidate and compared, by the candidate's outcome (ok, error)",
            ["outcome"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            "outrider_sidecar_shadow_dropped",
            "Shadow work not done, by reason (queue_full, overload, quota, rollout_ended, shutdown)",
            ["reason"],
            registry=r,
        )
        self.shadow_queue_depth = Gauge(
            "outrider_sidecar_shadow_queue_depth", "Shadow work waiting for a worker", registry=r
        )
        self.shadow_intercepted = Counter(
            "outrider_sidecar_shadow_intercepted",
            "Write-tool calls of shadow sessions answered without running the tool",
            ["tool"],
            registry=r,
        )
        self.judge_calls = Counter(
            "outrider_sidecar_judge_calls",
            "Judge verdicts, by kind (pair, single) and result (parsed, unparsed, error, refused)",
            ["kind", "result"],
            registry=r,
        )
        self.judge_cost_usd = Counter(
            "outrider_sidecar_judge_cost_usd", "USD spent on judge calls (apart from the agent's)", registry=r
        )
        self.genai = GenAIMetrics(r)  # gen_ai_client_* (OpenTelemetry GenAI client metrics)

    def watch_spans(self, source: Callable[[], SpanCounts] | None) -> None:
        """Read span counts from `source` at each scrape (None: report zeros)."""
        self._span_counts = source

    def set_rollout(self, state: control_pb2.RolloutState) -> None:
        agent = state.agent
        self.rollout_generation.labels(agent).set(state.generation)
        self.candidate_weight.labels(agent).set(state.candidate_weight)
        for name, value in control_pb2.RolloutPhase.items():
            if value == control_pb2.ROLLOUT_PHASE_UNSPECIFIED:
                continue
            phase = name.removeprefix("ROLLOUT_PHASE_").lower()
            self.rollout_phase.labels(agent, phase).set(1 if value == state.phase else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """`GET /metrics` on host:port (0 = a free port), served by aiohttp."""

    def __init__(self, metrics: SidecarMetrics, host: str = "127.0.0.1", port: int = 0) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        self.port = int(sockets[0].getsockname()[1]) if sockets else self._port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
