"""Spans for `outrider.spans` without an SDK `Span` per span: a small record on the request
path, OTLP protobuf built in bulk by the telemetry task.

The SDK's `start_span` (sampler call, attribute cleaning under a lock, a `ReadableSpan`
snapshot at `end`) and its pure-Python OTLP encoder were about a fifth of the sidecar's CPU
per call. When the only consumer of the sidecar's spans is its own telemetry queue (the
provider holds exactly our `SpanQueueProcessor`, the default parent-based always-on sampler
and the random id generator), `LiteTracer` hands out `LiteSpan`s instead: a slotted record
of the raw values (ids, times, attribute dict, events, status). `end()` queues it, and
`encode_lite_spans` turns a batch of them into one `ExportTraceServiceRequest` with the
opentelemetry-proto messages directly: resource and scope encoded once, the same fields, span
kinds, flags and attribute encoding as the SDK's `encode_spans` (a unit test compares the
bytes). Any other processor on the provider (an OTLP exporter from OTEL_EXPORTER_OTLP_*, a
test's in-memory exporter) or another sampler switches span creation back to the SDK, so
whoever needs an SDK span gets one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, SpanFlags
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

if TYPE_CHECKING:
    from sidecar.telemetry._span_queue import SpanQueueProcessor

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_FLAGS_LOCAL = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_REMOTE = _FLAGS_LOCAL | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_UNSET = Status(StatusCode.UNSET)
_KINDS = {  # as the SDK's encoder maps them
    SpanKind.INTERNAL: PbSpan.SpanKind.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: PbSpan.SpanKind.SPAN_KIND_SERVER,
    SpanKind.CLIENT: PbSpan.SpanKind.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: PbSpan.SpanKind.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: PbSpan.SpanKind.SPAN_KIND_CONSUMER,
}
_STATUS_CODES = {
    StatusCode.UNSET: PbStatus.StatusCode.STATUS_CODE_UNSET,
    StatusCode.OK: PbStatus.StatusCode.STATUS_CODE_OK,
    StatusCode.ERROR: PbStatus.StatusCode.STATUS_CODE_ERROR,
}


class LiteSpan(trace.Span):
    """A recording span that is only a record: ended, it goes to `sink` (the telemetry queue)."""

    __slots__ = (
        "_context",
        "_sink",
        "attributes",
        "encoder",
        "end_time",
        "events",
        "kind",
        "name",
        "parent",
        "start_time",
        "status",
    )

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        sink: Callable[[LiteSpan], None],
        encoder: LiteEncoder,
    ) -> None:
        self.name = name
        self._context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.events: list[tuple[str, int, Mapping[str, AttributeValue]]] = []
        self.status = _UNSET
        self.start_time = time.time_ns()
        self.end_time: int | None = None
        self._sink = sink
        self.encoder = encoder  # what turns it into OTLP (the resource and scope it belongs to)

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self.end_time is None:
            attributes = self.attributes
            attributes.pop(key, None)  # a key set again moves to the end, as in the SDK
            attributes[key] = tuple(value) if isinstance(value, list) else value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        if self.end_time is None:
            cleaned = {k: tuple(v) if isinstance(v, list) else v for k, v in (attributes or {}).items()}
            self.events.append((name, timestamp if timestamp is not None else time.time_ns(), cleaned))

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # the SDK's rules: OK is final, UNSET is ignored
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # the sidecar never records exceptions on spans (their text may carry content)
        event: dict[str, AttributeValue] = {"exception.type": type(exception).__qualname__}
        event.update(attributes or {})
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is None:
            self.end_time = end_time if end_time is not None else time.time_ns()
            self._sink(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.end()


class LiteTracer:
    """`start_span` for `Tracing`: a `LiteSpan` while the provider allows it, else None (the
    caller then uses the SDK tracer)."""

    def __init__(self, provider: TracerProvider, scope_name: str) -> None:
        self._provider = provider
        self._processors: tuple[object, ...] | None = None
        self._sink: Callable[[LiteSpan], None] | None = None
        self.encoder = LiteEncoder(provider, scope_name)

    def _current_sink(self) -> Callable[[LiteSpan], None] | None:
        from sidecar.telemetry._span_queue import SpanQueueProcessor

        # re-checked only when a processor is added (the SDK replaces its tuple then)
        processors = self._provider._active_span_processor._span_processors
        if processors is not self._processors:
            self._processors = processors
            only: SpanQueueProcessor | None = None
            if len(processors) == 1 and isinstance(processors[0], SpanQueueProcessor):
                only = processors[0]
            fits = (
                only is not None
                and self._provider.sampler is sampling.DEFAULT_ON
                and type(self._provider.id_generator) is RandomIdGenerator
            )
            self._sink = only.on_end_lite if fits and only is not None else None
        return self._sink

    def start_span(
        self,
        name: str,
        context: Context,
        kind: SpanKind,
        attributes: Mapping[str, AttributeValue],
    ) -> trace.Span | None:
        sink = self._current_sink()
        if sink is None:
            return None
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        ids = self._provider.id_generator
        if parent is None or not parent.is_valid:
            parent = None
            span_context = SpanContext(ids.generate_trace_id(), ids.generate_span_id(), False, _SAMPLED)
        elif not parent.trace_flags.sampled:
            # parent-based: an unsampled parent gives an unrecorded span that still propagates
            unsampled = SpanContext(
                parent.trace_id, ids.generate_span_id(), False, parent.trace_flags, parent.trace_state
            )
            return trace.NonRecordingSpan(unsampled)
        else:
            span_context = SpanContext(
                parent.trace_id, ids.generate_span_id(), False, _SAMPLED, parent.trace_state
            )
        cleaned = {k: tuple(v) if isinstance(v, list) else v for k, v in attributes.items()}
        return LiteSpan(name, span_context, parent, kind, cleaned, sink, self.encoder)


# --- encoding ------------------------------------------------------------------------------


def _value(value: Any) -> AnyValue:
    kind = type(value)
    if kind is str:
        return AnyValue(string_value=value)
    if kind is bool:
        return AnyValue(bool_value=value)
    if kind is int:
        return AnyValue(int_value=value)
    if kind is float:
        return AnyValue(double_value=value)
    if kind is bytes:
        return AnyValue(bytes_value=value)
    if isinstance(value, Sequence):
        return AnyValue(array_value=ArrayValue(values=[_value(v) for v in value]))
    raise TypeError(f"span attribute value of type {kind.__name__} cannot be encoded")


def _attributes(attributes: Mapping[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=key, value=_value(value)) for key, value in attributes.items()]


def _trace_state(ctx: SpanContext) -> str:
    state = ctx.trace_state
    return ",".join(f"{k}={v}" for k, v in state.items()) if state else ""


class LiteEncoder:
    """`LiteSpan`s -> OTLP protobuf, the resource and scope encoded once."""

    def __init__(self, provider: TracerProvider, scope_name: str) -> None:
        self._resource = _encode_resource(provider.resource)
        self._resource_schema = provider.resource.schema_url
        self._scope = _encode_instrumentation_scope(InstrumentationScope(scope_name))

    def encode(self, spans: Sequence[LiteSpan]) -> bytes:
        """One `ExportTraceServiceRequest` (one resource, one scope) holding `spans`."""
        request = ExportTraceServiceRequest(
            resource_spans=[
                ResourceSpans(
                    resource=self._resource,
                    scope_spans=[ScopeSpans(scope=self._scope, spans=[_span(s) for s in spans])],
                    schema_url=self._resource_schema,
                )
            ]
        )
        return request.SerializeToString()


def _span(span: LiteSpan) -> PbSpan:
    ctx = span._context
    parent = span.parent
    status = span.status
    return PbSpan(
        trace_id=ctx.trace_id.to_bytes(16, "big"),
        span_id=ctx.span_id.to_bytes(8, "big"),
        trace_state=_trace_state(ctx),
        parent_span_id=parent.span_id.to_bytes(8, "big") if parent is not None else b"",
        name=span.name,
        kind=_KINDS[span.kind],
        start_time_unix_nano=span.start_time,
        end_time_unix_nano=span.end_time or 0,
        attributes=_attributes(span.attributes),
        events=[
            PbSpan.Event(name=name, time_unix_nano=ts, attributes=_attributes(attrs))
            for name, ts, attrs in span.events
        ]
        or None,
        status=PbStatus(code=_STATUS_CODES[status.status_code], message=status.description or ""),
        flags=_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL,
    )
