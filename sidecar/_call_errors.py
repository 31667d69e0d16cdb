"""How a call is refused or fails, whatever the transport: `CallError` carries a gRPC status
code (the canonical code set; HTTP maps onto it as grpc-gateway does) and a message naming
what was wrong; and the one deadline of a call."""

from __future__ import annotations

import time
from typing import NoReturn

import grpc

from sidecar.routing._versions import Version


class CallError(Exception):
    """A refused or failed call: a status code, a message naming what was wrong, and a rich
    status (ErrorInfo, RetryInfo) to send instead of code + message when there is one."""

    def __init__(self, code: grpc.StatusCode, message: str, status: grpc.Status | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def fail(code: grpc.StatusCode, message: str) -> NoReturn:
    raise CallError(code, message)


def deadline_of(time_remaining: float | None, version: Version) -> float:
    """The call's single deadline, as time.monotonic(): the caller's, else resilience.deadline."""
    remaining = time_remaining
    if remaining is None:
        remaining = version.config.resilience.deadline
    elif remaining <= 0:
        fail(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call started")
    return time.monotonic() + remaining
