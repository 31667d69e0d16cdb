"""The one record of a call: its event on `outrider.events` and its span, and the response.

A Chat or ChatStream gathers what it learns in a `ChatState` as it goes through the pipeline
(served tier, result, guard hits, cost, timings); `Recorder.chat` turns that into exactly one
`CallRecord` event, records the GenAI client metrics, and ends the spans with the same figures,
whatever the outcome.

Spans of a call: `invoke_agent {agent}` (the session turn) -> `chat {model}` -> `attempt`s. The
sidecar sees no other turn boundary than one Chat/ChatStream call (the agent's own tool runs
happen between calls, and CallTool spans stay children of the agent's trace context), so a turn
is one call's pipeline run; `gen_ai.conversation.id` (the session nonce) links a session's turns.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cache
from urllib.parse import urlsplit

from outrider.clock import Clock
from outrider.v1 import common_pb2, events_pb2, sidecar_pb2
from sidecar.flags._effects import SessionFlags
from sidecar.resilience._executor import Served
from sidecar.resilience._user_quotas import UserTicket
from sidecar.routing._router import Router
from sidecar.routing._session import Session
from sidecar.routing._versions import SERVED_BY_PRIMARY, Version
from sidecar.telemetry._genai_metrics import GenAIMetrics
from sidecar.telemetry._producer import TelemetryProducer
from sidecar.telemetry._producer_policy import new_event_id
from sidecar.telemetry._tracing import AgentSpan, ChatSpan, GrpcMetadata, ToolSpan, Tracing
from sidecar.upstream._provider import ChatResult

OK = events_pb2.OUTCOME_OK
ERROR = events_pb2.OUTCOME_ERROR
# the carrier of the agent's trace context: gRPC metadata or HTTP headers, as (key, value) pairs
TraceCarrier = GrpcMetadata | None
_ROLE_NAMES = {int(v): k.removeprefix("ROLE_").lower() for k, v in common_pb2.Role.items()}


def role_name(role: int) -> str:
    return _ROLE_NAMES.get(role, "unspecified")


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@cache
def server_of(url: str) -> tuple[str | None, int | None]:
    """server.address / server.port of an upstream URL (for span attributes)."""
    parts = urlsplit(url)
    try:
        return parts.hostname, parts.port
    except ValueError:
        return parts.hostname, None


@dataclass(slots=True)
class ChatState:
    """What a Chat or ChatStream gathered for its record and response."""

    operation: str
    priority: bool = False
    start: float = field(default_factory=time.perf_counter)
    served: Served | None = None
    result: ChatResult | None = None
    user_ticket: UserTicket | None = None
    guard_hits: list[str] = field(default_factory=list)
    error_class: str = ""
    ttft_ms: float = 0.0
    attempts: int = 0
    cost_usd: float = 0.0
    session_cost_usd: float = 0.0
    span: ChatSpan | None = None
    span_scope: AbstractContextManager[ChatSpan] | None = None
    agent_span: AgentSpan | None = None  # the turn's invoke_agent span, the chat span's parent
    agent_scope: AbstractContextManager[AgentSpan] | None = None


class Recorder:
    """Builds events, spans and responses for one sidecar's agent."""

    def __init__(
        self,
        *,
        agent: str,
        sidecar_id: str,
        router: Router,
        telemetry: TelemetryProducer,
        tracing: Tracing,
        clock: Clock,
        genai: GenAIMetrics | None = None,
    ) -> None:
        self._agent = agent
        self._genai = genai
        self._sidecar_id = sidecar_id
        self._router = router
        self._telemetry = telemetry
        self._tracing = tracing
        self._clock = clock
        self.flags: SessionFlags | None = None  # the agent's feature flags, when it has any

    def event(self, session: Session) -> events_pb2.Event:
        """An event of `session`, with its version, role, rollout, randomization unit and flags."""
        event = events_pb2.Event(
            event_id=new_event_id(),
            time_unix_nano=int(self._clock.now() * 1e9),
            agent=self._agent,
            version_id=session.version_id,
            role=session.role,  # type: ignore[arg-type]
            session_id=session.nonce,
            sidecar_id=self._sidecar_id,
            rollout_id=session.rollout_id,
            unit_id=self._router.unit_of(
                session.nonce, session.user_id, session.tenant_id, session.rollout_id
            )
            if session.rollout_id
            else "",
            cohort=session.cohort,  # per-tenant canaries: the collector's gates take "split" only
        )
        if self.flags is not None:
            event.flags.update(self.flags.assignments(session))
        return event

    def emit(self, event: events_pb2.Event) -> None:
        self._telemetry.emit(event)

    def start_chat_span(
        self, trace_metadata: TraceCarrier, session: Session, version: Version, state: ChatState
    ) -> None:
        address, port = server_of(version.chat_url)
        agent_scope = self._tracing.agent_span(
            self._tracing.extract_parent(trace_metadata),
            agent=self._agent,
            conversation_id=session.nonce,
            version_id=version.version_id,
            role=role_name(session.role),
        )
        agent_span = state.agent_span = agent_scope.__enter__()
        state.agent_scope = agent_scope
        scope = self._tracing.chat_span(
            agent_span.context,
            model=version.model,
            provider=version.provider,
            server_address=address,
            server_port=port,
            conversation_id=session.nonce,
            version_id=version.version_id,
            role=role_name(session.role),
            request_params=version.config.parameters,
            stream=state.operation == "chat_stream",
        )
        state.span = scope.__enter__()
        state.span_scope = scope

    def tool_span(
        self, trace_metadata: TraceCarrier, session: Session, version: Version, tool: str, endpoint: str
    ) -> AbstractContextManager[ToolSpan]:
        address, port = server_of(endpoint)
        return self._tracing.tool_span(
            self._tracing.extract_parent(trace_metadata),
            tool=tool,
            server_address=address,
            server_port=port,
            conversation_id=session.nonce,
            version_id=version.version_id,
            role=role_name(session.role),
        )

    def chat(self, session: Session, version: Version, state: ChatState) -> events_pb2.CallRecord:
        """Emit the call's one event and end its span with the same figures."""
        event = self.event(session)
        record = event.call
        record.operation = state.operation
        record.provider = version.provider
        record.model = version.model
        record.latency_ms = elapsed_ms(state.start)
        record.time_to_first_token_ms = state.ttft_ms
        record.priority = state.priority
        record.guard_hits.extend(state.guard_hits)
        record.attempts = state.attempts
        served = state.served
        if served is not None:
            target = served.tier.target
            if target is not None:
                record.provider, record.model = target.provider, target.model
            record.served_by = served.tier.name
            record.degraded = served.degraded
            record.fallback_tier = served.tier.index
            record.quota_wait_ms = served.quota_wait_ms
            record.attempts = served.attempts
        else:
            record.served_by = SERVED_BY_PRIMARY
        result = state.result
        if result is not None and not state.error_class:
            record.outcome = OK
            record.input_tokens = result.input_tokens
            record.output_tokens = result.output_tokens
            record.cached_input_tokens = result.cached_input_tokens
            record.cost_usd = state.cost_usd
        else:
            record.outcome = ERROR
            record.error_class = state.error_class or "cancelled"
        self._telemetry.emit(event)
        self._record_genai(version, state, record)
        _end_span(state, record)
        return record

    def _record_genai(self, version: Version, state: ChatState, record: events_pb2.CallRecord) -> None:
        if self._genai is None:
            return
        ok = record.outcome == OK
        self._genai.record(
            operation="chat",  # the conventions' operation name, streamed or not
            provider=record.provider,
            model=record.model,
            version_id=version.version_id,
            duration_s=record.latency_ms / 1000.0,
            error_type="" if ok else record.error_class,
            time_to_first_chunk_s=state.ttft_ms / 1000.0
            if ok and state.operation == "chat_stream" and state.ttft_ms
            else None,
            input_tokens=record.input_tokens if ok else None,
            output_tokens=record.output_tokens if ok else None,
        )


