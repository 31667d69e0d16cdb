"""Spans to `outrider.spans`: one Kafka record per trace, in the OTLP protobuf encoding.

`encode_span_records` groups finished spans by trace id and encodes each group with the
SDK's own OTLP encoder (SDK spans) or `_lite_spans.LiteEncoder` (`LiteSpan`s, the default
path) into an `ExportTraceServiceRequest` (resource and scope kept), as
records `(topic, key=trace id hex, value, headers)`. That is the `otlp_proto` encoding the
OpenTelemetry Collector's Kafka receiver and Jaeger's ingester read, so any of them can
consume the topic as well as our collector. The telemetry producer calls it from its own
task (`_span_queue`); `build_tracer_provider` assembles the SDK provider, with the standard
OTLP exporter when the OTEL_EXPORTER_OTLP_* settings ask for one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, TypeVar

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

import outrider
from sidecar.telemetry._lite_spans import LiteSpan

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


def trace_key(trace_id: int) -> bytes:
    """The record key: the trace id as 32 lowercase hex digits (what Jaeger and the UI show)."""
    return format(trace_id, "032x").encode("ascii")


def _sdk_bytes(spans: Sequence[ReadableSpan]) -> bytes:
    return encode_spans(spans).SerializeToString()


def _lite_bytes(spans: Sequence[LiteSpan]) -> bytes:
    return spans[0].encoder.encode(spans)


def encode_span_records(
    spans: Sequence[ReadableSpan | LiteSpan],
    *,
    topic: str = outrider.SPANS_TOPIC,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> tuple[list[SpanRecord], int]:
    """One record per trace id (a trace too big for one record is split across several with
    the same key; SDK spans and `LiteSpan`s of one trace, which only a processor added
    mid-trace gives, go in separate records). Returns the records and the number of spans
    dropped because a single span alone exceeds `max_record_bytes`."""
    sdk: dict[int, list[ReadableSpan]] = {}
    lite: dict[int, list[LiteSpan]] = {}
    for span in spans:
        if isinstance(span, LiteSpan):
            lite.setdefault(span.get_span_context().trace_id, []).append(span)
            continue
        ctx = span.context
        if ctx is None or not ctx.is_valid:
            continue
        sdk.setdefault(ctx.trace_id, []).append(span)
    records: list[SpanRecord] = []
    dropped = 0
    for trace_id, group in lite.items():
        dropped += _split_encode(group, _lite_bytes, trace_key(trace_id), topic, max_record_bytes, records)
    for trace_id, sdk_group in sdk.items():
        dropped += _split_encode(sdk_group, _sdk_bytes, trace_key(trace_id), topic, max_record_bytes, records)
    return records, dropped


_S = TypeVar("_S", ReadableSpan, LiteSpan)


def _split_encode(
    group: list[_S],
    encode: Callable[[Sequence[_S]], bytes],
    key: bytes,
    topic: str,
    max_record_bytes: int,
    records: list[SpanRecord],
) -> int:
    """Append `group`'s records (halved until each fits); return the spans dropped."""
    dropped = 0
    pending = [group]
    while pending:
        chunk = pending.pop()
        value = encode(chunk)
        if len(value) <= max_record_bytes:
            records.append(SpanRecord(topic, key, value, [(outrider.CONTENT_TYPE_HEADER, CONTENT_TYPE)]))
        elif len(chunk) == 1:
            dropped += 1
            name = chunk[0].name
            log.warning("dropping span %s: %d bytes encoded, over %d", name, len(value), max_record_bytes)
        else:
            half = len(chunk) // 2
            pending.extend((chunk[half:], chunk[:half]))  # pop() takes the first half first
    return dropped


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
    *,
    service_name: str = SERVICE_NAME,
    resource_attributes: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    otlp_from_env: bool = True,
) -> TracerProvider:
    """A TracerProvider that exports directly over OTLP when the standard
    OTEL_EXPORTER_OTLP_*ENDPOINT settings are present, behind a BatchSpanProcessor (bounded
    queue, drops when full, off the request path). The sidecar adds its `SpanQueueProcessor`
    for `outrider.spans`. Call `provider.shutdown()` on stop to flush."""
    env = os.environ if environ is None else environ
    attributes: dict[str, str] = {"service.name": service_name}
    attributes.update(resource_attributes or {})
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME from the process env
    provider = TracerProvider(resource=Resource.create(attributes))
    if otlp_from_env:
        otlp = _otlp_exporter(env)
        if otlp is not None:
            provider.add_span_processor(BatchSpanProcessor(otlp))
    return provider
