"""Spans for `outrider.spans` without an SDK `Span` per span: a small record on the request
path, OTLP protobuf built in bulk by the telemetry task.

The SDK's `start_span` (sampler call, attribute cleaning under a lock, a `ReadableSpan`
snapshot at `end`) and its pure-Python OTLP encoder were about a fifth of the sidecar's CPU
per call. When the only consumer of the sidecar's spans is its own telemetry queue (the
provider holds exactly our `SpanQueueProcessor`, the default parent-based always-on sampler
and the random id generator), `LiteTracer` hands out `LiteSpan`s instead: a slotted record
of the raw values (ids, times, attribute dict, events, status). `end()` queues it, and
`_otlp_wire.OtlpWriter` writes a batch of them as one `ExportTraceServiceRequest` in
protobuf bytes directly: the same fields, span kinds, flags and attribute encoding as the
SDK's `encode_spans` (a unit test compares the two). Any other processor on the provider
(an OTLP exporter from OTEL_EXPORTER_OTLP_*, a test's in-memory exporter) or another sampler
switches span creation back to the SDK, so whoever needs an SDK span gets one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

from sidecar.telemetry._otlp_wire import OtlpWriter

if TYPE_CHECKING:
    from sidecar.telemetry._span_queue import SpanQueueProcessor

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)


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
        encoder: OtlpWriter,
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
        self.encoder = OtlpWriter(provider.resource, scope_name)

    def _current_sink(self) -> Callable[[LiteSpan], None] | None:
        # re-checked only when a processor is added (the SDK replaces its tuple then)
        processors = self._provider._active_span_processor._span_processors
        if processors is not self._processors:
            from sidecar.telemetry._span_queue import SpanQueueProcessor

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
