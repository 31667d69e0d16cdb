"""The sidecar's Prometheus metrics, on a per-instance registry, and the /metrics server."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from outrider.v1 import control_pb2


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
            "outrider_sidecar_telemetry_sent", "Events acknowledged by Kafka", registry=r
        )
        self.telemetry_dropped = Counter(
            "outrider_sidecar_telemetry_dropped",
            "Events lost: queue full, send failed, or unsent at shutdown",
            ["reason"],
            registry=r,
        )
        self.telemetry_queue_depth = Gauge(
            "outrider_sidecar_telemetry_queue_depth", "Events waiting to be sent to Kafka", registry=r
        )
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
        self.rollout_unknown_version = Counter(
            "outrider_sidecar_rollout_unknown_version",
            "Rollout states naming a version this sidecar lacks",
            ["agent"],
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
