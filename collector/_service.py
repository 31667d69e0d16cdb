"""The collector process: wires the consumer, windows, controllers, admin API and metrics.

Start: create topics, read `outrider.control` back (rollout and quota generations continue
from it), start the control producer, join the events consumer group, start the tick loop
and (with quotas configured) the grant loop, serve metrics and the admin API. Stop
(idempotent) runs the reverse: admin server, grant and tick loops, consume loop, offset
commit and consumer, producer flush, metrics server.
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
from collector._clock import Clock, SystemClock
from collector._consumer import EventConsumer
from collector._control import ControlHistory, ControlPublisher, ensure_topics, read_control_history
from collector._granter import QuotaGranter
from collector._manager import RolloutManager
from collector._metrics import CollectorMetrics, MetricsServer
from collector._quota_book import QuotaBook
from collector._settings import CollectorSettings
from collector._windows import RollingWindows

log = logging.getLogger(__name__)


class Collector:
    """The control plane of one deployment. Use `async with Collector(settings):`."""

    def __init__(self, settings: CollectorSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.metrics = CollectorMetrics()
        self.windows = RollingWindows(settings.bucket_s, settings.retention_s, settings.dedupe_cache_size)
        self._publisher = ControlPublisher(settings.kafka_bootstrap, settings.publish_timeout_s)
        self.rollouts = RolloutManager(self._publisher, self.windows, self.metrics, self.clock)
        book = QuotaBook(settings.quotas, settings.lease_ttl_s, settings.grant_ttl_s, self.clock)
        self.quotas = QuotaGranter(book, self._publisher, self.metrics)
        self._admin = AdminServer(self.rollouts, settings.admin_listen)
        self._metrics_server = (
            MetricsServer(self.metrics.registry, settings.metrics_host, settings.metrics_port)
            if settings.metrics_port is not None
            else None
        )
        self._consumer: EventConsumer | None = None
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
                self.windows,
                self.metrics,
                self.clock,
                s.max_batch_records,
                self.quotas,
            )
            history = await self._recover_while_joining(self._consumer)
            self.rollouts.restore(history.rollouts)
            self.quotas.book.restore(history.quota_generations)
            await self._publisher.start()
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
        await self._cancel("consume")
        if self._consumer is not None:
            await self._consumer.stop()  # commits what was processed
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
