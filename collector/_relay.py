"""Relay `outrider.spans` to an OTLP gRPC endpoint (Jaeger, an OpenTelemetry Collector).

A consumer-group member reads records (each an OTLP `ExportTraceServiceRequest`, keyed by
trace id), merges them into batches (flushed at `batch_max` spans, `batch_max_bytes`, or
`flush_interval_s` after the first record) and sends each batch with
`TraceService/Export`.

Delivery is at least once: offsets are committed only after the receiver accepted the
batch. A failed send is retried inside one deadline (`export_timeout_s`), each attempt
getting the time left, with exponential backoff and jitter over the retryable codes (as the
OTLP exporters do; a server's `RetryInfo` hint is honoured), the sleep cut short by stop.
When the deadline runs out the batch is counted in `failed_batches`, the consumer seeks
back to its first record and, after a pause, reads it again: nothing is skipped while the
receiver is down. Only a batch the receiver rejects as malformed (INVALID_ARGUMENT) is
skipped, counted in `rejected_batches`.

This module is the consumer side (joining the group, fetching, batching, committing,
rewinding); `collector._otlp_export` is the exporter side (decoding records, the gRPC
channel, the export and its retries). Every retry goes through tenacity with the same
jittered exponential backoff (`backoff_initial_s` doubling up to `backoff_max_s`, ±20 %),
each wait cut short by stop: joining the group while Kafka is unreachable, a fetch that
failed, a batch that was not delivered (the failure count starts again after a round that
went through), and the export inside its deadline.

Records that are not OTLP trace requests are counted in `undecodable`, handed to the
`on_undecodable(record, reason)` hook (for a dead-letter topic) and skipped. A batch re-read
after a failure passes its undecodable records to the hook again.

If a rebalance takes a partition away mid-batch, the batch is still sent; its commit may
fail (logged) and the new owner re-sends those spans: duplicates, never loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import grpc
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

import outrider
from collector._otlp_export import (
    RETRYABLE_CODES,
    ExportOutcome,
    JitteredBackoff,
    OtlpTraceExporter,
    decode_spans_record,
    pause,
)

__all__ = [
    "DEFAULT_BATCH_MAX_BYTES",
    "DEFAULT_GROUP_ID",
    "RETRYABLE_CODES",
    "SpanBatch",
    "SpanRelay",
    "UndecodableHook",
    "decode_spans_record",
]

log = logging.getLogger(__name__)

DEFAULT_GROUP_ID: Final = "outrider-span-relay"
# well under the 4 MiB default max receive size of gRPC servers (Jaeger, the OTel Collector)
DEFAULT_BATCH_MAX_BYTES: Final = 3 * 1024 * 1024
_POLL_MS: Final = 200
_FINAL_FLUSH_TIMEOUT_S: Final = 2.0

UndecodableHook = Callable[[Any, str], Awaitable[None] | None]


class _Undelivered(Exception):
    """A batch was not delivered; the consumer has been rewound to it."""


# --- batching (pure) ---------------------------------------------------------------------


@dataclass
class SpanBatch:
    """Records waiting to be sent together, and the offsets their send covers (pure)."""

    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    spans: int = 0
    nbytes: int = 0
    records: int = 0
    first: dict[Hashable, int] = field(default_factory=dict)  # partition -> first offset
    next: dict[Hashable, int] = field(default_factory=dict)  # partition -> offset to commit
    opened_at: float | None = None

    def add(
        self,
        partition: Hashable,
        offset: int,
        request: ExportTraceServiceRequest | None,
        spans: int,
        nbytes: int,
        now: float,
    ) -> None:
        """Add one record (request None: an undecodable record, only its offset counts)."""
        if request is not None:
            self.requests.append(request)
            self.spans += spans
            self.nbytes += nbytes
        self.records += 1
        self.first.setdefault(partition, offset)
        self.next[partition] = max(self.next.get(partition, 0), offset + 1)
        if self.opened_at is None:
            self.opened_at = now

    def would_overflow(self, spans: int, nbytes: int, max_spans: int, max_bytes: int) -> bool:
        return self.spans > 0 and (self.spans + spans > max_spans or self.nbytes + nbytes > max_bytes)

    def due(self, now: float, max_spans: int, max_bytes: int, interval_s: float) -> bool:
        if self.records == 0:
            return False
        if self.spans >= max_spans or self.nbytes >= max_bytes:
            return True
        return self.opened_at is not None and now - self.opened_at >= interval_s

    def time_left(self, now: float, interval_s: float) -> float | None:
        """Seconds until the interval flush, None when empty."""
        if self.opened_at is None:
            return None
        return max(0.0, self.opened_at + interval_s - now)

    def request(self) -> ExportTraceServiceRequest:
        merged = ExportTraceServiceRequest()
        for request in self.requests:
            merged.resource_spans.extend(request.resource_spans)
        return merged


# --- the relay ---------------------------------------------------------------------------


class SpanRelay:
    """Consumes `outrider.spans` and exports it, batched, to an OTLP gRPC endpoint."""

    def __init__(
        self,
        bootstrap_servers: str,
        otlp_endpoint: str,
        *,
        group_id: str = DEFAULT_GROUP_ID,
        topic: str = outrider.SPANS_TOPIC,
        batch_max: int = 512,
        batch_max_bytes: int = DEFAULT_BATCH_MAX_BYTES,
        flush_interval_s: float = 1.0,
        export_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 5.0,
        otlp_headers: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        on_undecodable: UndecodableHook | None = None,
        stop_timeout_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        for name, number in (
            ("batch_max", batch_max),
            ("batch_max_bytes", batch_max_bytes),
            ("flush_interval_s", flush_interval_s),
            ("export_timeout_s", export_timeout_s),
            ("backoff_initial_s", backoff_initial_s),
            ("backoff_max_s", backoff_max_s),
        ):
            if number <= 0:
                raise ValueError(f"{name} must be positive, got {number!r}")
        self._stopping = asyncio.Event()
        self._backoff = JitteredBackoff(backoff_initial_s, backoff_max_s, rng or random.Random())
        self._exporter = OtlpTraceExporter(
            otlp_endpoint,
            headers=otlp_headers,
            credentials=credentials,
            backoff=self._backoff,
            stopping=self._stopping,
            counters=self,
        )
        self._bootstrap = bootstrap_servers
        self._group_id = group_id
        self._topic = topic
        self._batch_max = batch_max
        self._batch_max_bytes = batch_max_bytes
        self._flush_interval_s = flush_interval_s
        self._export_timeout_s = export_timeout_s
        self._on_undecodable = on_undecodable
        self._stop_timeout_s = stop_timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._batch = SpanBatch()
        # counters
        self.exported_spans = 0
        self.exported_batches = 0
        self.failed_batches = 0
        self.rejected_batches = 0
        self.rejected_spans = 0  # partial success: spans the receiver dropped
        self.undecodable = 0
        self.retries = 0
        self.commit_failures = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start relaying; returns at once (a second call does nothing). The owned task joins
        the consumer group, retrying with backoff while Kafka is unreachable."""
        if self._task is not None:
            return
        self._stopping.clear()
        self._exporter.open()
        self._task = asyncio.create_task(self._main(), name="outrider-span-relay")
        self._task.add_done_callback(self._log_crash)

    @property
    def connected(self) -> bool:
        """Whether the consumer has started (the group join itself follows on first fetch)."""
        return self._consumer is not None

    async def stop(self) -> None:
        """Finish (one last send of what is batched, within a short deadline) and close."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        if self._consumer is None:
            task.cancel()  # still connecting: nothing to finish
        else:
            done, _ = await asyncio.wait({task}, timeout=self._stop_timeout_s)
            if not done:
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # crash already logged
            await task
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()
        await self._exporter.close()
        self._batch = SpanBatch()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @staticmethod
    def _log_crash(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("span relay stopped on an unexpected error", exc_info=task.exception())

    # the loop -----------------------------------------------------------------------------

    async def _main(self) -> None:
        await self._connect()
        if self._consumer is not None:
            log.info("relaying %s to OTLP endpoint %s", self._topic, self._exporter.target)
            await self._run()

    def _retrying(
        self,
        retry: type[BaseException] | tuple[type[BaseException], ...],
        before_sleep: Callable[[RetryCallState], None] | None = None,
    ) -> AsyncRetrying:
        """Retry forever with the relay's backoff, each wait cut short by stop (an attempt
        that starts after stop returns at once)."""
        return AsyncRetrying(
            retry=retry_if_exception_type(retry),
            wait=self._backoff,
            sleep=lambda seconds: pause(self._stopping, seconds),
            before_sleep=before_sleep,
            reraise=True,
        )

    async def _connect(self) -> None:
        async for attempt in self._retrying(KafkaError, self._cannot_connect):
            with attempt:
                if not self._stopping.is_set():
                    self._consumer = await self._start_consumer()

    async def _start_consumer(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            self._topic,
            bootstrap_servers=self._bootstrap,
            group_id=self._group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    @staticmethod
    def _cannot_connect(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning("span relay cannot reach Kafka (%s); retrying in %.1fs", exc, state.upcoming_sleep)

    async def _run(self) -> None:
        assert self._consumer is not None
        rounds = self._retrying((KafkaError, _Undelivered))
        while not self._stopping.is_set():
            # a fresh count of failures (so the shortest backoff) once a round goes through
            async for attempt in rounds:
                with attempt:
                    await self._round()
        if self._batch.records:
            await self._flush(retry=False)

    async def _round(self) -> None:
        """One fetch, and the sends it makes due. Raises KafkaError when the fetch failed and
        _Undelivered when a batch was not delivered (the consumer rewound to it)."""
        if self._stopping.is_set():
            return
        loop = asyncio.get_running_loop()
        left = self._batch.time_left(loop.time(), self._flush_interval_s)
        timeout_ms = _POLL_MS if left is None else min(_POLL_MS, int(left * 1000))
        try:
            fetched = await self._fetch(timeout_ms)
        except KafkaError as exc:
            log.warning("fetching %s failed: %s; retrying", self._topic, exc)
            raise
        items = [(tp, record) for tp, records in fetched.items() for record in records]
        if not await self._take(items):
            raise _Undelivered
        due = self._batch.due(loop.time(), self._batch_max, self._batch_max_bytes, self._flush_interval_s)
        if due and not await self._flush(retry=True):
            self._rewind([])
            raise _Undelivered

    async def _fetch(self, timeout_ms: int) -> dict[Any, list[Any]]:
        """getmany, abandoned when stop is asked (a first group join can take seconds);
        nothing is lost: records not yet returned are fetched again from the same offsets."""
        assert self._consumer is not None
        fetch = asyncio.ensure_future(
            self._consumer.getmany(timeout_ms=timeout_ms, max_records=self._batch_max)
        )
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in (fetch, stop):
                if not future.done():
                    future.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await future
        return fetch.result() if not fetch.cancelled() else {}

    async def _take(self, items: list[tuple[Any, Any]]) -> bool:
        """Add fetched records to the batch, sending it first whenever it would overflow.
        False when a send failed: the consumer has been rewound and the batch dropped."""
        loop = asyncio.get_running_loop()
        for index, (tp, record) in enumerate(items):
            try:
                request, spans = decode_spans_record(record.value, record.headers)
            except outrider.DecodeError as exc:
                await self._undecodable(record, str(exc))
                self._batch.add(tp, record.offset, None, 0, 0, loop.time())
                continue
            nbytes = len(record.value)
            overflow = self._batch.would_overflow(spans, nbytes, self._batch_max, self._batch_max_bytes)
            if overflow and not await self._flush(retry=True):
                self._rewind(items[index:])
                return False
            self._batch.add(tp, record.offset, request, spans, nbytes, loop.time())
        return True

    async def _flush(self, *, retry: bool) -> bool:
        """Send the batch; commit its offsets if it was delivered (or rejected as malformed).
        False if it was not delivered: the batch is kept for the caller to rewind to."""
        batch = self._batch
        outcome = ExportOutcome.DELIVERED
        if batch.spans:
            timeout = self._export_timeout_s if retry else min(self._export_timeout_s, _FINAL_FLUSH_TIMEOUT_S)
            outcome = await self._exporter.export(batch.request(), timeout_s=timeout, retry=retry)
        if outcome is ExportOutcome.DELIVERED:
            self.exported_spans += batch.spans
            self.exported_batches += 1 if batch.spans else 0
        elif outcome is ExportOutcome.REJECTED:
            self.rejected_batches += 1
        else:
            self.failed_batches += 1
            return False  # the batch stays; the caller rewinds to it
        self._batch = SpanBatch()
        await self._commit(batch.next)
        return True

    def _rewind(self, unread: Iterable[tuple[Any, Any]]) -> None:
        """Seek back to the batch's first records (and the fetched ones not yet added)."""
        assert self._consumer is not None
        positions = dict(self._batch.first)
        for tp, record in unread:
            positions.setdefault(tp, record.offset)
        assigned = self._consumer.assignment()
        for tp, offset in positions.items():
            if tp in assigned:
                self._consumer.seek(tp, offset)
        self._batch = SpanBatch()

    async def _commit(self, offsets: dict[Hashable, int]) -> None:
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(dict(offsets))
        except KafkaError as exc:  # the records come again: duplicates, not loss
            self.commit_failures += 1
            log.warning("committing %s offsets failed: %s", self._topic, exc)

    async def _undecodable(self, record: Any, reason: str) -> None:
        self.undecodable += 1
        log.debug(
            "skipping undecodable %s record %s@%s: %s",
            self._topic,
            getattr(record, "partition", "?"),
            getattr(record, "offset", "?"),
            reason,
        )
        if self._on_undecodable is None:
            return
        try:
            result = self._on_undecodable(record, reason)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("the on_undecodable hook failed")
