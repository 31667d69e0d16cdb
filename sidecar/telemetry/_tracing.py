"""GenAI spans for the calls the sidecar carries, with W3C trace context in and out.

The server calls a `Tracing` per request:

    parent = tracing.extract_parent(context.invocation_metadata())
    with tracing.chat_span(parent, model=..., provider=..., conversation_id=...) as span:
        with span.attempt(1, tier=0) as attempt:
            response = await provider.chat(..., headers=attempt.headers())
        span.set_response(model=..., response_id=..., input_tokens=..., ...)

Spans are never made "current" (no context attach/detach): a handle carries its own
`context`, children are parented on it explicitly, and `headers()` gives the `traceparent`
to pass on. That keeps async generators (ChatStream) safe, where a context attached in one
task may be detached in another.

The tracer provider is always passed in, never taken from the global one, so tests use an
InMemorySpanExporter and a sidecar with tracing off pays for a no-op tracer only. With no
provider, spans are not recorded but the agent's trace context still flows to providers
and tools.

Prompt and completion text are recorded (as `gen_ai.input.messages` /
`gen_ai.output.messages` JSON) only when `capture_content` is on; see
`_semconv.capture_content_enabled`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from sidecar.telemetry import _semconv as sc
from sidecar.telemetry._lite_spans import LiteTracer

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "outrider.sidecar"

# request parameter name (as in the version's parameters) -> gen_ai.request.* attribute
_REQUEST_PARAMS: Mapping[str, str] = {
    "temperature": sc.GEN_AI_REQUEST_TEMPERATURE,
    "max_tokens": sc.GEN_AI_REQUEST_MAX_TOKENS,
    "top_p": sc.GEN_AI_REQUEST_TOP_P,
}

GrpcMetadata = Iterable[tuple[str, str | bytes]]


# --- message content (opt-in) ------------------------------------------------------------


class ToolCallLike(Protocol):
    """What a tool call looks like (`outrider.v1.ToolCall` fits)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def arguments_json(self) -> str: ...


class MessageLike(Protocol):
    """What a chat message looks like (`outrider.v1.ChatMessage` fits)."""

    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def tool_call_id(self) -> str: ...
    @property
    def tool_calls(self) -> Iterable[ToolCallLike]: ...


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return raw


def message_parts(message: MessageLike) -> list[dict[str, Any]]:
    """A message as GenAI semconv parts: text, tool_call, tool_call_response."""
    if message.role == "tool":
        return [{"type": "tool_call_response", "id": message.tool_call_id, "response": message.content}]
    parts: list[dict[str, Any]] = []
    if message.content:
        parts.append({"type": "text", "content": message.content})
    for call in message.tool_calls:
        parts.append(
            {
                "type": "tool_call",
                "id": call.id,
                "name": call.name,
                "arguments": _arguments(call.arguments_json),
            }
        )
    return parts


def messages_json(messages: Iterable[MessageLike], *, finish_reason: str | None = None) -> str:
    """The JSON value of `gen_ai.input.messages` (or, with finish_reason, `.output.messages`)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role, "parts": message_parts(message)}
        if finish_reason is not None:
            entry["finish_reason"] = finish_reason
        out.append(entry)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def error_type_of(exc: BaseException) -> str:
    """A low-cardinality `error.type` for an exception: its class name."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return type(exc).__qualname__


# --- span handles ------------------------------------------------------------------------


class _Handle:
    """One span plus the context that makes it the parent of what it calls."""

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self.span = span
        self.context: Context = trace.set_span_in_context(span, Context())
        self.error_type: str | None = None

    def headers(self) -> dict[str, str]:
        """`traceparent` (and `tracestate`) naming this span, for an outgoing HTTP call."""
        return self._tracing.inject_headers(self.context)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self.span.set_attribute(key, value)

    def set_error(self, error_type: str, description: str | None = None) -> None:
        """Mark the span failed. `description` must not carry content or secrets."""
        self.error_type = error_type or sc.ERROR_TYPE_OTHER
        self.span.set_attribute(sc.ERROR_TYPE, self.error_type)
        self.span.set_status(Status(StatusCode.ERROR, description))

    def set_quota_wait(self, wait_ms: float) -> None:
        self.span.set_attribute(sc.OUTRIDER_QUOTA_WAIT_MS, float(wait_ms))

    def set_guard_hits(self, hits: Sequence[str]) -> None:
        """Names of the guards (or categories) that fired, e.g. ["pii.email", "injection"]."""
        self.span.set_attribute(sc.OUTRIDER_GUARD_HITS, list(hits))


