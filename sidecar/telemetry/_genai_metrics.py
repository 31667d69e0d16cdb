"""OpenTelemetry GenAI client metrics, exported through the sidecar's Prometheus registry.

The instruments are the conventions' (semconv v1.41, "development" status), under the names the
OpenTelemetry -> Prometheus translation gives them: dots become underscores, the unit `s` adds
`_seconds`, `{token}` adds nothing and counters end in `_total`:

- `gen_ai.client.operation.duration` -> `gen_ai_client_operation_duration_seconds` (histogram)
- `gen_ai.client.operation.time_to_first_chunk` -> `..._time_to_first_chunk_seconds` (streams only)
- `gen_ai.client.token.usage{gen_ai.token.type=input|output}` -> `gen_ai_client_token_usage`
- the newer `gen_ai.client.inference.usage.input_tokens` / `.output_tokens` counters ->
  `gen_ai_client_inference_usage_input_tokens_total` / `..._output_tokens_total`

Both token names are exported while the conventions move; dashboards can use either. Every
series carries `gen_ai_operation_name`, `gen_ai_provider_name`, `gen_ai_request_model` (the model
that served the call, after any fallback) and `outrider_version_id`; the duration also carries
`error_type` ("" when the call succeeded). Buckets are the conventions' advisory boundaries.
One call is recorded once, by `sidecar._record.Recorder.chat`, next to its event.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from sidecar.telemetry._series import SeriesCache

# advisory bucket boundaries from the GenAI metrics conventions
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
# attribute names as Prometheus labels (`gen_ai.provider.name` -> `gen_ai_provider_name`)
LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "outrider_version_id")


class GenAIMetrics:
    """The GenAI client instruments on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._of = SeriesCache()
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration (gen_ai.client.operation.duration)",
            [*LABELS, "error_type"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.time_to_first_chunk = Histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time to the first streamed chunk (gen_ai.client.operation.time_to_first_chunk)",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per call, by gen_ai_token_type (gen_ai.client.token.usage)",
            [*LABELS, "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.input_tokens = Counter(
            "gen_ai_client_inference_usage_input_tokens",
            "Input tokens used (gen_ai.client.inference.usage.input_tokens)",
            LABELS,
            registry=registry,
        )
        self.output_tokens = Counter(
            "gen_ai_client_inference_usage_output_tokens",
            "Output tokens used (gen_ai.client.inference.usage.output_tokens)",
            LABELS,
            registry=registry,
        )

    def record(
        self,
        *,
        operation: str,
        provider: str,
        model: str,
        version_id: str,
        duration_s: float,
        error_type: str = "",
        time_to_first_chunk_s: float | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """One call: its duration, first chunk (streams) and, when it succeeded, its tokens."""
        labels = (operation, provider, model, version_id)
        self._of(self.duration, *labels, error_type).observe(duration_s)
        if time_to_first_chunk_s is not None:
            self._of(self.time_to_first_chunk, *labels).observe(time_to_first_chunk_s)
        if input_tokens is not None:
            self._of(self.token_usage, *labels, "input").observe(input_tokens)
            self._of(self.input_tokens, *labels).inc(input_tokens)
        if output_tokens is not None:
            self._of(self.token_usage, *labels, "output").observe(output_tokens)
            self._of(self.output_tokens, *labels).inc(output_tokens)
