"""Guard hits to events and metrics, input scanning with redaction, and session cost totals.

One `safety` event per hit; a block on input is a `Refusal` (PERMISSION_DENIED).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from outrider.clock import Clock
from outrider.v1 import common_pb2
from sidecar._record import Recorder
from sidecar.guards import GuardPolicy, Hit
from sidecar.resilience._user_quotas import Refusal
from sidecar.routing._session import Session
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.telemetry._series import SeriesCache
from sidecar.upstream._cost import SessionCostTracker


class Safety:
    """Guard hits to events and metrics; session cost totals."""

    def __init__(self, *, recorder: Recorder, clock: Clock, metrics: SidecarMetrics) -> None:
        self._recorder = recorder
        self._metrics = metrics
        self.costs = SessionCostTracker(clock=clock)
        self._series = SeriesCache()

    def report(self, session: Session, hits: Sequence[Hit], direction: str, operation: str) -> list[str]:
        """One safety event per hit; the "category:action" labels for the call record."""
        labels = []
        for hit in hits:
            event = self._recorder.event(session)
            record = event.safety
            record.category = hit.category
            record.action = hit.action.value
            record.guard = hit.guard_name
            record.count = hit.count
            record.direction = direction
            record.operation = operation
            self._recorder.emit(event)
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
            self._series(self._metrics.cost_usd, model).inc(cost)
        return self.costs.add(session.nonce, cost)
