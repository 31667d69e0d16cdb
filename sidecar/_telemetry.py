"""Events to Kafka without ever making a request wait for Kafka.

`emit` puts the event on a bounded asyncio.Queue with `put_nowait`; when the queue is full
the event is dropped and counted (`outrider_sidecar_telemetry_dropped_total{reason}`), with
a rate-limited log line. One owned background task starts an AIOKafkaProducer, retrying
with capped exponential backoff while Kafka is unreachable (the sidecar serves meanwhile),
and sends what is queued in batches. `stop(timeout)` flushes what it can within the
timeout and counts the rest as dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

import outrider
from outrider.v1 import events_pb2
from sidecar._metrics import SidecarMetrics

log = logging.getLogger(__name__)

BATCH_MAX = 500
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
DROP_LOG_INTERVAL_S = 10.0
PRODUCER_REQUEST_TIMEOUT_MS = 10_000


def new_event_id() -> str:
    return uuid.uuid4().hex


class TelemetryProducer:
    """Bounded queue in front of one Kafka producer, owned by a background task."""

    def __init__(
        self,
        bootstrap_servers: str,
        queue_size: int,
        metrics: SidecarMetrics,
        *,
        client_id: str = "outrider-sidecar",
    ) -> None:
        self._bootstrap = bootstrap_servers
        self._client_id = client_id
        self._queue: asyncio.Queue[events_pb2.Event] = asyncio.Queue(maxsize=queue_size)
        self._metrics = metrics
        self._dropped = metrics.telemetry_dropped.labels("queue_full")
        self._sent = metrics.telemetry_sent
        metrics.telemetry_queue_depth.set_function(self._queue.qsize)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._unlogged_drops = 0
        self._last_drop_log = 0.0
        self.connected = False

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def emit(self, event: events_pb2.Event) -> bool:
        """Queue `event` for Kafka; never blocks. False (and counted) if it had to be dropped."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._dropped.inc()
            self._unlogged_drops += 1
            now = time.monotonic()
            if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
                log.warning(
                    "telemetry queue full (%d): dropped %d event(s)",
                    self._queue.maxsize,
                    self._unlogged_drops,
                )
                self._last_drop_log, self._unlogged_drops = now, 0
            return False
        if not self._wake.is_set():
            self._wake.set()
        return True

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outrider-telemetry")

    async def stop(self, flush_s: float = 5.0) -> None:
        """Flush what is queued within `flush_s` seconds; what is left is counted as dropped."""
        task = self._task
        if task is None or self._closing.is_set():
            return
        self._closing.set()
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), flush_s)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except Exception:
            log.exception("telemetry task failed")
        left = 0
        while not self._queue.empty():
            self._queue.get_nowait()
            left += 1
        if left:
            self._metrics.telemetry_dropped.labels("shutdown").inc(left)
            log.warning("telemetry: %d event(s) not sent before shutdown", left)

    async def _sleep_unless_closing(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _connect(self) -> AIOKafkaProducer | None:
        """A started producer, retrying with backoff; None if closing before Kafka answered."""
        backoff = BACKOFF_INITIAL_S
        attempt = 0
        while not self._closing.is_set():
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                client_id=self._client_id,
                enable_idempotence=False,
                acks="all",
                linger_ms=5,
                request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
            )
            try:
                await producer.start()
            except KafkaError as exc:
                await producer.stop()
                attempt += 1
                level = logging.WARNING if attempt in (1, 10) or attempt % 100 == 0 else logging.DEBUG
                log.log(
                    level,
                    "telemetry: Kafka at %s unreachable (%s), attempt %d; retrying",
                    self._bootstrap,
                    type(exc).__name__,
                    attempt,
                )
                await self._sleep_unless_closing(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            log.info("telemetry: producing to %s at %s", outrider.EVENTS_TOPIC, self._bootstrap)
            self.connected = True
            return producer
        return None

    async def _run(self) -> None:
        producer = await self._connect()
        if producer is None:
            return
        try:
            while True:
                if self._queue.empty():
                    if self._closing.is_set():
                        break
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._send_batch(producer)
        finally:
            self.connected = False
            await producer.stop()  # flushes anything still in its buffers

    async def _send_batch(self, producer: AIOKafkaProducer) -> None:
        batch: list[events_pb2.Event] = []
        while len(batch) < BATCH_MAX and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        futures = []
        for event in batch:
            value, headers = outrider.encode_event(event)
            try:
                futures.append(
                    await producer.send(
                        outrider.EVENTS_TOPIC,
                        value=value,
                        key=outrider.agent_key(event.agent),
                        headers=headers,
                    )
                )
            except KafkaError as exc:
                self._metrics.telemetry_dropped.labels("send_failed").inc()
                log.warning("telemetry: send failed: %s", type(exc).__name__)
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = sum(1 for r in results if isinstance(r, BaseException))
        if failed:
            self._metrics.telemetry_dropped.labels("send_failed").inc(failed)
            log.warning("telemetry: %d event(s) failed to send", failed)
        self._sent.inc(len(results) - failed)
