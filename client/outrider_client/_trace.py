"""`traceparent` for outgoing calls from the current OpenTelemetry span, when opentelemetry-api
is installed and a valid span is current. W3C trace context only: baggage is never sent."""

from __future__ import annotations

from typing import Any

from outrider import TRACEPARENT_KEY, TRACESTATE_KEY

_propagator: Any
try:
    from opentelemetry import trace as _otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the optional `otel` extra is absent: calls start no trace of their own
    _otel_trace = None  # type: ignore[assignment]
    _propagator = None
else:
    _propagator = TraceContextTextMapPropagator()


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """(`traceparent`, `tracestate`) metadata naming the current span, or nothing."""
    if _otel_trace is None or not _otel_trace.get_current_span().get_span_context().is_valid:
        return ()
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return tuple((k, v) for k, v in carrier.items() if k in (TRACEPARENT_KEY, TRACESTATE_KEY))
