"""Finished spans into the telemetry queue, on the event loop, with no export thread.

The SDK's BatchSpanProcessor exports from its own thread; the OTLP encoder is pure Python,
so that thread competes with the request path for the GIL and showed up as a p99 of tens of
milliseconds in `scripts/bench sidecar-telemetry`. Our spans end on the loop thread (the
request handlers end them), so `on_end` just puts the span on the telemetry queue
(`put_nowait`: bounded, dropped and counted when full) and the telemetry task encodes in
small chunks between requests (`sidecar.telemetry._span_records.encode_span_records`: OTLP protobuf,
one record per trace id, keyed by trace id) and sends or spills with the events.
"""

from __future__ import annotations

import asyncio
import threading

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from sidecar.telemetry._lite_spans import LiteSpan
from sidecar.telemetry._producer import TelemetryProducer


class SpanQueueProcessor(SpanProcessor):
    """`on_end` -> `TelemetryProducer.emit_span` (hopping onto the loop if called elsewhere)."""

    def __init__(self, telemetry: TelemetryProducer, loop: asyncio.AbstractEventLoop) -> None:
        self._telemetry = telemetry
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._shutdown = False
        self.dropped_after_shutdown = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context.trace_flags.sampled:
            self._emit(span)

    def on_end_lite(self, span: LiteSpan) -> None:
        """A `LiteSpan` ended (the path without SDK spans, see `_lite_spans`): as `on_end`."""
        self._emit(span)

    def _emit(self, span: ReadableSpan | LiteSpan) -> None:
        if self._shutdown:
            self.dropped_after_shutdown += 1
            return
        if threading.get_ident() == self._loop_thread:
            self._telemetry.emit_span(span)
            return
        try:
            self._loop.call_soon_threadsafe(self._telemetry.emit_span, span)
        except RuntimeError:  # the loop is closed
            self.dropped_after_shutdown += 1

    def shutdown(self) -> None:
        self._shutdown = True

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # nothing held here: the telemetry queue owns what it was given
