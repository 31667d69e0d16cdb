"""gRPC metadata keys on the agent-facing API, shared by the sidecar and its clients."""

#: Trailing metadata on RESOURCE_EXHAUSTED: milliseconds to wait before retrying (with RetryInfo).
RETRY_AFTER_MS_KEY = "retry-after-ms"
#: W3C trace context on a call's request metadata: the sidecar parents its spans on it.
TRACEPARENT_KEY = "traceparent"
TRACESTATE_KEY = "tracestate"
