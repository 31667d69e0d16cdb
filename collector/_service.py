"""The collector process: wires the consumer, windows, controllers, admin API and metrics.

Start: create topics, load the checkpoint (windows, totals, offsets), read
`outrider.control` back (rollout and quota generations continue from it) while joining the
events consumer group, start the control and dead-letter producers, the notifier, the consume loop, the
tick loop and (with quotas configured) the grant loop, serve metrics and the admin API.
Stop (idempotent) runs the reverse: admin server, grant and tick loops, the notifier (queued
webhooks get a few seconds), consume loop (it
finishes its batch), checkpoint and offset commit, consumer, producers, metrics server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

from collector._admin import AdminServer
from collector._book import EvidenceBook
from collector._checkpoint import CheckpointStore
from collector._consumer import EventConsumer
from collector._control import ControlHistory, ControlPublisher, ensure_topics, read_control_history
from collector._deadletter import DeadLetter, DeadLetterWriter
from collector._granter import QuotaGranter
from collector._ingest import Ingestor
from collector._manager import RolloutManager
from collector._metrics import CollectorMetrics, MetricsServer
from collector._notify import Notifier
from collector._quota_book import QuotaBook
from collector._relay import SpanRelay
from collector._settings import CollectorSettings, otlp_endpoint
from collector._windows import RollingWindows
from outrider.clock import Clock, SystemClock

log = logging.getLogger(__name__)

_CONSUME_STOP_S = 5.0  # the consume loop's last poll and batch (dead letters included)


class Collector:
    """The control plane of one deployment. Use `async with Collector(settings):`."""

    def __init__(self, settings: CollectorSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.metrics = CollectorMetrics()
        self.windows = RollingWindows(settings.bucket_s, settings.retention_s, settings.dedupe_cache_size)
        self._publisher = ControlPublisher(settings.kafka_bootstrap, settings.publish_timeout_s)
        self.evidence = EvidenceBook()
        self.notifier = Notifier(settings.notify, self.metrics)
        self.rollouts = RolloutManager(
            self._publisher,
            self.windows,
            self.metrics,
            self.clock,
            self.evidence,
            settings.retention_s,
            listener=self.notifier,
        )
        book = QuotaBook(settings.quotas, settings.lease_ttl_s, settings.grant_ttl_s, self.clock)
        self.quotas = QuotaGranter(book, self._publisher, self.metrics)
        self._admin = AdminServer(self.rollouts, settings.admin_listen)
        self._metrics_server = (
            MetricsServer(self.metrics.registry, settings.metrics_host, settings.metrics_port)
            if settings.metrics_port is not None
            else None
        )
        self._ingestor = Ingestor(
            self.windows, self.metrics, self.quotas, self.evidence, self.rollouts.sightings
        )
        self._deadletter = DeadLetterWriter(
            settings.kafka_bootstrap, settings.publish_timeout_s, self.metrics
        )
        self.checkpoints = (
            CheckpointStore(settings.state_dir, settings.group_id) if settings.state_dir is not None else None
        )
        self._consumer: EventConsumer | None = None
        endpoint = otlp_endpoint(settings)
        self.relay = (
            SpanRelay(
                settings.kafka_bootstrap,
                endpoint,
                group_id=f"{settings.group_id}-spans",
                on_undecodable=self._dead_letter_span,
            )
            if endpoint is not None
            else None
        )
        if self.relay is not None:
            self.metrics.watch_relay(self.relay)
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopped = False

    @property
    def admin_address(self) -> str:
        """The admin API's bound "host:port" (after start)."""
        if not self._admin.address:
            raise RuntimeError("the collector is not started")
        return self._admin.address

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.bound_port if self._metrics_server is not None else None

    async def start(self) -> None:
        if self._started:
            return
        if self._stopped:
            raise RuntimeError("a stopped collector cannot be started again")
        self._started = True
        s = self.settings
        try:
            await ensure_topics(s.kafka_bootstrap, s.topic_partitions)
            self._consumer = EventConsumer(
                s.kafka_bootstrap,
                s.group_id,
                self._ingestor,
                self.clock,
                s.max_batch_records,
                deadletter=self._deadletter,
                store=self.checkpoints,
                checkpoint_interval_s=s.checkpoint_interval_s,
                session_timeout_ms=s.session_timeout_ms,
                heartbeat_interval_ms=s.heartbeat_interval_ms,
            )
            self._consumer.restore()  # before joining: assignment seeks to the checkpoint
            history = await self._recover_while_joining(self._consumer)
            self.rollouts.restore(history.rollouts)
            self.quotas.book.restore(history.quota_generations)
            await self._publisher.start()
            await self._deadletter.start()
            await self.notifier.start()
            if self.relay is not None:
                await self.relay.start()
            self._spawn(self._consumer.run(), "consume")
            self._spawn(self._tick_loop(), "tick")
            if self.quotas.book.resources:
                self._spawn(self._grant_loop(), "grant")
            if self._metrics_server is not None:
                await self._metrics_server.start()
            await self._admin.start()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "collector started: kafka %s, group %s, admin %s",
            s.kafka_bootstrap,
            s.group_id,
            self.admin_address,
        )

    async def _recover_while_joining(self, consumer: EventConsumer) -> ControlHistory:
        """Read the control topic back while the consumer joins its group (that takes seconds)."""
        s = self.settings
        joining = asyncio.create_task(consumer.start())
        try:
            return await read_control_history(s.kafka_bootstrap, s.recovery_idle_s, s.recovery_timeout_s)
        finally:
            await asyncio.wait([joining])  # settled either way before stop() may run
            if not joining.cancelled() and (error := joining.exception()) is not None:
                raise error

    async def _dead_letter_span(self, record: Any, reason: str) -> None:
        """The span relay's hook: an undecodable `outrider.spans` record goes to the dead letters."""
        letter = DeadLetter(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            list(record.headers or ()),
            reason,
        )
        await self._deadletter.write([letter])

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"collector-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("collector task %s died", task.get_name(), exc_info=task.exception())

    async def _tick_loop(self) -> None:
        while True:
            try:
                await self.rollouts.tick()
            except Exception:
                log.exception("rollout tick failed; trying again next tick")
            await asyncio.sleep(self.settings.tick_interval_s)

    async def _grant_loop(self) -> None:
        """Publish grants every grant interval, at a fixed rate. The first waits one interval,
        so the sidecars' reports (which come more often) have renewed their leases by then."""
        loop = asyncio.get_running_loop()
        interval = self.settings.grant_interval_s
        due = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                await self.quotas.tick()
            except Exception:
                log.exception("quota grant tick failed; trying again next interval")
            due += interval
            if due < loop.time():  # a tick overran: skip the missed beats rather than bunch up
                due = loop.time() + interval

    async def _settle(self, name: str, timeout_s: float) -> None:
        """Give a task that was asked to stop `timeout_s` to return; cancel it after that."""
        tasks = [t for t in self._tasks if t.get_name() == f"collector-{name}"]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        await self._cancel(name)

    async def _cancel(self, name: str) -> None:
        for task in [t for t in self._tasks if t.get_name() == f"collector-{name}"]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._tasks.discard(task)

    async def stop(self) -> None:
        """Stop everything in dependency order; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        await self._admin.stop()
        await self._cancel("grant")
        await self._cancel("tick")
        await self.notifier.stop()  # after the loop and the admin API that decide
        if self._consumer is not None:
            self._consumer.request_stop()
            await self._settle("consume", _CONSUME_STOP_S)
            await self._consumer.stop()  # checkpoints and commits what was processed
        await self._cancel("consume")
        if self.relay is not None:
            await self.relay.stop()  # before the dead-letter writer its hook uses
        await self._deadletter.stop()
        await self._publisher.stop()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        log.info("collector stopped")

    async def __aenter__(self) -> Collector:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def run(settings: CollectorSettings) -> int:
    """Run a collector until SIGTERM or SIGINT, then stop it cleanly. The exit code."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    try:
        async with Collector(settings) as collector:
            where = f"admin gRPC {collector.admin_address}"
            if collector.metrics_port is not None:
                where += f", metrics http://{settings.metrics_host}:{collector.metrics_port}/metrics"
            log.info("collector listening: %s", where)
            await stopping.wait()
            log.info("collector stopping")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0
