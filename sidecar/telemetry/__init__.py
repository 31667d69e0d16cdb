"""Telemetry: events, spans and metrics out of the sidecar.

- `_producer`: the bounded queue to Kafka, spilling to disk when the broker is away;
- `_spill`: the on-disk spill buffer;
- `_tracing`, `_semconv`, `_span_queue`, `_span_records`: OpenTelemetry GenAI spans and how
  they travel on `outrider.spans`;
- `_metrics`: the Prometheus metrics.
"""
