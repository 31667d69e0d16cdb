"""The client's exceptions: one class per kind of answer an agent handles differently, each
naming the RPC, the status code and what the sidecar said was wrong."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from outrider import RETRY_AFTER_MS_KEY, SESSION_DRAINED, SESSION_EXPIRED, TOOL_REJECTED
from outrider_client._status import RichStatus, parse_details


class OutriderError(Exception):
    """A call the sidecar refused or that failed; `code` is None for the client's own errors."""

    def __init__(
        self,
        message: str,
        *,
        method: str = "",
        code: grpc.StatusCode | None = None,
        details: str = "",
        status: RichStatus | None = None,
    ) -> None:
        super().__init__(message)
        self.method = method
        self.code = code
        self.details = details
        self.status = status or RichStatus()

    @property
    def reason(self) -> str:
        """The ErrorInfo reason (e.g. SESSION_DRAINED), empty when the sidecar sent none."""
        return self.status.reason

    @property
    def metadata(self) -> Mapping[str, str]:
        """The ErrorInfo metadata (e.g. the drained version_id)."""
        return self.status.metadata


class InvalidArgumentError(OutriderError):
    """The request was malformed (a message, a tool's arguments against its schema, ...)."""


class NotFoundError(OutriderError):
    """No such session, version or tool."""


class PermissionDeniedError(OutriderError):
    """Refused for what it contains (a guardrail block) or for who sent it: do not retry as is."""


class UnauthenticatedError(OutriderError):
    """The sidecar did not accept the caller's credentials."""


class QuotaExceededError(OutriderError):
    """RESOURCE_EXHAUSTED: a user, tenant or global quota; `retry_after_s` is the sidecar's hint."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class FailedPreconditionError(OutriderError):
    """The call cannot succeed in the current state (see the subclasses)."""


class SessionEndedError(FailedPreconditionError):
    """The session was drained (its version rolled back) or expired: open a new one. The
    client's sessions do so themselves at the next turn."""


class ToolRejectedError(FailedPreconditionError):
    """The tool answered 4xx (`http_status`) or policy refused the call."""

    @property
    def http_status(self) -> int | None:
        text = self.metadata.get("http_status", "")
        return int(text) if text.isdigit() else None


class UnavailableError(OutriderError):
    """The sidecar, the model or the tool could not be reached; worth retrying later."""


class DeadlineExceededError(OutriderError):
    """The caller's deadline passed."""


class InternalError(OutriderError):
    """The sidecar failed in a way the caller cannot fix."""


class ToolLoopError(OutriderError):
    """The tool-calling loop ended without a final answer (round limit, a bad tool call)."""


_BY_CODE: dict[grpc.StatusCode, type[OutriderError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExceededError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}
_BY_REASON: dict[str, type[FailedPreconditionError]] = {
    SESSION_DRAINED: SessionEndedError,
    SESSION_EXPIRED: SessionEndedError,
    TOOL_REJECTED: ToolRejectedError,
}


def retry_after_of(trailing: Any, status: RichStatus) -> float | None:
    """Seconds the sidecar asks to wait: `retry-after-ms`, else RetryInfo; None when neither."""
    for key, value in trailing or ():
        if key == RETRY_AFTER_MS_KEY:
            try:
                return max(0.0, float(value) / 1000.0)
            except (TypeError, ValueError):
                break
    return status.retry_delay_s


def from_rpc_error(method: str, error: grpc.RpcError) -> OutriderError:
    """The client exception for a failed call of `method` (the RPC's name)."""
    call: Any = error  # every RpcError the stubs raise is also a grpc.Call
    code: grpc.StatusCode = call.code()
    details: str = call.details() or ""
    trailing = call.trailing_metadata()
    status = parse_details(trailing)
    cls = _BY_CODE.get(code, OutriderError)
    if cls is FailedPreconditionError:
        cls = _BY_REASON.get(status.reason, FailedPreconditionError)
    text = f"{method}: {code.name}: {details or 'no details'}"
    if status.reason:
        text += f" [{status.reason}]"
    kw: dict[str, Any] = {"method": method, "code": code, "details": details, "status": status}
    if cls is QuotaExceededError:
        retry = retry_after_of(trailing, status)
        if retry is not None:
            text += f" (retry after {retry:.3g} s)"
        return QuotaExceededError(text, retry_after_s=retry, **kw)
    return cls(text, **kw)
