"""Per-user and per-tenant quotas (token buckets on tokens and requests per minute), and
`Refusal`, the status of a refused call.

A quota refusal is RESOURCE_EXHAUSTED with trailing metadata ``retry-after-ms`` and a
``google.rpc.RetryInfo`` detail; a guardrail block (see `sidecar.guards._safety`) is
PERMISSION_DENIED "blocked by guardrail <category>" (the request or reply is refused for what
it contains, not for who sent it, but PERMISSION_DENIED is what clients treat as "do not
retry as is").
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from outrider import RETRY_AFTER_MS_KEY
from outrider.clock import Clock
from sidecar._config import QuotaLimits
from sidecar.resilience._buckets import KeyedLimiter
from sidecar.routing._session import Session

MAX_RETRY_AFTER_S = 3600.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused call: the gRPC status with its retry hint."""

    code: grpc.StatusCode
    message: str
    retry_after_s: float = 0.0

    def status(self) -> grpc.Status:
        """For `context.abort_with_status`: the code, message, RetryInfo and retry-after-ms."""
        retry = min(max(self.retry_after_s, 0.0), MAX_RETRY_AFTER_S)
        detail = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=int(retry), nanos=int((retry % 1) * 1e9))
        )
        proto = status_pb2.Status(code=self.code.value[0], message=self.message)
        proto.details.add().Pack(detail)
        status = rpc_status.to_status(proto)
        metadata = (*status.trailing_metadata, (RETRY_AFTER_MS_KEY, str(math.ceil(retry * 1000))))
        return _Status(status.code, status.details, metadata)


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


@dataclass(slots=True)
class UserTicket:
    keys: list[tuple[KeyedLimiter, str]]
    reserved: float


class UserQuotas:
    """Token buckets per user and per tenant (tokens and requests per minute)."""

    def __init__(self, users: QuotaLimits | None, tenants: QuotaLimits | None, clock: Clock) -> None:
        def limiter(limits: QuotaLimits | None) -> KeyedLimiter | None:
            if limits is None or (limits.tokens_per_minute is None and limits.requests_per_minute is None):
                return None
            return KeyedLimiter(limits.tokens_per_minute, limits.requests_per_minute, clock=clock)

        self._scopes = [("user", limiter(users)), ("tenant", limiter(tenants))]

    def admit(self, session: Session, tokens: float) -> UserTicket | Refusal:
        taken: list[tuple[KeyedLimiter, str]] = []
        ids = {"user": session.user_id, "tenant": session.tenant_id}
        for scope, limiter in self._scopes:
            key = ids[scope]
            if limiter is None or not key:
                continue
            verdict = limiter.admit(key, tokens)
            if not verdict.ok:
                for earlier, earlier_key in taken:  # both or neither
                    earlier.reconcile(earlier_key, tokens, 0.0)
                wait = verdict.retry_after_s
                hint = "the call exceeds the limit" if math.isinf(wait) else f"retry in {wait:.2f}s"
                return Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{scope} {verdict.which} per minute quota exhausted ({hint})",
                    wait if math.isfinite(wait) else MAX_RETRY_AFTER_S,
                )
            taken.append((limiter, key))
        return UserTicket(taken, tokens)

    @staticmethod
    def reconcile(ticket: UserTicket, actual: float) -> None:
        for limiter, key in ticket.keys:
            limiter.reconcile(key, ticket.reserved, max(0.0, actual))
