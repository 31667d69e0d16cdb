"""Spans to `outrider.spans`: one Kafka record per trace, in the OTLP protobuf encoding.

`KafkaSpanExporter` is an OpenTelemetry `SpanExporter`. For each batch it groups the spans
by trace id, encodes each group with the SDK's own OTLP encoder into an
`ExportTraceServiceRequest` (resource and scope kept), and hands the records
`(topic, key=trace id hex, value, headers)` to a sink. That is the `otlp_proto` encoding the
OpenTelemetry Collector's Kafka receiver and Jaeger's ingester read, so any of them can
consume the topic as well as our collector.

The sink is the seam to the sidecar's telemetry producer: it must not block (queue and
return; drop and count when full). A BatchSpanProcessor calls exporters on its own worker
thread, so a sink feeding an asyncio queue goes through `LoopSink`, which hops onto the loop
with `call_soon_threadsafe`.

The exporter never raises into the host: a failing sink or a span that cannot be encoded
is logged and counted, and the batch reports FAILURE.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import outrider

log = logging.getLogger(__name__)

CONTENT_TYPE = b"application/x-protobuf"
# Kafka's default max.message.bytes is ~1 MiB; stay under it with room for headers
MAX_RECORD_BYTES = 900_000
SERVICE_NAME = "outrider-sidecar"


class SpanRecord(NamedTuple):
    """One `outrider.spans` record (same fields as the spill buffer's SpillRecord)."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


SpanSink = Callable[[list[SpanRecord]], object]  # return value ignored


def trace_key(trace_id: int) -> bytes:
    """The record key: the trace id as 32 lowercase hex digits (what Jaeger and the UI show)."""
    return format(trace_id, "032x").encode("ascii")


def encode_span_records(
    spans: Sequence[ReadableSpan],
    *,
    topic: str = outrider.SPANS_TOPIC,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> tuple[list[SpanRecord], int]:
    """One record per trace id (a trace too big for one record is split across several with
    the same key). Returns the records and the number of spans dropped because a single span
    alone exceeds `max_record_bytes`."""
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        ctx = span.context
        if ctx is None or not ctx.is_valid:
            continue
        by_trace.setdefault(ctx.trace_id, []).append(span)
    records: list[SpanRecord] = []
    dropped = 0
    headers = [(outrider.CONTENT_TYPE_HEADER, CONTENT_TYPE)]
    for trace_id, group in by_trace.items():
        key = trace_key(trace_id)
        pending = [group]
        while pending:
            chunk = pending.pop()
            value = encode_spans(chunk).SerializeToString()
            if len(value) <= max_record_bytes:
                records.append(SpanRecord(topic, key, value, list(headers)))
            elif len(chunk) == 1:
                dropped += 1
                log.warning(
                    "dropping span %s: %d bytes encoded, over %d", chunk[0].name, len(value), max_record_bytes
                )
            else:
                half = len(chunk) // 2
                pending.extend((chunk[half:], chunk[:half]))  # pop() takes the first half first
    return records, dropped


class KafkaSpanExporter(SpanExporter):
    """SpanExporter writing OTLP protobuf records, keyed by trace id, to a non-blocking sink."""

    def __init__(
        self,
        sink: SpanSink,
        *,
        topic: str = outrider.SPANS_TOPIC,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        if max_record_bytes <= 0:
            raise ValueError("max_record_bytes must be positive")
        self._sink = sink
        self._topic = topic
        self._max_record_bytes = max_record_bytes
        self._shutdown = False
        self._lock = threading.Lock()  # counters are bumped from the processor's thread
        self.exported_spans = 0
        self.exported_records = 0
        self.failed_spans = 0
        self.oversize_spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            self._count(failed=len(spans))
            return SpanExportResult.FAILURE
        try:
            records, oversize = encode_span_records(
                spans, topic=self._topic, max_record_bytes=self._max_record_bytes
            )
            if records:
                self._sink(records)
        except Exception:  # never into the host: the SDK's contract for exporters
            log.exception("exporting %d span(s) to %s failed", len(spans), self._topic)
            self._count(failed=len(spans))
            return SpanExportResult.FAILURE
        self._count(spans=len(spans) - oversize, records=len(records), oversize=oversize)
        return SpanExportResult.FAILURE if oversize else SpanExportResult.SUCCESS

    def _count(self, *, spans: int = 0, records: int = 0, failed: int = 0, oversize: int = 0) -> None:
        with self._lock:
            self.exported_spans += spans
            self.exported_records += records
            self.failed_spans += failed
            self.oversize_spans += oversize

    def shutdown(self) -> None:
        self._shutdown = True

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # nothing buffered here: the sink owns what it was given


class LoopSink:
    """Adapts an event-loop-bound sink (e.g. one feeding an asyncio.Queue) for the exporter,
    which a BatchSpanProcessor calls from its worker thread. Never blocks; if the loop is
    closed the records are dropped and counted."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: SpanSink) -> None:
        self._loop = loop
        self._sink = sink
        self.dropped_records = 0

    def __call__(self, records: list[SpanRecord]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._sink, records)
        except RuntimeError:  # loop closed: shutting down
            self.dropped_records += len(records)


# --- provider assembly -------------------------------------------------------------------

OTLP_ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
OTLP_PROTOCOL_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter | None:
    """The standard OTLP exporter when an OTEL_EXPORTER_OTLP_*ENDPOINT is set; it reads the
    rest of the OTEL_EXPORTER_OTLP_* settings (headers, timeout, TLS) itself."""
    if not any(environ.get(name) for name in OTLP_ENDPOINT_ENVS):
        return None
    protocol = next((environ[n] for n in OTLP_PROTOCOL_ENVS if environ.get(n)), "grpc").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported value {protocol!r} (grpc, http/protobuf)")


def build_tracer_provider(
    sink: SpanSink | None,
    *,
    service_name: str = SERVICE_NAME,
    resource_attributes: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    otlp_from_env: bool = True,
) -> TracerProvider:
    """A TracerProvider exporting through Kafka (when `sink` is given) and, when the standard
    OTEL_EXPORTER_OTLP_*ENDPOINT settings are present, directly over OTLP too. Each exporter
    sits behind its own BatchSpanProcessor (bounded queue, drops when full, off the request
    path). Call `provider.shutdown()` on stop to flush."""
    env = os.environ if environ is None else environ
    attributes: dict[str, str] = {"service.name": service_name}
    attributes.update(resource_attributes or {})
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME from the process env
    provider = TracerProvider(resource=Resource.create(attributes))
    if sink is not None:
        provider.add_span_processor(BatchSpanProcessor(KafkaSpanExporter(sink)))
    if otlp_from_env:
        otlp = _otlp_exporter(env)
        if otlp is not None:
            provider.add_span_processor(BatchSpanProcessor(otlp))
    return provider
