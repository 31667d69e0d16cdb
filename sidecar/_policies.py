"""Per-call policies around the executor: per-user and per-tenant quotas, guardrails on
input and output (with one `safety` event per hit) and cost (per call and per session).

Statuses: a quota refusal is RESOURCE_EXHAUSTED with trailing metadata ``retry-after-ms``
and a ``google.rpc.RetryInfo`` detail; a guardrail block is PERMISSION_DENIED
"blocked by guardrail <category>" (the request or reply is refused for what it contains,
not for who sent it, but PERMISSION_DENIED is what clients treat as "do not retry as is").
"""

from __future__ import annotations

import collections
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from outrider.clock import Clock
from outrider.v1 import common_pb2, events_pb2
from sidecar._config import QuotaLimits
from sidecar.guards import GuardPolicy, Hit
from sidecar.resilience._buckets import KeyedLimiter
from sidecar.routing._session import Session
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.telemetry._producer import TelemetryProducer
from sidecar.upstream._cost import SessionCostTracker

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
        metadata = (*status.trailing_metadata, ("retry-after-ms", str(math.ceil(retry * 1000))))
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


class Safety:
    """Guard hits to events and metrics; session cost totals."""

    def __init__(
        self,
        *,
        agent: str,
        sidecar_id: str,
        clock: Clock,
        metrics: SidecarMetrics,
        telemetry: TelemetryProducer,
    ) -> None:
        self._agent = agent
        self._sidecar_id = sidecar_id
        self._clock = clock
        self._metrics = metrics
        self._telemetry = telemetry
        self.costs = SessionCostTracker(clock=clock)

    def report(self, session: Session, hits: Sequence[Hit], direction: str, operation: str) -> list[str]:
        """One safety event per hit; the "category:action" labels for the call record."""
        labels = []
        for hit in hits:
            event = events_pb2.Event(
                event_id=uuid.uuid4().hex,
                time_unix_nano=int(self._clock.now() * 1e9),
                agent=self._agent,
                version_id=session.version_id,
                role=session.role,  # type: ignore[arg-type]
                session_id=session.nonce,
                sidecar_id=self._sidecar_id,
                rollout_id=session.rollout_id,
            )
            record = event.safety
            record.category = hit.category
            record.action = hit.action.value
            record.guard = hit.guard_name
            record.count = hit.count
            record.direction = direction
            record.operation = operation
            self._telemetry.emit(event)
            self._metrics.guard_hits.labels(hit.category, hit.action.value).inc(hit.count)
            labels.append(f"{hit.category}:{hit.action.value}")
        return labels

    def scan_input(
        self,
        policy: GuardPolicy,
        session: Session,
        messages: Sequence[common_pb2.ChatMessage],
        operation: str,
    ) -> tuple[list[common_pb2.ChatMessage] | Sequence[common_pb2.ChatMessage], list[str], Refusal | None]:
        """Scan the user messages; redacted copies replace them. A block is a Refusal."""
        if not policy.rules_for("input"):
            return messages, [], None
        out: list[common_pb2.ChatMessage] = []
        labels: list[str] = []
        for message in messages:
            if message.role != "user" or not message.content:
                out.append(message)
                continue
            outcome = policy.scan_input(message.content)
            labels += self.report(session, outcome.hits, "input", operation)
            if outcome.blocked:
                category = next(h.category for h in outcome.hits if h.action.value == "block")
                return (
                    messages,
                    labels,
                    Refusal(grpc.StatusCode.PERMISSION_DENIED, f"messages: blocked by guardrail {category}"),
                )
            if outcome.text != message.content:
                copy = common_pb2.ChatMessage()
                copy.CopyFrom(message)
                copy.content = outcome.text
                message = copy
            out.append(message)
        return out, labels, None

    def add_cost(self, session: Session, model: str, cost: float) -> float:
        if cost > 0:
            self._metrics.cost_usd.labels(model).inc(cost)
        return self.costs.add(session.nonce, cost)