class AttemptSpan(_Handle):
    """One try at an upstream call: a child span `attempt`."""


class _RetryingHandle(_Handle):
    """A span whose upstream call may be tried more than once."""

    _server_address: str | None = None
    _server_port: int | None = None

    def attempt(
        self, number: int, *, tier: int | None = None, model: str | None = None
    ) -> SpanScope[AttemptSpan]:
        """A child span `attempt` around one try; an exception escaping it marks it failed."""
        attributes: dict[str, AttributeValue] = {sc.OUTRIDER_ATTEMPT: number}
        if tier is not None:
            attributes[sc.OUTRIDER_FALLBACK_TIER] = tier
        if model:
            attributes[sc.GEN_AI_REQUEST_MODEL] = model
        if self._server_address:
            attributes[sc.SERVER_ADDRESS] = self._server_address
        if self._server_port is not None:
            attributes[sc.SERVER_PORT] = self._server_port
        return self._tracing._span(sc.ATTEMPT_SPAN, SpanKind.CLIENT, self.context, attributes, AttemptSpan)

    def record_attempt(
        self,
        number: int,
        *,
        error_type: str | None = None,
        tier: int | None = None,
        duration_ms: float | None = None,
    ) -> None:
        """An `attempt` span event, for a retry loop that reports after the fact."""
        attributes: dict[str, AttributeValue] = {sc.OUTRIDER_ATTEMPT: number}
        if error_type:
            attributes[sc.ERROR_TYPE] = error_type
        if tier is not None:
            attributes[sc.OUTRIDER_FALLBACK_TIER] = tier
        if duration_ms is not None:
            attributes[sc.OUTRIDER_DURATION_MS] = float(duration_ms)
        self.span.add_event(sc.ATTEMPT_EVENT, attributes)


class ChatSpan(_RetryingHandle):
    """The `chat {model}` CLIENT span of one Chat / ChatStream call."""

    def record_fallback(
        self,
        tier: int,
        *,
        model: str | None = None,
        provider: str | None = None,
        reason: str | None = None,
    ) -> None:
        """A `fallback` span event: the call moved on to fallback `tier` (1 = first fallback)."""
        attributes: dict[str, AttributeValue] = {sc.OUTRIDER_FALLBACK_TIER: tier}
        if model:
            attributes[sc.GEN_AI_REQUEST_MODEL] = model
        if provider:
            attributes[sc.GEN_AI_PROVIDER_NAME] = provider
        if reason:
            attributes[sc.OUTRIDER_FALLBACK_REASON] = reason
        self.span.add_event(sc.FALLBACK_EVENT, attributes)

    def set_response(
        self,
        *,
        model: str | None = None,
        response_id: str | None = None,
        finish_reasons: Sequence[str] = (),
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        cost_usd: float | None = None,
        tier: int | None = None,
        degraded: bool | None = None,
    ) -> None:
        """What the call returned; None (or empty) leaves an attribute unset."""
        attributes: dict[str, AttributeValue] = {}
        if model:
            attributes[sc.GEN_AI_RESPONSE_MODEL] = model
        if response_id:
            attributes[sc.GEN_AI_RESPONSE_ID] = response_id
        if finish_reasons:
            attributes[sc.GEN_AI_RESPONSE_FINISH_REASONS] = list(finish_reasons)
        if input_tokens is not None:
            attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] = int(input_tokens)
        if output_tokens is not None:
            attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = int(output_tokens)
        if cost_usd is not None:
            attributes[sc.OUTRIDER_COST_USD] = float(cost_usd)
        if tier is not None:
            attributes[sc.OUTRIDER_FALLBACK_TIER] = tier
        if degraded is not None:
            attributes[sc.OUTRIDER_DEGRADED] = degraded
        self.span.set_attributes(attributes)

    @property
    def captures_content(self) -> bool:
        """Whether `set_*_messages` record anything (so callers can skip building them)."""
        return self._tracing.capture_content and self.span.is_recording()

    def set_input_messages(self, messages: Iterable[MessageLike]) -> None:
        """The prompt, only if content capture is on."""
        if self._tracing.capture_content and self.span.is_recording():
            self.span.set_attribute(sc.GEN_AI_INPUT_MESSAGES, messages_json(messages))

    def set_output_messages(self, messages: Iterable[MessageLike], *, finish_reason: str = "stop") -> None:
        """The completion, only if content capture is on."""
        if self._tracing.capture_content and self.span.is_recording():
            self.span.set_attribute(
                sc.GEN_AI_OUTPUT_MESSAGES, messages_json(messages, finish_reason=finish_reason)
            )


