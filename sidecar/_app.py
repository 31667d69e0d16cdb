"""The sidecar process: wires config, router, sessions, upstream clients, telemetry, control
tailer, gRPC server (with health and reflection) and /metrics, and owns their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib.metadata
import logging
import os
import secrets
import signal
import socket
from types import TracebackType

import aiohttp
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

import outrider
from outrider.clock import Clock, SystemClock
from outrider.v1 import sidecar_pb2, sidecar_pb2_grpc
from sidecar._config import SidecarConfig
from sidecar._grpc import SidecarService
from sidecar._grpc_interceptor import RequestInterceptor
from sidecar._loop import freeze_startup_objects
from sidecar._openai_http import OpenAIEndpoint, OpenAIHttpError
from sidecar._pipeline import CallPipeline
from sidecar._record import Recorder
from sidecar._smoke import SmokeRunner
from sidecar._tool_calls import ToolCalls
from sidecar.flags._book import FlagBook
from sidecar.flags._effects import SessionFlags
from sidecar.guards._safety import Safety
from sidecar.resilience._executor import Executor
from sidecar.resilience._global_quota import GlobalQuotas
from sidecar.resilience._upstreams import Upstreams
from sidecar.resilience._user_quotas import UserQuotas
from sidecar.routing._control import ControlTailer
from sidecar.routing._drain import DrainTracker
from sidecar.routing._registry import VersionRegistry, registry_state_path
from sidecar.routing._router import Router
from sidecar.routing._session import SessionCodec
from sidecar.routing._versions import build_versions
from sidecar.shadow._judge import Judge
from sidecar.shadow._runner import ShadowRunner
from sidecar.telemetry._metrics import MetricsServer, SidecarMetrics
from sidecar.telemetry._producer import TelemetryProducer
from sidecar.telemetry._semconv import CAPTURE_CONTENT_ENV, capture_content_enabled
from sidecar.telemetry._span_queue import SpanQueueProcessor
from sidecar.telemetry._span_records import build_tracer_provider
from sidecar.telemetry._tracing import Tracing
from sidecar.upstream import _json as fast_json
from sidecar.upstream._provider import ProviderClient
from sidecar.upstream._tools import ToolClient

log = logging.getLogger(__name__)

SERVICE_NAME = sidecar_pb2.DESCRIPTOR.services_by_name["Sidecar"].full_name
# room for the request's framing beyond its content, so content just over max_request_bytes
# gets our INVALID_ARGUMENT rather than gRPC's RESOURCE_EXHAUSTED
RECEIVE_SLACK_BYTES = 64 * 1024
HTTP_POOL_LIMIT = 512
TELEMETRY_FLUSH_TIMEOUT_S = 5.0
TRACER_SHUTDOWN_TIMEOUT_S = 5.0


class SidecarError(RuntimeError):
    """The sidecar could not start."""


class _State(enum.Enum):
    NEW = "new"
    STARTED = "started"
    STOPPED = "stopped"


def _package_version() -> str:
    try:
        return importlib.metadata.version("outrider")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _default_sidecar_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Sidecar:
    """One sidecar: `async with Sidecar(config) as s: ...` or `await start()` / `await stop()`."""

    def __init__(
        self, config: SidecarConfig, *, clock: Clock | None = None, sidecar_id: str | None = None
    ) -> None:
        self.config = config
        self.sidecar_id = sidecar_id or _default_sidecar_id()
        self._clock = clock if clock is not None else SystemClock()
        self.metrics = SidecarMetrics()
        self.versions = build_versions(config)
        self.router = Router(config.agent, config.stable_version_id, self.versions.keys())
        self.flags = FlagBook(config.agent, config.flags)
        if not config.has_session_key:
            log.warning(
                "sidecar: no session key (%s is not set): a random one is used, so sessions will "
                "not survive a restart or be honoured by other replicas of %s",
                config.session_key_env or "session_key_env",
                config.agent,
            )
        self.codec = SessionCodec(
            config.session_key(), self._clock, config.session_ttl, config.max_session_duration
        )
        client_id = f"outrider-sidecar-{self.sidecar_id}"
        self.telemetry = TelemetryProducer(
            config.kafka.bootstrap_servers,
            config.telemetry_queue_size,
            self.metrics,
            client_id=client_id,
            spill_dir=config.telemetry.spill_path(config.agent),
            spill_max_bytes=config.telemetry.spill_max_bytes,
            spill_fsync=config.telemetry.spill_fsync,
            enabled=config.telemetry.enabled,
        )
        self.drain = DrainTracker(
            self.router,
            agent=config.agent,
            sidecar_id=self.sidecar_id,
            clock=self._clock,
            metrics=self.metrics,
            telemetry=self.telemetry,
        )
        self.global_quotas = GlobalQuotas(
            config.global_quotas,
            sidecar_id=self.sidecar_id,
            agent=config.agent,
            clock=self._clock,
            metrics=self.metrics,
            telemetry=self.telemetry,
            report_interval_s=config.usage_report_interval,
            shadow_max_share=config.shadow.max_tpm_share,
        )
        self.shadow: ShadowRunner | None = None
        self.smoke: SmokeRunner | None = None  # blue-green smoke tests (sidecar._smoke)
        try:
            verifier = config.control.verifier()
        except outrider.SigningKeyError as exc:
            raise SidecarError(f"control.public_keys: {exc}") from None
        control_state = config.control.state_path(config.telemetry.spill_path(config.agent), config.agent)
        self.control = ControlTailer(
            config.kafka.bootstrap_servers,
            self.router,
            self.metrics,
            verifier=verifier,
            client_id=client_id,
            quotas=self.global_quotas,
            state_path=control_state,
            flags=self.flags,
        )
        self.registry = VersionRegistry(
            config,
            self.versions,
            self.router,
            self.metrics,
            self.telemetry,
            verifier=verifier,
            clock=self._clock,
            sidecar_id=self.sidecar_id,
            client_id=client_id,
            state_path=registry_state_path(control_state),
            report_interval_s=config.control.versions_report_interval,
        )
        self._ready_task: asyncio.Task[None] | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._metrics_server: MetricsServer | None = None
        self._http: aiohttp.ClientSession | None = None
        self._server: grpc.aio.Server | None = None
        self.openai: OpenAIEndpoint | None = None  # the OpenAI-compatible endpoint, when configured
        self.tracer_provider: TracerProvider | None = None
        self._state = _State.NEW
        self._lock = asyncio.Lock()
        self.address = ""

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server is not None else None

    async def start(self) -> None:
        async with self._lock:
            if self._state is not _State.NEW:
                return
            try:
                await self._start()
            except BaseException:
                self._state = _State.STOPPED
                await self._stop(0)
                raise
            self._state = _State.STARTED

    async def _start(self) -> None:
        config = self.config
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=HTTP_POOL_LIMIT, ttl_dns_cache=300),
            trust_env=False,
            # one session serves every agent, user and tenant: an upstream's cookies must not
            # ride along on someone else's call (and no jar is cheaper per call)
            cookie_jar=aiohttp.DummyCookieJar(),
            **fast_json.aiohttp_session_options(),
        )
        self.upstreams = Upstreams(
            agent=config.agent,
            sidecar_id=self.sidecar_id,
            clock=self._clock,
            metrics=self.metrics,
            telemetry=self.telemetry,
        )
        tracing = Tracing(self._start_tracing(), capture_content_enabled())
        self.executor = Executor(
            ProviderClient(self._http), ToolClient(self._http), self.upstreams, self.global_quotas
        )
        recorder = Recorder(
            agent=config.agent,
            sidecar_id=self.sidecar_id,
            router=self.router,
            telemetry=self.telemetry,
            tracing=tracing,
            clock=self._clock,
            genai=self.metrics.genai,
        )
        session_flags = SessionFlags(self.flags)
        recorder.flags = session_flags
        self.shadow = ShadowRunner(
            config=config.shadow,
            router=self.router,
            versions=self.versions,
            executor=self.executor,
            recorder=recorder,
            metrics=self.metrics,
            judge=self._judge(tracing.capture_content),
        )
        self.shadow.flags = session_flags
        self.control.listeners.append(self.shadow.on_state)
        await self.shadow.start()
        pipeline = CallPipeline(
            agent=config.agent,
            versions=self.versions,
            router=self.router,
            codec=self.codec,
            executor=self.executor,
            user_quotas=UserQuotas(config.user_quotas, config.tenant_quotas, self._clock),
            safety=Safety(recorder=recorder, clock=self._clock, metrics=self.metrics),
            metrics=self.metrics,
            recorder=recorder,
            tools=ToolCalls(
                executor=self.executor,
                recorder=recorder,
                metrics=self.metrics,
                max_request_bytes=config.max_request_bytes,
                capture_content=tracing.capture_content,
            ),
            max_request_bytes=config.max_request_bytes,
            drain=self.drain,
            shadow=self.shadow,
            flags=session_flags,
        )
        self.smoke = SmokeRunner(pipeline=pipeline, router=self.router, recorder=recorder)
        self.control.listeners.append(self.smoke.on_state)
        await self.smoke.start()
        service = SidecarService(pipeline)
        server = grpc.aio.server(
            # requests_total, and undecodable requests answered INVALID_ARGUMENT
            interceptors=[RequestInterceptor(self.metrics)],
            options=[
                ("grpc.max_receive_message_length", config.max_request_bytes + RECEIVE_SLACK_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        sidecar_pb2_grpc.add_SidecarServicer_to_server(service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self._server = server
        listen = config.listen
        try:
            port = server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise SidecarError(f"listen: cannot bind {listen}: {exc}") from None
        if listen.startswith("unix:"):
            self.address = listen
        else:
            if port == 0:
                raise SidecarError(f"listen: cannot bind {listen}")
            self.address = f"{listen.rpartition(':')[0]}:{port}"
        await self.registry.load_persisted()  # before the control state: it may pin a pushed version
        await self.control.start()  # the persisted control state is in place before the first call
        await server.start()
        if config.openai_http is not None:
            try:
                self.openai = OpenAIEndpoint(pipeline, config.openai_http, config.max_request_bytes)
                await self.openai.start()
            except OpenAIHttpError as exc:
                raise SidecarError(str(exc)) from None
        await self.telemetry.start()
        await self.registry.start()
        await self.drain.start()
        await self.global_quotas.start()
        if config.metrics_port is not None:
            self._metrics_server = MetricsServer(self.metrics, str(config.metrics_host), config.metrics_port)
            await self._metrics_server.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._ready_task = asyncio.create_task(self._serving_when_ready(), name="outrider-sidecar-ready")

    async def _serving_when_ready(self) -> None:
        """Health goes SERVING once a control state is known, or after `control.ready_timeout`
        (warned and counted). Calls are served meanwhile: this gates health only."""
        timeout = self.config.control.ready_timeout
        try:
            await asyncio.wait_for(self.control.ready.wait(), timeout)
        except TimeoutError:
            self.metrics.control_wait_expired.inc()
            log.warning(
                "sidecar: no control state after %.1fs (Kafka unreachable and nothing persisted?); "
                "reporting SERVING with the configured stable %s until one arrives",
                timeout,
                self.config.stable,
            )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _judge(self, capture_content: bool) -> Judge | None:
        """The configured judge; it sees prompts and answers, so only with content capture on."""
        settings = self.config.shadow.judge
        if settings is None:
            return None
        if not capture_content:
            log.warning(
                "shadow.judge is configured but content capture is off (%s): the judge stays off, "
                "since it would send prompts and answers to %s",
                CAPTURE_CONTENT_ENV,
                settings.judge_name,
            )
            return None
        return Judge(settings)

    def _start_tracing(self) -> TracerProvider | None:
        """A TracerProvider whose spans go to `outrider.spans` through the telemetry queue (so
        they share its spill) and, when OTEL_EXPORTER_OTLP_*ENDPOINT is set, straight over
        OTLP too. None when telemetry is off (trace context is still passed on)."""
        if not self.config.telemetry.enabled:
            return None
        loop = asyncio.get_running_loop()
        provider = build_tracer_provider(
            resource_attributes={
                "outrider.agent": self.config.agent,
                "service.version": _package_version(),
                "service.instance.id": self.sidecar_id,
            },
        )
        # spans join the events' queue on the loop (no export thread: see _span_queue)
        provider.add_span_processor(SpanQueueProcessor(self.telemetry, loop))
        self.tracer_provider = provider
        self.metrics.watch_spans(self.telemetry.span_counts)
        return provider

    async def _stop_tracing(self) -> None:
        provider, self.tracer_provider = self.tracer_provider, None
        if provider is None:
            return
        # flushes the batch processors (their threads hand spans to the loop, so not on it)
        shutdown = asyncio.ensure_future(asyncio.to_thread(provider.shutdown))
        try:
            await asyncio.wait_for(asyncio.shield(shutdown), TRACER_SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            log.warning("tracing: span export did not finish within %.0fs", TRACER_SHUTDOWN_TIMEOUT_S)
        await asyncio.sleep(0)  # let the spans handed over by call_soon_threadsafe reach the queue

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving: NOT_SERVING, finish in-flight calls within `grace` s, flush telemetry, close."""
        async with self._lock:
            if self._state is _State.STOPPED:
                return
            self._state = _State.STOPPED
            await self._stop(self.config.shutdown_grace if grace is None else grace)

    async def _stop(self, grace: float) -> None:
        ready, self._ready_task = self._ready_task, None
        if ready is not None:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
        await self._health.enter_graceful_shutdown()
        if self.openai is not None:
            await self.openai.stop(grace)
        if self._server is not None:
            await self._server.stop(grace)
        if self.smoke is not None:
            await self.smoke.stop()
        if self.shadow is not None:
            await self.shadow.stop()
        await self._stop_tracing()
        await self.drain.stop()
        await self.control.stop()
        await self.registry.stop()
        await self.global_quotas.stop()
        await self.telemetry.stop(TELEMETRY_FLUSH_TIMEOUT_S)
        if self._http is not None:
            await self._http.close()
        if self._metrics_server is not None:
            await self._metrics_server.stop()

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def run(config: SidecarConfig) -> int:
    """Serve until SIGTERM or SIGINT, then stop within the configured grace; return the exit code."""
    sidecar = Sidecar(config)
    await sidecar.start()
    freeze_startup_objects()
    ids = ", ".join(f"{label}={vid}" for label, vid in config.version_ids().items())
    log.info(
        "sidecar %s for agent %s listening on %s (versions: %s; stable %s)%s",
        sidecar.sidecar_id,
        config.agent,
        sidecar.address,
        ids,
        config.stable,
        f"; metrics on :{sidecar.metrics_port}/metrics" if sidecar.metrics_port else "",
    )
    if sidecar.openai is not None:
        log.info("sidecar: openai %s", sidecar.openai.base_url)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
        log.info("sidecar: stopping (grace %.1fs)", config.shutdown_grace)
    finally:
        for sig in signals:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await sidecar.stop(config.shutdown_grace)
    return 0
