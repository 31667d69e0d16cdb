"""Failures of the sidecar's upstreams (LLM providers and tool services).

Foreign errors (aiohttp, asyncio timeouts, JSON) are mapped once, at the HTTP boundary in
`_provider` and `_tools`, into this tree; the gRPC layer maps the tree to status codes and
telemetry maps it to an `error_class`.

    UpstreamError(upstream, kind, retriable, status)   kind: "provider" | "tool"
     ├── UpstreamTimeout          the call did not finish in time            retriable
     ├── UpstreamConnectError     no connection, or it broke mid-response    retriable
     ├── UpstreamStatusError      an HTTP error status (`status` set)        retriable for 408, 429, 5xx
     └── UpstreamInvalidResponse  malformed JSON or SSE, a stream cut short  not retriable

Messages never contain credentials: only the upstream's name, status and a short reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

_RETRIABLE_STATUSES = frozenset({408, 409, 425, 429})


class UpstreamError(Exception):
    """An upstream call failed."""

    error_kind = "error"
    default_retriable = False

    def __init__(
        self,
        message: str,
        *,
        upstream: str,
        kind: str = "provider",
        retriable: bool | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.upstream = upstream
        self.kind = kind
        self.retriable = self.default_retriable if retriable is None else retriable
        self.status = status

    @property
    def error_class(self) -> str:
        """The short, stable label telemetry records, e.g. "provider_5xx", "timeout", "tool_4xx"."""
        return self.error_kind


class UpstreamTimeout(UpstreamError):
    error_kind = "timeout"
    default_retriable = True


class UpstreamStreamStall(UpstreamTimeout):
    """A stream sent nothing for longer than the inter-chunk (idle) timeout."""

    error_kind = "stream_stall"


class UpstreamConnectError(UpstreamError):
    error_kind = "connect"
    default_retriable = True


class UpstreamInvalidResponse(UpstreamError):
    error_kind = "invalid_response"


class UpstreamStatusError(UpstreamError):
    """``headers``: the response's headers (Retry-After and friends), never shown in messages."""

    def __init__(
        self,
        message: str,
        *,
        upstream: str,
        kind: str = "provider",
        status: int,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        retriable = status >= 500 or status in _RETRIABLE_STATUSES
        super().__init__(message, upstream=upstream, kind=kind, retriable=retriable, status=status)
        self.headers: Mapping[str, str] = MappingProxyType(dict(headers or {}))

    @property
    def error_class(self) -> str:
        assert self.status is not None
        if self.status == 429:
            return f"{self.kind}_429"
        return f"{self.kind}_{self.status // 100}xx"