class ToolSpan(_RetryingHandle):
    """The `execute_tool {name}` span of one CallTool (or a tool run for a chat)."""

    def set_arguments(self, arguments_json: str) -> None:
        """The tool's arguments, only if content capture is on."""
        if self._tracing.capture_content:
            self.span.set_attribute(sc.GEN_AI_TOOL_CALL_ARGUMENTS, arguments_json)

    def set_result(self, result: str) -> None:
        """The tool's result, only if content capture is on."""
        if self._tracing.capture_content:
            self.span.set_attribute(sc.GEN_AI_TOOL_CALL_RESULT, result)

    def set_disposition(self, disposition: str) -> None:
        """`execute` (the tool ran) or `simulate` (a shadow session's write, intercepted)."""
        self.span.set_attribute(sc.GEN_AI_TOOL_CALL_DISPOSITION, disposition)
        if disposition == sc.TOOL_DISPOSITION_SIMULATE:
            self.span.set_attribute(sc.OUTRIDER_TOOL_INTERCEPTED, True)


class AgentSpan(_Handle):
    """The `invoke_agent {agent}` INTERNAL span of one session turn: the parent of its chat span."""


_H = TypeVar("_H", bound=_Handle)


class SpanScope(AbstractContextManager[_H]):
    """`with` around one started span: yields its handle, marks it failed when an exception
    escapes, ends it on the way out. A class, not a generator context manager: three spans a
    call, each entered on the request path."""

    __slots__ = ("handle",)

    def __init__(self, handle: _H) -> None:
        self.handle = handle

    def __enter__(self) -> _H:
        return self.handle

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        handle = self.handle
        try:
            if exc is not None and handle.error_type is None:
                handle.set_error(error_type_of(exc))
        finally:
            handle.span.end()


# --- the entry point ---------------------------------------------------------------------


