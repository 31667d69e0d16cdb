"""The telemetry producer's bounded in-memory queue, and the encoding of what it holds.

`emit` (events) and `emit_span` (finished spans, see `_span_queue`) put items on one bounded
asyncio.Queue with `put_nowait`; when the queue is full the item is dropped and counted
(`outrider_sidecar_telemetry_dropped_total{reason="queue_full"}`), with a rate-limited log
line. The producer's background task takes batches off it with `take_batch`, which encodes
them (events to `outrider.events` keyed by agent; spans to `outrider.spans` as OTLP protobuf,
one record per trace, keyed by trace id) in small slices, yielding to the loop in between.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan

import outrider
from outrider.v1 import events_pb2
from sidecar.telemetry._lite_spans import LiteSpan
from sidecar.telemetry._metrics import SidecarMetrics, SpanCounts
from sidecar.telemetry._span_records import encode_span_records
from sidecar.telemetry._spill import SpillRecord

log = logging.getLogger(__name__)

BATCH_MAX = 500
# the background task yields to the loop this often while encoding or sending a batch, so a
# burst (a span batch, a spill drain) never holds requests up for long
YIELD_EVERY = 25
SPAN_CHUNK = 16  # spans encoded between two yields to the loop
DROP_LOG_INTERVAL_S = 10.0

RawRecord = tuple[str, bytes | None, bytes, Sequence[tuple[str, bytes]]]  # topic, key, value, headers
AnySpan = ReadableSpan | LiteSpan
QueueItem = events_pb2.Event | RawRecord | AnySpan


def _to_record(item: events_pb2.Event | RawRecord) -> SpillRecord:
    if isinstance(item, events_pb2.Event):
        value, headers = outrider.encode_event(item)
        return SpillRecord(outrider.EVENTS_TOPIC, outrider.agent_key(item.agent), value, tuple(headers))
    topic, key, raw_value, raw_headers = item
    return SpillRecord(topic, key, raw_value, tuple(raw_headers))


class TelemetryQueue:
    """Never blocks the caller: drops and counts when full; `wake` is set on every put."""

    def __init__(self, maxsize: int, metrics: SidecarMetrics, wake: asyncio.Event, *, enabled: bool) -> None:
        self._queue: asyncio.Queue[QueueItem] = asyncio.Queue(maxsize=maxsize)
        self._enabled = enabled
        self._wake = wake
        self._dropped = metrics.telemetry_dropped.labels("queue_full")
        metrics.telemetry_queue_depth.set_function(self._queue.qsize)
        self._sequence = 0  # the last Event.sequence handed out
        self._unlogged_drops = 0
        self._last_drop_log = 0.0
        self.spans_exported = 0
        self.spans_dropped: dict[str, int] = {"queue_full": 0, "oversize": 0, "encode_failed": 0}

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def empty(self) -> bool:
        return self._queue.empty()

    def emit(self, event: events_pb2.Event) -> bool:
        """Number `event` (this sidecar's next `sequence`, so the collector can count what never
        arrives) and queue it for Kafka; never blocks. False (and counted) if it was dropped."""
        if self._enabled and not event.sequence:
            self._sequence += 1
            event.sequence = self._sequence
        return self._put(event)

    def emit_span(self, span: AnySpan) -> bool:
        """Queue a finished span for `outrider.spans`; never blocks (see `SpanQueueProcessor`).
        Spans are encoded (OTLP protobuf, one record per trace) by `take_batch`."""
        if self._put(span):
            return True
        if self._enabled:
            self.spans_dropped["queue_full"] += 1
        return False

    def span_counts(self) -> SpanCounts:
        return SpanCounts(self.spans_exported, dict(self.spans_dropped))

    def _put(self, item: QueueItem) -> bool:
        if not self._enabled:
            return False
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._dropped.inc()
            self._unlogged_drops += 1
            now = time.monotonic()
            if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
                log.warning(
                    "telemetry queue full (%d): dropped %d record(s)",
                    self._queue.maxsize,
                    self._unlogged_drops,
                )
                self._last_drop_log, self._unlogged_drops = now, 0
            return False
        if not self._wake.is_set():
            self._wake.set()
        return True

    async def take_batch(self, batch: list[SpillRecord]) -> None:
        """Move up to BATCH_MAX items off the queue into `batch`, encoded. `batch` is filled in
        place, so a caller cancelled meanwhile still holds what was taken."""
        spans: list[AnySpan] = []
        taken = 0
        while taken < BATCH_MAX and not self._queue.empty():
            item = self._queue.get_nowait()
            taken += 1
            if isinstance(item, events_pb2.Event | tuple):
                batch.append(_to_record(item))
            else:
                spans.append(item)
            if taken % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # encoding is CPU work on the loop: let requests in
        # spans in small chunks, yielding in between: the OTLP encoder is pure Python
        for start in range(0, len(spans), SPAN_CHUNK):
            batch.extend(self._encode_spans(spans[start : start + SPAN_CHUNK]))
            await asyncio.sleep(0)

    def take_all(self) -> list[SpillRecord]:
        """Everything left on the queue, encoded at once (at shutdown)."""
        records: list[SpillRecord] = []
        spans: list[AnySpan] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, events_pb2.Event | tuple):
                records.append(_to_record(item))
            else:
                spans.append(item)
        records.extend(self._encode_spans(spans))
        return records

    def _encode_spans(self, spans: Sequence[AnySpan]) -> list[SpillRecord]:
        if not spans:
            return []
        try:
            records, oversize = encode_span_records(spans)
        except Exception:
            log.exception("telemetry: encoding %d span(s) failed", len(spans))
            self.spans_dropped["encode_failed"] += len(spans)
            return []
        self.spans_exported += len(spans) - oversize
        self.spans_dropped["oversize"] += oversize
        return [SpillRecord(r.topic, r.key, r.value, tuple(r.headers)) for r in records]
