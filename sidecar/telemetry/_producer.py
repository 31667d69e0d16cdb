"""Events and spans to Kafka without ever making a request wait for Kafka, and without losing
them while Kafka is away.

`emit` (events) and `emit_span` (finished spans, see `_span_queue`) put items on one bounded
queue (`_telemetry_queue`: never blocks, drops and counts when full). Everything else happens
in one owned background task, which takes batches off the queue (`LINGER_S` after the first
record arrives, so a batch holds several calls' records; encoding them in small slices
between requests) and then:

- Healthy (producer connected, spill empty): queued records are sent straight to Kafka in
  batches.
- A send fails or times out (a few seconds, `PRODUCER_REQUEST_TIMEOUT_MS`), or Kafka cannot be
  reached at all: the records go to the on-disk `SpillBuffer` instead, and so does every new
  record while the spill holds anything, so per-partition order is kept. The task probes
  Kafka by sending the spill's oldest batch, with capped backoff (tenacity's, `BACKOFF`);
  once that works it drains the spill in order, batch by batch, while new records keep
  being appended behind.
- The spill is bounded (`telemetry.spill_max_bytes`): when full the oldest records go first
  and are counted (`reason="spill_full"`).
- `stop(timeout)`: what is queued in memory is sent if Kafka is healthy, else persisted to
  the spill; whatever is left when the timeout runs out is persisted too. A sidecar started
  on the same spill directory sends what was persisted.

Spill I/O runs in `asyncio.to_thread`, from the background task only. Without a spill
directory (`telemetry.spill_dir: null`) records wait in memory until Kafka answers and those
that fail to send are dropped (`reason="send_failed"`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
)
from opentelemetry.sdk.trace import ReadableSpan

import outrider
from outrider.v1 import events_pb2
from sidecar.telemetry._bulk_send import BATCH_BYTES, send_in_batches
from sidecar.telemetry._lite_spans import LiteSpan
from sidecar.telemetry._metrics import SidecarMetrics, SpanCounts
from sidecar.telemetry._producer_policy import (
    LINGER_S,
    LINGER_UNTIL,
    PRODUCER_REQUEST_TIMEOUT_MS,
    PRODUCER_RETRY_BACKOFF_MS,
    SEND_RETRIES,
    SEND_RETRY_DELAY_S,
    SEND_TIMEOUT_S,
    SPILL_DIR_ALTERNATES,
    TOPIC_RECHECK_S,
    probe_delay,
    transient,
)
from sidecar.telemetry._spill import (
    DEFAULT_MAX_BYTES,
    DEFAULT_SEGMENT_BYTES,
    SpillBatch,
    SpillBuffer,
    SpillError,
    SpillLockedError,
    SpillRecord,
)
from sidecar.telemetry._telemetry_queue import BATCH_MAX, YIELD_EVERY, TelemetryQueue

log = logging.getLogger(__name__)


class TelemetryProducer:
    """Bounded queue in front of one Kafka producer and an on-disk spill, owned by a task."""

    def __init__(
        self,
        bootstrap_servers: str,
        queue_size: int,
        metrics: SidecarMetrics,
        *,
        client_id: str = "outrider-sidecar",
        spill_dir: Path | str | None = None,
        spill_max_bytes: int = DEFAULT_MAX_BYTES,
        spill_fsync: bool = False,
        enabled: bool = True,
    ) -> None:
        self._bootstrap = bootstrap_servers
        self._client_id = client_id
        self._enabled = enabled
        self._wake = asyncio.Event()
        self._queue = TelemetryQueue(queue_size, metrics, self._wake, enabled=enabled)
        self._metrics = metrics
        self._sent = metrics.telemetry_sent
        metrics.telemetry_spill_bytes.set_function(lambda: self._spill_pending_bytes)
        metrics.telemetry_spill_records.set_function(lambda: self._spill_pending_records)
        metrics.telemetry_kafka_up.set_function(lambda: 1 if self.healthy else 0)
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._spill_max_bytes = spill_max_bytes
        self._spill_fsync = spill_fsync
        self._spill: SpillBuffer | None = None
        self._spill_pending_bytes = 0
        self._spill_pending_records = 0
        self._spill_dropped_seen = 0
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._inflight: list[SpillRecord] = []  # taken off the queue, not yet sent or spilled
        self._missing_topics: set[str] = set()  # topics Kafka has no partitions for
        self._topics_checked_at = 0.0  # monotonic
        self._closing = asyncio.Event()
        self._next_probe = 0.0
        self._probe_failures = 0  # in a row: tenacity's attempt number for BACKOFF
        self.healthy = False  # the last send (or connect) worked
        # figures for operators and tests
        self.spilled_records = 0
        self.spill_high_water_bytes = 0
        self.last_outage_end: float | None = None  # monotonic time the spill last became empty

    @property
    def queue_depth(self) -> int:
        return self._queue.depth

    @property
    def connected(self) -> bool:
        return self._producer is not None

    @property
    def spill_directory(self) -> Path | None:
        """The directory in use (None until started, or when spilling is off or failed)."""
        return self._spill.directory if self._spill is not None else None

    @property
    def spill_pending_records(self) -> int:
        return self._spill_pending_records

    @property
    def spill_pending_bytes(self) -> int:
        return self._spill_pending_bytes

    def emit(self, event: events_pb2.Event) -> bool:
        """Number `event` and queue it for Kafka; never blocks (see `TelemetryQueue.emit`)."""
        return self._queue.emit(event)

    def emit_span(self, span: ReadableSpan | LiteSpan) -> bool:
        """Queue a finished span for `outrider.spans`; never blocks (see `SpanQueueProcessor`)."""
        return self._queue.emit_span(span)

    def span_counts(self) -> SpanCounts:
        return self._queue.span_counts()

    async def start(self) -> None:
        if self._task is None and self._enabled:
            self._task = asyncio.create_task(self._run(), name="outrider-telemetry")

    async def stop(self, flush_s: float = 5.0) -> None:
        """Send what is queued within `flush_s` seconds (or persist it to the spill when Kafka
        is away); what is left then is persisted too, or counted as dropped without a spill."""
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
        left = list(self._inflight)
        self._inflight = []
        left.extend(self._queue.take_all())
        if left and self._spill is not None:
            try:
                await self._spill_append(left)
                log.info("telemetry: persisted %d record(s) to %s", len(left), self._spill.directory)
                left = []
            except SpillError as exc:
                log.warning("telemetry: cannot persist to the spill: %s", exc)
        if left:
            self._metrics.telemetry_dropped.labels("shutdown").inc(len(left))
            log.warning("telemetry: %d record(s) not sent before shutdown", len(left))
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), SEND_TIMEOUT_S)
        spill, self._spill = self._spill, None
        if spill is not None:
            try:
                await asyncio.to_thread(spill.close)
            except SpillError as exc:
                log.warning("telemetry: closing the spill: %s", exc)

    # ---- the background task ---------------------------------------------------------------

    async def _run(self) -> None:
        await self._open_spill()
        while True:
            closing = self._closing.is_set()
            if self._producer is None and time.monotonic() >= self._next_probe and not closing:
                await self._connect_once()
                continue
            if not self._queue.empty() and (self._producer is not None or self._spill is not None):
                if not closing and self._queue.depth < LINGER_UNTIL:
                    # let a few calls' records gather: the per-batch work (a produce request,
                    # timers, task wake-ups) is then paid once for several calls
                    await asyncio.sleep(LINGER_S)
                await self._intake()
                continue
            if closing:
                return
            if (
                self._spill is not None
                and self._spill_pending_records
                and self._producer is not None
                and time.monotonic() >= self._next_probe
            ):
                await self._drain_one()
                continue
            await self._idle()

    async def _idle(self) -> None:
        """Sleep until something is queued, we are closing, or the next probe is due."""
        self._wake.clear()
        can_intake = self._producer is not None or self._spill is not None
        if (can_intake and not self._queue.empty()) or self._closing.is_set():
            return
        waiting_for_probe = self._producer is None or self._spill_pending_records > 0
        delay = max(0.0, self._next_probe - time.monotonic()) if waiting_for_probe else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _intake(self) -> None:
        """Move one batch off the queue: straight to Kafka when healthy and nothing is spilled
        (order), else onto the spill."""
        batch: list[SpillRecord] = []
        self._inflight = batch  # filled in place: stop() persists it if cancelled meanwhile
        await self._queue.take_batch(batch)
        direct = self._producer is not None and (
            self._spill is None or (self.healthy and self._spill_pending_records == 0)
        )
        if direct:
            sent = await self._send(batch)
            if sent == len(batch):
                self._inflight = []
                return
            rest = batch[sent:]
            if self._spill is None:
                self._inflight = []
                self._metrics.telemetry_dropped.labels("send_failed").inc(len(rest))
                log.warning("telemetry: %d record(s) failed to send", len(rest))
                return
            self._inflight = rest
            batch = rest
        try:
            await self._spill_append(batch)
        except SpillError as exc:
            self._metrics.telemetry_dropped.labels("spill_error").inc(len(batch))
            log.warning("telemetry: spill write failed, %d record(s) lost: %s", len(batch), exc)
        self._inflight = []

    async def _drain_one(self) -> None:
        """Send the spill's oldest batch; ack it when all of it was delivered."""
        spill = self._spill
        assert spill is not None
        try:
            batch: SpillBatch = await asyncio.to_thread(spill.peek, BATCH_MAX)
        except SpillError as exc:
            log.warning("telemetry: spill read failed: %s", exc)
            self._schedule_probe()
            return
        if not batch.records:
            await self._refresh_spill_stats()
            return
        sent = await self._send(list(batch.records))
        if sent < len(batch):
            return  # resent from the start of the batch next time (consumers dedupe)
        try:
            await asyncio.to_thread(spill.ack, batch)
        except SpillError as exc:
            log.warning("telemetry: spill ack failed: %s", exc)
        await self._refresh_spill_stats()
        if not self._spill_pending_records:
            self.last_outage_end = time.monotonic()
            log.info("telemetry: spill drained")

    async def _send(self, records: Sequence[SpillRecord]) -> int:
        """Send in order; return how many leading records Kafka acknowledged."""
        producer = self._producer
        recheck_due = time.monotonic() - self._topics_checked_at >= TOPIC_RECHECK_S
        if self._missing_topics and producer is not None and recheck_due:
            await self._check_topics(producer)  # the topic may have been created since
        missing = self._missing_topics
        if not missing:
            return await self._deliver(records)
        kept = [r for r in records if r.topic not in missing]
        self._metrics.telemetry_dropped.labels("no_topic").inc(len(records) - len(kept))
        delivered = await self._deliver(kept)
        # the leading records now handled: the dropped ones, and the kept ones Kafka acked
        done = taken = 0
        for r in records:
            if r.topic not in missing:
                if taken == delivered:
                    break
                taken += 1
            done += 1
        return done

    async def _deliver(self, records: Sequence[SpillRecord]) -> int:
        producer = self._producer
        if producer is None or not records:
            return 0
        ok = 0
        failure: BaseException | None = None
        for attempt in range(1 + SEND_RETRIES):
            rest = records[ok:]
            try:
                results = await asyncio.wait_for(
                    send_in_batches(producer, rest, yield_every=YIELD_EVERY), SEND_TIMEOUT_S
                )
            except (TimeoutError, KafkaError) as exc:
                results = [exc]
            failure = None
            for result in results:
                if isinstance(result, BaseException):
                    failure = result
                    break
                ok += 1
            if failure is None or not transient(failure) or attempt == SEND_RETRIES:
                break
            # e.g. NotLeaderForPartition while a topic is being created: not an outage
            await asyncio.sleep(SEND_RETRY_DELAY_S)
        self._sent.inc(ok)
        if failure is not None:
            if self.healthy:
                log.warning(
                    "telemetry: Kafka at %s failed (%s); %s",
                    self._bootstrap,
                    type(failure).__name__,
                    "spilling to disk" if self._spill is not None else "records are dropped",
                )
            self.healthy = False
            self._schedule_probe()
        else:
            if not self.healthy:
                log.info("telemetry: Kafka at %s is back", self._bootstrap)
            self.healthy = True
            self._probe_failures = 0
            self._next_probe = 0.0
        return ok

    def _schedule_probe(self) -> None:
        self._probe_failures += 1
        self._next_probe = time.monotonic() + probe_delay(self._probe_failures)

    async def _connect_once(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            enable_idempotence=False,  # the embedded broker has no idempotent producer
            acks="all",
            linger_ms=5,
            max_batch_size=BATCH_BYTES,
            request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
            retry_backoff_ms=PRODUCER_RETRY_BACKOFF_MS,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            log.log(
                logging.WARNING if self._probe_failures == 0 else logging.DEBUG,
                "telemetry: Kafka at %s unreachable (%s); retrying",
                self._bootstrap,
                type(exc).__name__,
            )
            self._schedule_probe()
            return
        if not await self._check_topics(producer):
            with contextlib.suppress(Exception):
                await producer.stop()
            self._schedule_probe()
            return
        log.info("telemetry: producing to Kafka at %s", self._bootstrap)
        self._producer = producer
        self.healthy = True
        self._probe_failures = 0
        self._next_probe = 0.0

    async def _check_topics(self, producer: AIOKafkaProducer) -> bool:
        """Learn both topics' partitions now (creating them where the broker auto-creates), so
        a first send does not stall on it. Without the events topic nothing can be sent (False:
        retry later); without the spans topic span records are dropped and counted, so they
        cannot hold events up (checked again every TOPIC_RECHECK_S while missing)."""
        self._topics_checked_at = time.monotonic()
        for topic in (outrider.EVENTS_TOPIC, outrider.SPANS_TOPIC):
            try:
                await asyncio.wait_for(producer.partitions_for(topic), SEND_TIMEOUT_S)
            except (TimeoutError, KafkaError) as exc:
                if topic == outrider.EVENTS_TOPIC:
                    log.warning("telemetry: topic %s unavailable (%s); retrying", topic, type(exc).__name__)
                    return False
                if topic not in self._missing_topics:
                    log.error(  # noqa: TRY400 - the cause is named; a traceback adds nothing
                        "telemetry: topic %s unavailable (%s): spans are dropped until it exists",
                        topic,
                        type(exc).__name__,
                    )
                self._missing_topics.add(topic)
            else:
                self._missing_topics.discard(topic)
        return True

    # ---- the spill ---------------------------------------------------------------------------

    async def _open_spill(self) -> None:
        if self._spill_dir is None:
            return
        segment = min(DEFAULT_SEGMENT_BYTES, max(self._spill_max_bytes // 8, 4096))
        for n in range(SPILL_DIR_ALTERNATES + 1):
            base = self._spill_dir
            directory = base if n == 0 else base.with_name(f"{base.name}.{n}")
            spill = SpillBuffer(directory, self._spill_max_bytes, segment, fsync=self._spill_fsync)
            try:
                await asyncio.to_thread(spill.open)
            except SpillLockedError:
                continue
            except SpillError as exc:
                log.warning("telemetry: no spill (%s): records wait in memory only", exc)
                return
            self._spill = spill
            await self._refresh_spill_stats()
            if self._spill_pending_records:
                log.info(
                    "telemetry: %d record(s) persisted in %s will be sent",
                    self._spill_pending_records,
                    directory,
                )
            return
        log.warning("telemetry: every spill directory near %s is in use: no spill", self._spill_dir)

    async def _spill_append(self, records: Sequence[SpillRecord]) -> None:
        spill = self._spill
        assert spill is not None
        await asyncio.to_thread(spill.append, records)
        await self._refresh_spill_stats(added=len(records))

    async def _refresh_spill_stats(self, *, added: int = 0) -> None:
        """Read the spill's counters; every figure changes at once (no await in between)."""
        spill = self._spill
        if spill is None:
            return
        stats = await asyncio.to_thread(spill.stats)
        self.spilled_records += added
        self._metrics.telemetry_spilled.inc(added)
        self._spill_pending_bytes = stats.pending_bytes
        self._spill_pending_records = stats.pending_records
        self.spill_high_water_bytes = max(self.spill_high_water_bytes, stats.pending_bytes)
        dropped = stats.dropped_records - self._spill_dropped_seen
        if dropped > 0:
            self._spill_dropped_seen = stats.dropped_records
            self._metrics.telemetry_dropped.labels("spill_full").inc(dropped)
            log.warning("telemetry: spill full, dropped the %d oldest record(s)", dropped)