class Tracing:
    """Span factory and trace-context codec for the sidecar's request path."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        capture_content: bool = False,
        *,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self.enabled = tracer_provider is not None
        self.capture_content = capture_content
        provider = tracer_provider if tracer_provider is not None else trace.NoOpTracerProvider()
        self._tracer = provider.get_tracer(INSTRUMENTATION_NAME)
        # spans as plain records while only the telemetry queue takes them (see _lite_spans)
        self._lite: LiteTracer | None = None
        if isinstance(provider, SdkTracerProvider):
            self._lite = LiteTracer(provider, INSTRUMENTATION_NAME)
        # W3C trace context only: baggage could carry the agent's data to third parties
        self._propagator = propagator or TraceContextTextMapPropagator()

    # trace context ----------------------------------------------------------------------

    def extract_parent(self, grpc_metadata: GrpcMetadata | None) -> Context:
        """The agent's span (from `traceparent`/`tracestate` metadata) as a parent context.

        No or malformed trace context gives an empty context: the call starts a new trace.
        """
        carrier: dict[str, str] = {}
        for key, value in grpc_metadata or ():
            name = key.lower()
            if name.endswith("-bin"):
                continue
            carrier[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return self._propagator.extract(carrier, context=Context())

    def inject_headers(self, ctx: Context | None) -> dict[str, str]:
        """HTTP headers carrying the span in `ctx` (empty if it holds no valid span)."""
        headers: dict[str, str] = {}
        self._propagator.inject(headers, context=ctx if ctx is not None else Context())
        return headers

    # spans ------------------------------------------------------------------------------

    def chat_span(
        self,
        parent_ctx: Context | None,
        *,
        model: str,
        provider: str,
        server_address: str | None = None,
        server_port: int | None = None,
        conversation_id: str | None = None,
        version_id: str | None = None,
        role: str | None = None,
        request_params: Mapping[str, Any] | None = None,
        stream: bool | None = None,
    ) -> SpanScope[ChatSpan]:
        """A `chat {model}` CLIENT span, child of `parent_ctx` (None: a new trace)."""
        attributes = self._common(
            sc.OPERATION_CHAT, server_address, server_port, conversation_id, version_id, role
        )
        attributes[sc.GEN_AI_PROVIDER_NAME] = provider
        if model:
            attributes[sc.GEN_AI_REQUEST_MODEL] = model
        if stream is not None:
            attributes[sc.GEN_AI_REQUEST_STREAM] = stream
        for name, value in (request_params or {}).items():
            key = _REQUEST_PARAMS.get(name)
            if key is not None and isinstance(value, int | float) and not isinstance(value, bool):
                attributes[key] = value
        scope = self._span(sc.chat_span_name(model), SpanKind.CLIENT, parent_ctx, attributes, ChatSpan)
        scope.handle._server_address, scope.handle._server_port = server_address, server_port
        return scope

    def agent_span(
        self,
        parent_ctx: Context | None,
        *,
        agent: str,
        conversation_id: str | None = None,
        version_id: str | None = None,
        role: str | None = None,
    ) -> SpanScope[AgentSpan]:
        """An `invoke_agent {agent}` INTERNAL span (the sidecar runs in the agent's process
        boundary, so not CLIENT), grouping a turn's spans under `gen_ai.conversation.id`."""
        attributes = self._common(sc.OPERATION_INVOKE_AGENT, None, None, conversation_id, version_id, role)
        if agent:
            attributes[sc.GEN_AI_AGENT_NAME] = agent
        return self._span(sc.agent_span_name(agent), SpanKind.INTERNAL, parent_ctx, attributes, AgentSpan)

    def tool_span(
        self,
        parent_ctx: Context | None,
        *,
        tool: str,
        call_id: str | None = None,
        server_address: str | None = None,
        server_port: int | None = None,
        conversation_id: str | None = None,
        version_id: str | None = None,
        role: str | None = None,
    ) -> SpanScope[ToolSpan]:
        """An `execute_tool {tool}` INTERNAL span (the conventions' kind for tool execution)."""
        attributes = self._common(
            sc.OPERATION_EXECUTE_TOOL, server_address, server_port, conversation_id, version_id, role
        )
        attributes[sc.GEN_AI_TOOL_NAME] = tool
        attributes[sc.GEN_AI_TOOL_TYPE] = sc.TOOL_TYPE_FUNCTION
        if call_id:
            attributes[sc.GEN_AI_TOOL_CALL_ID] = call_id
        scope = self._span(sc.tool_span_name(tool), SpanKind.INTERNAL, parent_ctx, attributes, ToolSpan)
        scope.handle._server_address, scope.handle._server_port = server_address, server_port
        return scope

    @staticmethod
    def _common(
        operation: str,
        server_address: str | None,
        server_port: int | None,
        conversation_id: str | None,
        version_id: str | None,
        role: str | None,
    ) -> dict[str, AttributeValue]:
        attributes: dict[str, AttributeValue] = {sc.GEN_AI_OPERATION_NAME: operation}
        if server_address:
            attributes[sc.SERVER_ADDRESS] = server_address
        if server_port is not None:
            attributes[sc.SERVER_PORT] = int(server_port)
        if conversation_id:
            attributes[sc.GEN_AI_CONVERSATION_ID] = conversation_id
        if version_id:
            attributes[sc.OUTRIDER_VERSION_ID] = version_id
        if role:
            attributes[sc.OUTRIDER_ROLE] = role
        return attributes

    def _span(
        self,
        name: str,
        kind: SpanKind,
        parent_ctx: Context | None,
        attributes: Mapping[str, AttributeValue],
        handle_type: type[_H],
    ) -> SpanScope[_H]:
        # an explicit empty Context, never the ambient one: the parent is what the caller says
        context = parent_ctx if parent_ctx is not None else Context()
        span = self._lite.start_span(name, context, kind, attributes) if self._lite is not None else None
        if span is None:
            span = self._tracer.start_span(name, context=context, kind=kind, attributes=attributes)
        return SpanScope(handle_type(self, span))
