"""The agent-facing gRPC service (`outrider.v1.Sidecar`) on grpc.aio.

Each handler resolves the session token to its pinned version, validates the request
(status INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION with a message naming the
field), calls the upstream and maps `UpstreamError` to a status:

    UpstreamTimeout                -> DEADLINE_EXCEEDED
    other, retriable               -> UNAVAILABLE
    other, not retriable           -> INTERNAL

Sessions that are expired or drained (their version retired by a rollback or abort, past
its drain deadline: see sidecar.routing._drain) get FAILED_PRECONDITION with an ErrorInfo reason,
SESSION_EXPIRED or SESSION_DRAINED. Feedback still counts on them: it is late evidence.

Every Chat, ChatStream, CallTool and Feedback that gets past validation emits exactly one
Event, whatever its outcome (a cancelled call too). Requests refused by validation never
reached a version and emit none.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NoReturn
from urllib.parse import urlsplit

import grpc

from outrider import SESSION_DRAINED, SESSION_EXPIRED
from outrider.clock import Clock
from outrider.v1 import common_pb2, events_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar.guards import Hit, StreamRedactor
from sidecar.guards._safety import Safety
from sidecar.resilience._executor import ChatFailed, Executor, Served, estimate_tokens, upstream_status
from sidecar.resilience._user_quotas import Refusal, UserQuotas, UserTicket
from sidecar.routing._drain import DrainTracker, drained_status, precondition_status
from sidecar.routing._router import Router
from sidecar.routing._session import Session, SessionCodec, SessionExpired, UnknownSession, new_nonce
from sidecar.routing._versions import SERVED_BY_PRIMARY, Version
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.telemetry._producer import TelemetryProducer
from sidecar.telemetry._tracing import ChatSpan, Tracing
from sidecar.upstream._exceptions import UpstreamError
from sidecar.upstream._provider import ChatResult

_ROLES = frozenset({"user", "assistant", "tool", "system"})
_OK = events_pb2.OUTCOME_OK
_ERROR = events_pb2.OUTCOME_ERROR
_FEEDBACK_KINDS = frozenset(v for v in sidecar_pb2.FeedbackKind.values() if v != 0)


class _Aborted(Exception):
    """Internal: carry a status from a helper to the handler."""

    def __init__(self, code: grpc.StatusCode, message: str, status: grpc.Status | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status  # a rich status (ErrorInfo) to abort with instead of code + message


def _fail(code: grpc.StatusCode, message: str) -> NoReturn:
    raise _Aborted(code, message)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@cache
def _server_of(url: str) -> tuple[str | None, int | None]:
    """server.address / server.port of an upstream URL (for span attributes)."""
    parts = urlsplit(url)
    try:
        return parts.hostname, parts.port
    except ValueError:
        return parts.hostname, None


_ROLE_NAMES = {int(v): k.removeprefix("ROLE_").lower() for k, v in common_pb2.Role.items()}


def _role_name(role: int) -> str:
    return _ROLE_NAMES.get(role, "unspecified")


@dataclass(slots=True)
class _Call:
    """What a Chat or ChatStream gathered for its event and response."""

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


class _GuardBlocked(Exception):
    def __init__(self, hits: Sequence[Hit]) -> None:
        blocking = [h.category for h in hits if h.action.value == "block"]
        self.category = blocking[0] if blocking else "output"
        super().__init__(self.category)


async def _chain(
    first: str | ChatResult, rest: AsyncGenerator[str | ChatResult, None] | None
) -> AsyncIterator[str | ChatResult]:
    yield first
    if rest is not None:
        async for item in rest:
            yield item


def _redacted_total(redactor: StreamRedactor, content: str, version: Version) -> str:
    """The final message carries the same redactions the deltas had."""
    return version.guards.scan_output(content).text if redactor.hits else content


class SidecarService(sidecar_pb2_grpc.SidecarServicer):
    def __init__(
        self,
        *,
        agent: str,
        versions: Mapping[str, Version],
        router: Router,
        codec: SessionCodec,
        executor: Executor,
        user_quotas: UserQuotas,
        safety: Safety,
        metrics: SidecarMetrics,
        telemetry: TelemetryProducer,
        clock: Clock,
        sidecar_id: str,
        max_request_bytes: int,
        tracing: Tracing | None = None,
        drain: DrainTracker | None = None,
    ) -> None:
        self._agent = agent
        self._drain = drain
        self._tracing = tracing if tracing is not None else Tracing(None)
        self._versions = versions
        self._router = router
        self._codec = codec
        self._executor = executor
        self._user_quotas = user_quotas
        self._safety = safety
        self._metrics = metrics
        self._telemetry = telemetry
        self._clock = clock
        self._sidecar_id = sidecar_id
        self._max_bytes = max_request_bytes

    # helpers

    def _resolve(self, token: str, *, allow_expired: bool = False) -> tuple[Session, Version]:
        if not token:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "session_id: must not be empty")
        try:
            session = self._codec.decode(token, allow_expired=allow_expired)
        except UnknownSession:
            raise _Aborted(grpc.StatusCode.NOT_FOUND, "session_id: unknown session") from None
        except SessionExpired as exc:
            self._metrics.sessions_refused.labels(SESSION_EXPIRED).inc()
            message = f"session_id: {exc}"
            raise _Aborted(
                grpc.StatusCode.FAILED_PRECONDITION, message, precondition_status(SESSION_EXPIRED, message)
            ) from None
        # Feedback (allow_expired) is late evidence about the version: drained sessions still send it
        if not allow_expired and self._drain is not None and (retired := self._drain.check(session)):
            self._metrics.sessions_refused.labels(SESSION_DRAINED).inc()
            status = drained_status(retired)
            raise _Aborted(status.code, status.details, status)
        version = self._versions.get(session.version_id)
        if version is None:
            _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session_id: pinned version {session.version_id} is not served by this sidecar; "
                "open a new session",
            )
        return session, version

    def _check_chat(self, request: sidecar_pb2.ChatRequest) -> None:
        if not request.messages:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "messages: must not be empty")
        for index, message in enumerate(request.messages):
            if message.role not in _ROLES:
                _fail(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"messages[{index}].role: must be one of user, assistant, tool, system; "
                    f"got {message.role!r}",
                )
        size = request.ByteSize()
        if size > self._max_bytes:
            _fail(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"messages: request of {size} bytes exceeds max_request_bytes ({self._max_bytes})",
            )

    def _event(self, session: Session) -> events_pb2.Event:
        return events_pb2.Event(
            event_id=uuid.uuid4().hex,
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
        )

    def _deadline(self, context: grpc.aio.ServicerContext[Any, Any], version: Version) -> float:
        """The call's single deadline, as time.monotonic(): the gRPC one, else resilience.deadline."""
        remaining: float | None = context.time_remaining()
        if remaining is None:
            remaining = version.config.resilience.deadline
        elif remaining <= 0:
            _fail(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call started")
        return time.monotonic() + remaining

    def _call_event(self, session: Session, version: Version, call: _Call) -> None:
        event = self._event(session)
        record = event.call
        record.operation = call.operation
        record.provider = version.provider
        record.model = version.model
        record.latency_ms = _ms(call.start)
        record.time_to_first_token_ms = call.ttft_ms
        record.priority = call.priority
        record.guard_hits.extend(call.guard_hits)
        record.attempts = call.attempts
        served = call.served
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
        result = call.result
        if result is not None and not call.error_class:
            record.outcome = _OK
            record.input_tokens = result.input_tokens
            record.output_tokens = result.output_tokens
            record.cached_input_tokens = result.cached_input_tokens
            record.cost_usd = call.cost_usd
        else:
            record.outcome = _ERROR
            record.error_class = call.error_class or "cancelled"
        self._telemetry.emit(event)
        self._end_span(call, record)

    def _start_span(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        session: Session,
        version: Version,
        call: _Call,
    ) -> None:
        address, port = _server_of(version.chat_url)
        scope = self._tracing.chat_span(
            self._tracing.extract_parent(context.invocation_metadata()),
            model=version.model,
            provider=version.provider,
            server_address=address,
            server_port=port,
            conversation_id=session.nonce,
            version_id=version.version_id,
            role=_role_name(session.role),
            request_params=version.config.parameters,
            stream=call.operation == "chat_stream",
        )
        call.span = scope.__enter__()
        call.span_scope = scope

    @staticmethod
    def _end_span(call: _Call, record: events_pb2.CallRecord) -> None:
        span, scope = call.span, call.span_scope
        if span is None or scope is None:
            return
        call.span = call.span_scope = None
        result = call.result
        span.set_response(
            model=(result.model or record.model) if result is not None else None,
            response_id=result.response_id if result is not None else None,
            finish_reasons=[result.finish_reason] if result is not None and result.finish_reason else (),
            input_tokens=record.input_tokens if record.outcome == _OK else None,
            output_tokens=record.output_tokens if record.outcome == _OK else None,
            cost_usd=record.cost_usd if record.outcome == _OK else None,
            tier=record.fallback_tier if call.served is not None else None,
            degraded=record.degraded if call.served is not None else None,
        )
        if record.quota_wait_ms:
            span.set_quota_wait(record.quota_wait_ms)
        if call.guard_hits:
            span.set_guard_hits(call.guard_hits)
        if record.outcome != _OK:
            span.set_error(record.error_class)
        elif result is not None:
            span.set_output_messages(
                [common_pb2.ChatMessage(role="assistant", content=result.content)],
                finish_reason=result.finish_reason or "stop",
            )
        scope.__exit__(None, None, None)

    def _response(self, session: Session, version: Version, call: _Call) -> sidecar_pb2.ChatResponse:
        result, served = call.result, call.served
        assert result is not None and served is not None
        message = common_pb2.ChatMessage(role="assistant", content=result.content)
        for tool_call in result.tool_calls:
            message.tool_calls.add(id=tool_call.id, name=tool_call.name, arguments_json=tool_call.arguments)
        target = served.tier.target
        return sidecar_pb2.ChatResponse(
            message=message,
            finish_reason=result.finish_reason,
            usage=common_pb2.Usage(
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                cached_input_tokens=result.cached_input_tokens,
            ),
            version_id=version.version_id,
            role=session.role,  # type: ignore[arg-type]
            served_by=served.tier.name,
            degraded=served.degraded,
            response_id=result.response_id,
            model=result.model or (target.model if target is not None else "static"),
            cost_usd=call.cost_usd,
            fallback_tier=served.tier.index,
            attempts=served.attempts,
            session_cost_usd=call.session_cost_usd,
        )

    async def _admit(
        self,
        request: sidecar_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        operation: str,
    ) -> tuple[Session, Version, float, _Call, Sequence[common_pb2.ChatMessage]]:
        """Validate, scan input, check the user/tenant quotas: everything before the executor."""
        try:
            session, version = self._resolve(request.session_id)
            self._check_chat(request)
            deadline = self._deadline(context, version)
        except _Aborted as exc:
            await _abort(context, exc)
        call = _Call(operation, priority=request.priority)
        self._start_span(context, session, version, call)
        messages, call.guard_hits, blocked = self._safety.scan_input(
            version.guards, session, request.messages, operation
        )
        if call.span is not None:
            call.span.set_input_messages(messages)
        if blocked is not None:
            call.error_class = "guard_blocked_input"
            self._call_event(session, version, call)
            await context.abort(blocked.code, blocked.message)
        ticket = self._user_quotas.admit(session, estimate_tokens(version, messages))
        if isinstance(ticket, Refusal):
            self._metrics.quota_refused.labels(ticket.message.split(" ", 1)[0]).inc()
            call.error_class = "quota"
            self._call_event(session, version, call)
            await context.abort_with_status(  # type: ignore[attr-defined]
                ticket.status()
            )
            raise AssertionError("unreachable")  # noqa: TRY004
        call.user_ticket = ticket
        return session, version, deadline, call, messages

    async def _failed(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        session: Session,
        version: Version,
        call: _Call,
        exc: ChatFailed,
    ) -> NoReturn:
        if call.user_ticket is not None:
            self._user_quotas.reconcile(call.user_ticket, 0.0)
        call.error_class, call.attempts = exc.error_class, exc.attempts
        self._call_event(session, version, call)
        if exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            await context.abort_with_status(  # type: ignore[attr-defined]
                Refusal(exc.code, exc.message, exc.retry_after_s).status()
            )
        await context.abort(exc.code, exc.message)
        raise AssertionError("unreachable")

    def _finish(self, session: Session, version: Version, call: _Call) -> None:
        """Settle quotas with the actual usage and price the call."""
        result, served = call.result, call.served
        assert result is not None and served is not None
        used = result.input_tokens + result.output_tokens
        if call.user_ticket is not None:
            self._user_quotas.reconcile(call.user_ticket, used)
            call.user_ticket = None
        target = served.tier.target
        if target is not None:
            model = target.model
            call.cost_usd = version.prices.cost(
                model,
                result.input_tokens,
                result.output_tokens,
                min(result.cached_input_tokens, result.input_tokens),
            )
            call.session_cost_usd = self._safety.add_cost(session, model, call.cost_usd)
        else:
            call.session_cost_usd = self._safety.costs.total(session.nonce)

    # RPCs

    async def OpenSession(
        self, request: sidecar_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sidecar_pb2.OpenSessionResponse:
        if request.agent and request.agent != self._agent:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"agent: unknown agent {request.agent!r}; this sidecar serves {self._agent!r}",
            )
        nonce = new_nonce()
        assignment = self._router.assign(nonce, request.user_id, request.tenant_id)
        token, session = self._codec.issue(
            nonce=nonce,
            version_id=assignment.version_id,
            role=assignment.role,
            rollout_id=assignment.rollout_id,
            user_id=request.user_id,
            tenant_id=request.tenant_id,
        )
        return sidecar_pb2.OpenSessionResponse(
            session_id=token,
            version_id=session.version_id,
            role=session.role,  # type: ignore[arg-type]
            expires_at_unix_nano=int(session.expires_at * 1e9),
            rollout_id=session.rollout_id,
        )

    async def Chat(
        self, request: sidecar_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sidecar_pb2.ChatResponse:
        session, version, deadline, call, messages = await self._admit(request, context, "chat")
        try:
            call.served = await self._executor.chat(version, messages, deadline, request.priority, call.span)
        except ChatFailed as exc:
            await self._failed(context, session, version, call, exc)
        except asyncio.CancelledError:
            if call.user_ticket is not None:
                self._user_quotas.reconcile(call.user_ticket, 0.0)
            self._call_event(session, version, call)
            raise
        self._executor.settle(call.served)
        result = call.result = call.served.result
        self._finish(session, version, call)
        if version.guards.rules_for("output") and result.content:
            outcome = version.guards.scan_output(result.content)
            call.guard_hits += self._safety.report(session, outcome.hits, "output", "chat")
            if outcome.blocked:
                call.error_class = "guard_blocked_output"
                self._call_event(session, version, call)
                category = next(h.category for h in outcome.hits if h.action.value == "block")
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"reply blocked by guardrail {category}"
                )
            result.content = outcome.text
        self._call_event(session, version, call)
        return self._response(session, version, call)

    async def ChatStream(
        self, request: sidecar_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[sidecar_pb2.ChatChunk]:
        session, version, deadline, call, messages = await self._admit(request, context, "chat_stream")
        try:
            served, stream, first = await self._executor.chat_stream(
                version, messages, deadline, request.priority, call.span
            )
        except ChatFailed as exc:
            await self._failed(context, session, version, call, exc)
        except asyncio.CancelledError:
            if call.user_ticket is not None:
                self._user_quotas.reconcile(call.user_ticket, 0.0)
            self._call_event(session, version, call)
            raise
        call.served = served
        redactor = StreamRedactor(version.guards) if version.guards.rules_for("output") else None
        settled = False
        try:
            items = _chain(first, stream)
            async for item in items:
                if isinstance(item, ChatResult):
                    call.result = item
                    continue
                text = item
                if redactor is not None:
                    out = redactor.feed(item)
                    call.guard_hits += self._safety.report(session, out.hits, "output", "chat_stream")
                    text = out.text_to_emit
                    if out.blocked:
                        if text:
                            yield sidecar_pb2.ChatChunk(content_delta=text)
                        raise _GuardBlocked(out.hits)  # noqa: TRY301
                if text:
                    if not call.ttft_ms:
                        call.ttft_ms = _ms(call.start)
                    yield sidecar_pb2.ChatChunk(content_delta=text)
            if stream is None:  # a static tier: its one item was the whole answer
                call.result = served.result
            if redactor is not None:
                out = redactor.finish()
                call.guard_hits += self._safety.report(session, out.hits, "output", "chat_stream")
                if out.text_to_emit:
                    yield sidecar_pb2.ChatChunk(content_delta=out.text_to_emit)
                if out.blocked:
                    raise _GuardBlocked(out.hits)  # noqa: TRY301
                if call.result is not None:
                    call.result.content = _redacted_total(redactor, call.result.content, version)
        except UpstreamError as exc:
            self._executor.stream_done(version, served, exc)
            settled = True
            call.error_class = exc.error_class
            self._finish_stream_error(session, version, call)
            await context.abort(
                upstream_status(exc), f"stream from {served.tier.name} failed after the first delta: {exc}"
            )
        except _GuardBlocked as blocked:
            self._executor.stream_done(version, served, None)
            settled = True
            call.error_class = "guard_blocked_output"
            self._finish_stream_error(session, version, call)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"reply blocked by guardrail {blocked.category}"
            )
        finally:
            if stream is not None:
                await stream.aclose()
            if not settled and call.result is None:  # cancelled by the agent
                self._executor.stream_cancelled(version, served)
                self._finish_stream_error(session, version, call)
        assert call.result is not None
        self._executor.stream_done(version, served, None)
        served.result = call.result
        self._finish(session, version, call)
        if not call.ttft_ms:
            call.ttft_ms = _ms(call.start)
        self._call_event(session, version, call)
        response = self._response(session, version, call)
        if call.result.tool_calls:
            yield sidecar_pb2.ChatChunk(tool_calls=response.message.tool_calls)
        yield sidecar_pb2.ChatChunk(final=response)

    def _finish_stream_error(self, session: Session, version: Version, call: _Call) -> None:
        if call.user_ticket is not None:
            self._user_quotas.reconcile(call.user_ticket, 0.0)
            call.user_ticket = None
        call.result = None
        self._call_event(session, version, call)

    async def CallTool(
        self, request: sidecar_pb2.CallToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sidecar_pb2.CallToolResponse:
        try:
            session, version = self._resolve(request.session_id)
            if not request.tool_name:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, "tool_name: must not be empty")
            tool = version.tools.get(request.tool_name)
            if tool is None:
                _fail(
                    grpc.StatusCode.NOT_FOUND,
                    f"tool_name: version {version.label} ({version.version_id}) has no tool "
                    f"{request.tool_name!r}",
                )
            arguments = request.arguments_json or "{}"
            if len(arguments) > self._max_bytes:
                _fail(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"arguments_json: {len(arguments)} bytes exceeds max_request_bytes ({self._max_bytes})",
                )
            try:
                parsed = json.loads(arguments)
            except ValueError as exc:
                raise _Aborted(
                    grpc.StatusCode.INVALID_ARGUMENT, f"arguments_json: not valid JSON: {exc}"
                ) from None
            if not isinstance(parsed, dict):
                _fail(grpc.StatusCode.INVALID_ARGUMENT, "arguments_json: must be a JSON object")
            deadline = self._deadline(context, version)
        except _Aborted as exc:
            await _abort(context, exc)
        start = time.perf_counter()
        event = self._event(session)
        record = event.tool
        record.tool_name = tool.name
        address, port = _server_of(tool.endpoint)
        with self._tracing.tool_span(
            self._tracing.extract_parent(context.invocation_metadata()),
            tool=tool.name,
            server_address=address,
            server_port=port,
            conversation_id=session.nonce,
            version_id=version.version_id,
            role=_role_name(session.role),
        ) as span:
            span.set_arguments(arguments)
            try:
                result, attempts = await self._executor.call_tool(version, tool, arguments, deadline, span)
            except ChatFailed as exc:
                record.latency_ms = _ms(start)
                record.outcome = _ERROR
                record.error_class = exc.error_class
                self._telemetry.emit(event)
                span.set_error(exc.error_class)
                await context.abort(exc.code, exc.message)
            except UpstreamError as exc:
                record.latency_ms = _ms(start)
                record.outcome = _ERROR
                record.error_class = exc.error_class
                record.status_code = exc.status or 0
                record.attempts = getattr(exc, "attempts", 1)
                self._telemetry.emit(event)
                span.set_error(exc.error_class)
                await context.abort(upstream_status(exc), str(exc))
            except asyncio.CancelledError:
                record.latency_ms = _ms(start)
                record.outcome = _ERROR
                record.error_class = "cancelled"
                self._telemetry.emit(event)
                span.set_error("cancelled")
                raise
            span.set_result(result.result_json)
        latency = _ms(start)
        record.latency_ms = latency
        record.outcome = _OK
        record.status_code = result.status
        record.attempts = attempts
        self._telemetry.emit(event)
        return sidecar_pb2.CallToolResponse(
            result_json=result.result_json,
            status_code=result.status,
            version_id=version.version_id,
            latency_ms=latency,
            attempts=attempts,
        )

    async def Feedback(
        self, request: sidecar_pb2.FeedbackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sidecar_pb2.FeedbackResponse:
        try:
            # feedback often arrives after the conversation: an expired (but genuine) session counts
            session, _ = self._resolve(request.session_id, allow_expired=True)
            if request.kind not in _FEEDBACK_KINDS:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, f"kind: unknown feedback kind {request.kind}")
            if request.kind == sidecar_pb2.FEEDBACK_KIND_SCORE and not 0.0 <= request.score <= 1.0:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, f"score: must be in [0, 1], got {request.score}")
        except _Aborted as exc:
            await _abort(context, exc)
        event = self._event(session)
        event.feedback.kind = request.kind
        event.feedback.score = request.score
        self._telemetry.emit(event)
        return sidecar_pb2.FeedbackResponse()

    async def GetVersion(
        self, request: sidecar_pb2.GetVersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sidecar_pb2.VersionInfo:
        try:
            if request.session_id:
                _, version = self._resolve(request.session_id)
                return version.info
            if not request.version_id:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, "session_id or version_id: set one")
            found = self._versions.get(request.version_id)
            if found is None:
                _fail(grpc.StatusCode.NOT_FOUND, f"version_id: unknown version {request.version_id!r}")
            return found.info
        except _Aborted as exc:
            await _abort(context, exc)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: _Aborted) -> NoReturn:
    if exc.status is not None:
        await context.abort_with_status(exc.status)  # type: ignore[attr-defined]
    await context.abort(exc.code, exc.message)
    raise AssertionError("unreachable")  # context.abort raises