def _end_span(state: ChatState, record: events_pb2.CallRecord) -> None:
    try:
        _end_chat_span(state, record)
    finally:
        agent, agent_scope = state.agent_span, state.agent_scope
        state.agent_span = state.agent_scope = None
        if agent is not None and agent_scope is not None:
            if record.outcome != OK:
                agent.set_error(record.error_class)
            agent_scope.__exit__(None, None, None)


def _end_chat_span(state: ChatState, record: events_pb2.CallRecord) -> None:
    span, scope = state.span, state.span_scope
    if span is None or scope is None:
        return
    state.span = state.span_scope = None
    result = state.result
    ok = record.outcome == OK
    span.set_response(
        model=(result.model or record.model) if result is not None else None,
        response_id=result.response_id if result is not None else None,
        finish_reasons=[result.finish_reason] if result is not None and result.finish_reason else (),
        input_tokens=record.input_tokens if ok else None,
        output_tokens=record.output_tokens if ok else None,
        cost_usd=record.cost_usd if ok else None,
        tier=record.fallback_tier if state.served is not None else None,
        degraded=record.degraded if state.served is not None else None,
    )
    if record.quota_wait_ms:
        span.set_quota_wait(record.quota_wait_ms)
    if state.guard_hits:
        span.set_guard_hits(state.guard_hits)
    if not ok:
        span.set_error(record.error_class)
    elif result is not None and span.captures_content:
        span.set_output_messages(
            [common_pb2.ChatMessage(role="assistant", content=result.content)],
            finish_reason=result.finish_reason or "stop",
        )
    scope.__exit__(None, None, None)


def chat_response(session: Session, version: Version, state: ChatState) -> sidecar_pb2.ChatResponse:
    """The response to a served call (the final chunk of a stream)."""
    result, served = state.result, state.served
    assert result is not None and served is not None
    target = served.tier.target
    response = sidecar_pb2.ChatResponse(
        finish_reason=result.finish_reason,
        version_id=version.version_id,
        role=session.role,  # type: ignore[arg-type]
        served_by=served.tier.name,
        degraded=served.degraded,
        response_id=result.response_id,
        model=result.model or (target.model if target is not None else "static"),
        cost_usd=state.cost_usd,
        fallback_tier=served.tier.index,
        attempts=served.attempts,
        session_cost_usd=state.session_cost_usd,
    )
    # filled in place: a sub-message passed to the constructor is built, then copied in
    message = response.message
    message.role, message.content = "assistant", result.content
    for tool_call in result.tool_calls:
        message.tool_calls.add(id=tool_call.id, name=tool_call.name, arguments_json=tool_call.arguments)
    usage = response.usage
    usage.input_tokens, usage.output_tokens = result.input_tokens, result.output_tokens
    usage.cached_input_tokens = result.cached_input_tokens
    return response
