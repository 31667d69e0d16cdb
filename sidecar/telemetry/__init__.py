"""Telemetry: events, spans and metrics out of the sidecar.

- `_producer`: the Kafka producer, spilling to disk when the broker is away, fed by
  `_telemetry_queue` (the bounded queue, and the encoding of what it holds);
- `_spill`: the on-disk spill buffer's bookkeeping, over `_spill_files` (the directory's
  files), `_spill_format` (their bytes), `_spill_models` and `_spill_errors`;
- `_tracing`, `_semconv`, `_span_queue`, `_span_records`: OpenTelemetry GenAI spans and how
  they travel on `outrider.spans`;
- `_metrics`: the Prometheus metrics.
"""
