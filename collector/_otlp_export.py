"""The span relay's exporter side: decoding `outrider.spans` records and sending OTLP batches.

`decode_spans_record` checks one record is a non-empty OTLP trace request (pure).
`OtlpTraceExporter` sends a batch with `TraceService/Export`, retrying through tenacity
inside one deadline: each attempt gets the time left, the wait is a server's `RetryInfo`
hint or jittered exponential backoff (`JitteredBackoff`), only the OTLP exporters'
retryable codes are retried, and no retry starts whose wait would not end before the
deadline. The wait is cut short by the relay's stop (`pause`), and the export then ends as
STOPPED. INVALID_ARGUMENT means the data is at fault: REJECTED, never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Iterable, Sequence
from typing import Any, Final, Protocol, cast

import grpc
from google.protobuf.message import DecodeError as ProtoDecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

import outrider

log = logging.getLogger("collector._relay")  # one logger for the relay, whichever side speaks

_CONTENT_TYPE: Final = b"application/x-protobuf"

# the OTLP exporters' retryable set (opentelemetry-exporter-otlp-proto-grpc)
RETRYABLE_CODES: Final = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
# the receiver says the data is at fault: sending it again cannot help
_SKIP_CODES: Final = frozenset({grpc.StatusCode.INVALID_ARGUMENT})


# --- decoding (pure) ---------------------------------------------------------------------


def decode_spans_record(
    value: bytes | None, headers: Sequence[tuple[str, bytes]] | None = None
) -> tuple[ExportTraceServiceRequest, int]:
    """Parse an `outrider.spans` value; returns the request and its span count.

    Raises outrider.DecodeError (with the reason) for anything that is not a non-empty OTLP
    trace request: another content type, bytes that do not parse, unknown top-level fields,
    no spans, or ids of the wrong length.
    """
    for name, header in headers or ():
        if name.lower() == outrider.CONTENT_TYPE_HEADER and not header.startswith(_CONTENT_TYPE):
            raise outrider.DecodeError(f"unexpected content type {header!r}")
    if not value:
        raise outrider.DecodeError("empty record")
    try:
        request = ExportTraceServiceRequest.FromString(value)
    except ProtoDecodeError as exc:
        raise outrider.DecodeError(f"not an OTLP ExportTraceServiceRequest: {exc}") from None
    if len(UnknownFieldSet(request)):
        raise outrider.DecodeError("not an OTLP ExportTraceServiceRequest: unknown fields")
    spans = 0
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if len(span.trace_id) != 16 or len(span.span_id) != 8:
                    raise outrider.DecodeError("span with a malformed trace or span id")
                spans += 1
    if spans == 0:
        raise outrider.DecodeError("no spans")
    return request, spans


class ExportOutcome(enum.Enum):
    DELIVERED = "delivered"
    REJECTED = "rejected"  # the receiver refused the data itself: skip it
    FAILED = "failed"  # not delivered: read it again
    STOPPED = "stopped"


def _target(endpoint: str, credentials: grpc.ChannelCredentials | None) -> tuple[str, bool]:
    """`host:port` and whether to use TLS, from `host:port`, `http://…` or `https://…`."""
    if endpoint.startswith("https://"):
        return endpoint.removeprefix("https://").rstrip("/"), True
    if endpoint.startswith("http://"):
        return endpoint.removeprefix("http://").rstrip("/"), credentials is not None
    if not endpoint or "/" in endpoint:
        raise ValueError(f"otlp_endpoint: expected host:port or http(s)://host:port, got {endpoint!r}")
    return endpoint, credentials is not None


def _retry_hint(exc: grpc.aio.AioRpcError) -> float | None:
    # grpc.aio yields (key, value) pairs here, whatever the stubs say
    metadata = cast(Iterable[tuple[str, str | bytes]], exc.trailing_metadata() or ())
    for key, value in metadata:
        if key == "google.rpc.retryinfo-bin" and isinstance(value, bytes):
            with contextlib.suppress(ProtoDecodeError):
                delay = RetryInfo.FromString(value).retry_delay
                return float(delay.seconds + delay.nanos / 1e9)
    return None


# --- retry parts shared with the consumer side -------------------------------------------


class JitteredBackoff:
    """tenacity ``wait=``: ``min(max_s, initial_s * 2**n)`` times a uniform 0.8 to 1.2 jitter,
    where n is the number of failures before the one that just happened (0 for the first)."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random) -> None:
        self._initial_s, self._max_s, self._rng = initial_s, max_s, rng

    def __call__(self, state: RetryCallState) -> float:
        exponent = min(state.attempt_number - 1, 30)
        return float(min(self._max_s, self._initial_s * 2**exponent) * self._rng.uniform(0.8, 1.2))


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """tenacity ``sleep=``: sleep, cut short when `stopping` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


def _failure(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None and state.outcome.failed else None


# --- the exporter ------------------------------------------------------------------------


class ExportCounters(Protocol):
    """Where the exporter counts (the relay's counters, shown on /metrics)."""

    retries: int
    rejected_spans: int


class OtlpTraceExporter:
    """Sends span batches to one OTLP gRPC endpoint; `open()` before `export`, `close()` after."""

    def __init__(
        self,
        endpoint: str,
        *,
        headers: Sequence[tuple[str, str]],
        credentials: grpc.ChannelCredentials | None,
        backoff: JitteredBackoff,
        stopping: asyncio.Event,
        counters: ExportCounters,
    ) -> None:
        self.target, self._tls = _target(endpoint, credentials)
        self._credentials = credentials
        self._metadata = tuple((k.lower(), v) for k, v in headers)
        self._backoff, self._stopping, self._counters = backoff, stopping, counters
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    def open(self) -> None:
        if self._tls:
            self._channel = grpc.aio.secure_channel(
                self.target, self._credentials or grpc.ssl_channel_credentials()
            )
        else:
            self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = TraceServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close(None)

    async def export(
        self, request: ExportTraceServiceRequest, *, timeout_s: float, retry: bool
    ) -> ExportOutcome:
        """Send `request` within `timeout_s`, retrying (if `retry`) what the OTLP exporters do."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        def retryable(exc: BaseException) -> bool:
            return retry and isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRYABLE_CODES

        def out_of_time(state: RetryCallState) -> bool:  # tenacity computes the wait first
            return state.upcoming_sleep >= deadline - loop.time()

        retrying = AsyncRetrying(
            retry=retry_if_exception(retryable),
            wait=self._wait,
            stop=out_of_time,
            sleep=lambda seconds: pause(self._stopping, seconds),
            before_sleep=self._retrying,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number > 1 and self._stopping.is_set():
                        return ExportOutcome.STOPPED  # the wait was cut short by stop
                    response: ExportTraceServiceResponse = await self._stub.Export(
                        request, timeout=max(0.001, deadline - loop.time()), metadata=self._metadata
                    )
                    return self._delivered(response)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in _SKIP_CODES:
                log.error(  # noqa: TRY400 - a status, not a bug: no traceback
                    "OTLP endpoint %s rejected a batch: %s %s", self.target, code.name, exc.details()
                )
                return ExportOutcome.REJECTED
            log.warning(
                "exporting %d span batch to %s failed: %s %s",
                len(request.resource_spans),
                self.target,
                code.name,
                exc.details(),
            )
            return ExportOutcome.FAILED
        raise AssertionError("unreachable: tenacity returns or reraises")

    def _delivered(self, response: ExportTraceServiceResponse) -> ExportOutcome:
        rejected = response.partial_success.rejected_spans
        if rejected:
            self._counters.rejected_spans += rejected
            log.warning(
                "OTLP endpoint %s dropped %d span(s): %s",
                self.target,
                rejected,
                response.partial_success.error_message,
            )
        return ExportOutcome.DELIVERED

    def _wait(self, state: RetryCallState) -> float:
        exc = _failure(state)
        hint = _retry_hint(exc) if isinstance(exc, grpc.aio.AioRpcError) else None
        return hint if hint is not None else self._backoff(state)

    def _retrying(self, state: RetryCallState) -> None:
        self._counters.retries += 1
        exc = _failure(state)
        code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
        log.debug("export to %s: %s, retrying in %.2fs", self.target, code, state.upcoming_sleep)
