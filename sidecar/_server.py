"""The agent-facing gRPC service (`outrider.v1.Sidecar`) on grpc.aio.

Each handler resolves the session token to its pinned version, validates the request
(status INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION with a message naming the
field), calls the upstream and maps `UpstreamError` to a status:

    UpstreamTimeout                -> DEADLINE_EXCEEDED
    other, retriable               -> UNAVAILABLE
    other, not retriable           -> INTERNAL

Every Chat, ChatStream, CallTool and Feedback that gets past validation emits exactly one
Event, whatever its outcome (a cancelled call too). Requests refused by validation never
reached a version and emit none.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, NoReturn

import grpc

from outrider.v1 import common_pb2, events_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar._clock import Clock
from sidecar._exceptions import UpstreamError, UpstreamTimeout
from sidecar._provider import ChatResult, ProviderClient
from sidecar._router import Router
from sidecar._session import Session, SessionCodec, SessionExpired, UnknownSession, new_nonce
from sidecar._telemetry import TelemetryProducer
from sidecar._tools import ToolClient
from sidecar._versions import SERVED_BY_PRIMARY, Version

_ROLES = frozenset({"user", "assistant", "tool", "system"})
_OK = events_pb2.OUTCOME_OK
_ERROR = events_pb2.OUTCOME_ERROR
_FEEDBACK_KINDS = frozenset(v for v in sidecar_pb2.FeedbackKind.values() if v != 0)


class _Aborted(Exception):
    """Internal: carry a status from a helper to the handler."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _fail(code: grpc.StatusCode, message: str) -> NoReturn:
    raise _Aborted(code, message)


def upstream_status(exc: UpstreamError) -> grpc.StatusCode:
    if isinstance(exc, UpstreamTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.UNAVAILABLE if exc.retriable else grpc.StatusCode.INTERNAL


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class SidecarService(sidecar_pb2_grpc.SidecarServicer):
    def __init__(
        self,
        *,
        agent: str,
        versions: Mapping[str, Version],
        router: Router,
        codec: SessionCodec,
        provider: ProviderClient,
        tools: ToolClient,
        telemetry: TelemetryProducer,
        clock: Clock,
        sidecar_id: str,
        max_request_bytes: int,
    ) -> None:
        self._agent = agent
        self._versions = versions
        self._router = router
        self._codec = codec
        self._provider = provider
        self._tools = tools
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
        except SessionExpired:
            raise _Aborted(
                grpc.StatusCode.FAILED_PRECONDITION, "session_id: session expired; open a new one"
            ) from None
        version = self._versions.get(session.version_id)
        if version is None:
            _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session_id: pinned version {session.version_id} is not served by this sidecar; "
                "open a new session",
            )
        return session, version

    def _timeout(self, context: grpc.aio.ServicerContext[Any, Any], configured: float) -> float:
        remaining: float | None = context.time_remaining()
        if remaining is None:
            return configured
        if remaining <= 0:
            _fail(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call started")
        return min(configured, remaining)

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
        )

    def _call_event(
        self,
        session: Session,
        version: Version,
        operation: str,
        latency_ms: float,
        *,
        result: ChatResult | None = None,
        error_class: str = "",
        ttft_ms: float = 0.0,
    ) -> None:
        event = self._event(session)
        record = event.call
        record.operation = operation
        record.provider = version.provider
        record.model = version.model
        record.latency_ms = latency_ms
        record.time_to_first_token_ms = ttft_ms
        record.served_by = SERVED_BY_PRIMARY
        if result is not None:
            record.outcome = _OK
            record.input_tokens = result.input_tokens
            record.output_tokens = result.output_tokens
        else:
            record.outcome = _ERROR
            record.error_class = error_class
        self._telemetry.emit(event)

    def _response(self, session: Session, version: Version, result: ChatResult) -> sidecar_pb2.ChatResponse:
        message = common_pb2.ChatMessage(role="assistant", content=result.content)
        for call in result.tool_calls:
            message.tool_calls.add(id=call.id, name=call.name, arguments_json=call.arguments)
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
            served_by=SERVED_BY_PRIMARY,
            degraded=False,
            response_id=result.response_id,
            model=result.model or version.model,
        )

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
        try:
            session, version = self._resolve(request.session_id)
            self._check_chat(request)
            timeout = self._timeout(context, version.config.request_timeout)
        except _Aborted as exc:
            await context.abort(exc.code, exc.message)
        start = time.perf_counter()
        try:
            result = await self._provider.chat(version, request.messages, timeout)
        except UpstreamError as exc:
            self._call_event(session, version, "chat", _ms(start), error_class=exc.error_class)
            await context.abort(upstream_status(exc), str(exc))
        except asyncio.CancelledError:
            self._call_event(session, version, "chat", _ms(start), error_class="cancelled")
            raise
        self._call_event(session, version, "chat", _ms(start), result=result)
        return self._response(session, version, result)

    async def ChatStream(
        self, request: sidecar_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[sidecar_pb2.ChatChunk]:
        try:
            session, version = self._resolve(request.session_id)
            self._check_chat(request)
            timeout = self._timeout(context, version.config.request_timeout)
        except _Aborted as exc:
            await context.abort(exc.code, exc.message)
        start = time.perf_counter()
        ttft = 0.0
        result: ChatResult | None = None
        error_class = "cancelled"
        try:
            async for item in self._provider.chat_stream(version, request.messages, timeout):
                if isinstance(item, str):
                    if not ttft:
                        ttft = _ms(start)
                    yield sidecar_pb2.ChatChunk(content_delta=item)
                else:
                    result = item
        except UpstreamError as exc:
            error_class = exc.error_class
            self._call_event(
                session, version, "chat_stream", _ms(start), error_class=error_class, ttft_ms=ttft
            )
            await context.abort(upstream_status(exc), str(exc))
        finally:
            if result is None and error_class == "cancelled":
                self._call_event(
                    session, version, "chat_stream", _ms(start), error_class=error_class, ttft_ms=ttft
                )
        assert result is not None
        if not ttft:
            ttft = _ms(start)
        self._call_event(session, version, "chat_stream", _ms(start), result=result, ttft_ms=ttft)
        response = self._response(session, version, result)
        if result.tool_calls:
            yield sidecar_pb2.ChatChunk(tool_calls=response.message.tool_calls)
        yield sidecar_pb2.ChatChunk(final=response)

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
            timeout = self._timeout(context, tool.timeout)
        except _Aborted as exc:
            await context.abort(exc.code, exc.message)
        start = time.perf_counter()
        event = self._event(session)
        record = event.tool
        record.tool_name = tool.name
        try:
            result = await self._tools.call(tool, arguments, timeout)
        except UpstreamError as exc:
            record.latency_ms = _ms(start)
            record.outcome = _ERROR
            record.error_class = exc.error_class
            record.status_code = exc.status or 0
            self._telemetry.emit(event)
            await context.abort(upstream_status(exc), str(exc))
        except asyncio.CancelledError:
            record.latency_ms = _ms(start)
            record.outcome = _ERROR
            record.error_class = "cancelled"
            self._telemetry.emit(event)
            raise
        latency = _ms(start)
        record.latency_ms = latency
        record.outcome = _OK
        record.status_code = result.status
        self._telemetry.emit(event)
        return sidecar_pb2.CallToolResponse(
            result_json=result.result_json,
            status_code=result.status,
            version_id=version.version_id,
            latency_ms=latency,
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
            await context.abort(exc.code, exc.message)
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
    await context.abort(exc.code, exc.message)
    raise AssertionError("unreachable")  # context.abort raises
