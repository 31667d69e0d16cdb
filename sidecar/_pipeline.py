"""The call pipeline: every agent call, whatever transport brought it.

    session -> input guards -> quotas -> execution (breakers, retries, fallback)
            -> output guards -> price -> record (one event + one span) -> response

The gRPC servicer (`sidecar._grpc`) and any other transport map their messages to these
calls and a `CallError` back to their own status. A `CallError` carries a gRPC status code,
the canonical code set (HTTP maps onto it as grpc-gateway does), and a message naming what
was wrong; `UpstreamError` maps to a code as

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
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import NoReturn

import grpc

from outrider import FLAG_OFF, SESSION_DRAINED, SESSION_EXPIRED
from outrider.v1 import common_pb2, sidecar_pb2
from sidecar._call_errors import CallError, deadline_of, fail
from sidecar._record import ChatState, Recorder, TraceCarrier, chat_response, elapsed_ms
from sidecar._tool_calls import ToolCall, ToolCalls
from sidecar.flags._effects import SessionFlags
from sidecar.guards import Hit, StreamRedactor
from sidecar.guards._safety import Safety
from sidecar.resilience._executor import ChatFailed, Executor, Served, estimate_tokens, upstream_status
from sidecar.resilience._user_quotas import Refusal, UserQuotas
from sidecar.routing._drain import DrainTracker, drained_status, precondition_status
from sidecar.routing._router import Assignment, Router
from sidecar.routing._session import Session, SessionCodec, SessionExpired, UnknownSession, new_nonce
from sidecar.routing._versions import Version
from sidecar.shadow._runner import ShadowRunner
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.upstream._exceptions import UpstreamError
from sidecar.upstream._provider import ChatResult

_ROLES = frozenset({"user", "assistant", "tool", "system"})
_FEEDBACK_KINDS = frozenset(v for v in sidecar_pb2.FeedbackKind.values() if v != 0)


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A Chat or ChatStream as any transport hands it over."""

    session_token: str
    messages: Sequence[common_pb2.ChatMessage]
    priority: bool = False
    # seconds the caller still waits (its deadline), None when it set none
    time_remaining: float | None = None
    trace: TraceCarrier = None
    request_bytes: int = 0  # the request's size on the wire, for max_request_bytes


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


class CallPipeline:
    """Sessions, chats, tools and feedback of one agent, independent of the transport."""

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
        recorder: Recorder,
        tools: ToolCalls,
        max_request_bytes: int,
        drain: DrainTracker | None = None,
        shadow: ShadowRunner | None = None,
        flags: SessionFlags | None = None,
    ) -> None:
        self.agent = agent
        self._flags = flags
        self._versions = versions
        self._router = router
        self._codec = codec
        self._executor = executor
        self._user_quotas = user_quotas
        self._safety = safety
        self._metrics = metrics
        self._recorder = recorder
        self._tools = tools
        self._max_bytes = max_request_bytes
        self._drain = drain
        self._shadow = shadow

    # sessions and versions

    def open_session(
        self, agent: str, user_id: str, tenant_id: str, shadow_of: str = ""
    ) -> sidecar_pb2.OpenSessionResponse:
        if agent and agent != self.agent:
            fail(
                grpc.StatusCode.NOT_FOUND,
                f"agent: unknown agent {agent!r}; this sidecar serves {self.agent!r}",
            )
        nonce = new_nonce()
        if shadow_of:
            assignment = self._shadow_assignment(shadow_of)
        else:
            assignment = self._router.assign(nonce, user_id, tenant_id)
        token, session = self._codec.issue(
            nonce=nonce,
            version_id=assignment.version_id,
            role=assignment.role,
            rollout_id=assignment.rollout_id,
            user_id=user_id,
            tenant_id=tenant_id,
            cohort=assignment.cohort,
        )
        return sidecar_pb2.OpenSessionResponse(
            session_id=token,
            version_id=session.version_id,
            role=session.role,  # type: ignore[arg-type]
            expires_at_unix_nano=int(session.expires_at * 1e9),
            rollout_id=session.rollout_id,
        )

    def open_pinned(self, version_id: str, role: int, rollout_id: str) -> tuple[str, Session]:
        """A session pinned to `version_id` for the sidecar's own calls (blue-green smoke tests:
        sidecar._smoke); no user, no tenant, and the rollout id it is given."""
        return self._codec.issue(
            nonce=new_nonce(),
            version_id=version_id,
            role=role,
            rollout_id=rollout_id,
            user_id="",
            tenant_id="",
        )

    def _shadow_assignment(self, shadow_of: str) -> Assignment:
        """A whole-trajectory shadow session: the candidate of the rollout in its shadow phase."""
        try:
            self._codec.decode(shadow_of)
        except (UnknownSession, SessionExpired) as exc:
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT, f"shadow_of: not a live session: {exc}"
            ) from None
        target = self._router.shadow_target()
        if target is None:
            fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shadow_of: no rollout of {self.agent!r} is in its shadow phase with versions "
                "this sidecar has",
            )
        return Assignment(target.candidate_version_id, common_pb2.ROLE_SHADOW, target.rollout_id)

    def resolve(self, token: str, *, allow_expired: bool = False) -> tuple[Session, Version]:
        """The session a token carries and the version it is pinned to."""
        if not token:
            fail(grpc.StatusCode.INVALID_ARGUMENT, "session_id: must not be empty")
        try:
            session = self._codec.decode(token, allow_expired=allow_expired)
        except UnknownSession:
            raise CallError(grpc.StatusCode.NOT_FOUND, "session_id: unknown session") from None
        except SessionExpired as exc:
            self._metrics.sessions_refused.labels(SESSION_EXPIRED).inc()
            message = f"session_id: {exc}"
            raise CallError(
                grpc.StatusCode.FAILED_PRECONDITION, message, precondition_status(SESSION_EXPIRED, message)
            ) from None
        # Feedback (allow_expired) is late evidence about the version: drained sessions still send it
        if not allow_expired and self._drain is not None and (retired := self._drain.check(session)):
            self._metrics.sessions_refused.labels(SESSION_DRAINED).inc()
            status = drained_status(retired)
            raise CallError(status.code, status.details, status)
        version = self._versions.get(session.version_id)
        if version is None:
            fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session_id: pinned version {session.version_id} is not served by this sidecar; "
                "open a new session",
            )
        if self._flags is not None:  # the session's flags: its tools, guards, prompt, parameters
            version = self._flags.version_for(session, version)
        return session, version

    def get_version(self, session_token: str, version_id: str) -> sidecar_pb2.VersionInfo:
        if session_token:
            return self.resolve(session_token)[1].info
        if not version_id:
            fail(grpc.StatusCode.INVALID_ARGUMENT, "session_id or version_id: set one")
        found = self._versions.get(version_id)
        if found is None:
            fail(grpc.StatusCode.NOT_FOUND, f"version_id: unknown version {version_id!r}")
        return found.info

    # chat

    def _check_chat(self, call: ChatCall) -> None:
        if not call.messages:
            fail(grpc.StatusCode.INVALID_ARGUMENT, "messages: must not be empty")
        for index, message in enumerate(call.messages):
            if message.role not in _ROLES:
                fail(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"messages[{index}].role: must be one of user, assistant, tool, system; "
                    f"got {message.role!r}",
                )
        size = call.request_bytes or sum(m.ByteSize() for m in call.messages)
        if size > self._max_bytes:
            fail(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"messages: request of {size} bytes exceeds max_request_bytes ({self._max_bytes})",
            )

    def _refuse(self, session: Session, version: Version, state: ChatState, error_class: str) -> None:
        state.error_class = error_class
        self._recorder.chat(session, version, state)

    def _admit(
        self, call: ChatCall, operation: str
    ) -> tuple[Session, Version, float, ChatState, Sequence[common_pb2.ChatMessage]]:
        """Validate, scan input, check the user/tenant quotas: everything before the executor."""
        session, version = self.resolve(call.session_token)
        self._check_chat(call)
        deadline = deadline_of(call.time_remaining, version)
        state = ChatState(operation, priority=call.priority)
        self._recorder.start_chat_span(call.trace, session, version, state)
        messages, state.guard_hits, blocked = self._safety.scan_input(
            version.guards, session, call.messages, operation
        )
        if state.span is not None:
            state.span.set_input_messages(messages)
        if blocked is not None:
            self._refuse(session, version, state, "guard_blocked_input")
            fail(blocked.code, blocked.message)
        if session.role == common_pb2.ROLE_SHADOW:  # not the user's call: not the user's quota
            return session, version, deadline, state, messages
        ticket = self._user_quotas.admit(session, estimate_tokens(version, messages))
        if isinstance(ticket, Refusal):
            self._metrics.quota_refused.labels(ticket.message.split(" ", 1)[0]).inc()
            self._refuse(session, version, state, "quota")
            raise CallError(ticket.code, ticket.message, ticket.status())
        state.user_ticket = ticket
        return session, version, deadline, state, messages

    def _release(self, state: ChatState, used: float = 0.0) -> None:
        if state.user_ticket is not None:
            self._user_quotas.reconcile(state.user_ticket, used)
            state.user_ticket = None

    def _failed(self, session: Session, version: Version, state: ChatState, exc: ChatFailed) -> NoReturn:
        self._release(state)
        state.error_class, state.attempts = exc.error_class, exc.attempts
        self._recorder.chat(session, version, state)
        if exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            refusal = Refusal(exc.code, exc.message, exc.retry_after_s)
            raise CallError(exc.code, exc.message, refusal.status())
        fail(exc.code, exc.message)

    def _cancelled(self, session: Session, version: Version, state: ChatState) -> None:
        self._release(state)
        self._recorder.chat(session, version, state)

    def _price(self, session: Session, version: Version, state: ChatState) -> None:
        """Settle quotas with the actual usage and price the call."""
        result, served = state.result, state.served
        assert result is not None and served is not None
        self._release(state, result.input_tokens + result.output_tokens)
        target = served.tier.target
        if target is not None:
            model = target.model
            state.cost_usd = version.prices.cost(
                model,
                result.input_tokens,
                result.output_tokens,
                min(result.cached_input_tokens, result.input_tokens),
            )
            state.session_cost_usd = self._safety.add_cost(session, model, state.cost_usd)
        else:
            state.session_cost_usd = self._safety.costs.total(session.nonce)

    async def chat(self, call: ChatCall) -> sidecar_pb2.ChatResponse:
        session, version, deadline, state, messages = self._admit(call, "chat")
        shadow = session.role == common_pb2.ROLE_SHADOW
        try:
            state.served = await self._executor.chat(
                version, messages, deadline, call.priority and not shadow, state.span, shadow=shadow
            )
        except ChatFailed as exc:
            self._failed(session, version, state, exc)
        except asyncio.CancelledError:
            self._cancelled(session, version, state)
            raise
        self._executor.settle(state.served)
        result = state.result = state.served.result
        self._price(session, version, state)
        if version.guards.rules_for("output") and result.content:
            outcome = version.guards.scan_output(result.content)
            state.guard_hits += self._safety.report(session, outcome.hits, "output", "chat")
            if outcome.blocked:
                self._refuse(session, version, state, "guard_blocked_output")
                category = next(h.category for h in outcome.hits if h.action.value == "block")
                fail(grpc.StatusCode.PERMISSION_DENIED, f"reply blocked by guardrail {category}")
            result.content = outcome.text
        self._recorder.chat(session, version, state)
        if self._shadow is not None:
            self._shadow.after_chat(session, version, messages, state)
        return chat_response(session, version, state)

    async def chat_stream(self, call: ChatCall) -> AsyncGenerator[sidecar_pb2.ChatChunk, None]:
        """Deltas as they come (output guards holding back what might still match), then the
        tool calls, then the final response."""
        session, version, deadline, state, messages = self._admit(call, "chat_stream")
        try:
            shadow = session.role == common_pb2.ROLE_SHADOW
            served, stream, first = await self._executor.chat_stream(
                version, messages, deadline, call.priority and not shadow, state.span, shadow=shadow
            )
        except ChatFailed as exc:
            self._failed(session, version, state, exc)
        except asyncio.CancelledError:
            self._cancelled(session, version, state)
            raise
        state.served = served
        async with aclosing(self._relay_stream(session, version, state, served, stream, first)) as chunks:
            async for chunk in chunks:
                yield chunk
        assert state.result is not None
        self._executor.stream_done(version, served, None)
        served.result = state.result
        self._price(session, version, state)
        if not state.ttft_ms:
            state.ttft_ms = elapsed_ms(state.start)
        self._recorder.chat(session, version, state)
        if self._shadow is not None:
            self._shadow.after_chat(session, version, messages, state)
        response = chat_response(session, version, state)
        if state.result.tool_calls:
            yield sidecar_pb2.ChatChunk(tool_calls=response.message.tool_calls)
        yield sidecar_pb2.ChatChunk(final=response)

    async def _relay_stream(
        self,
        session: Session,
        version: Version,
        state: ChatState,
        served: Served,
        stream: AsyncGenerator[str | ChatResult, None] | None,
        first: str | ChatResult,
    ) -> AsyncGenerator[sidecar_pb2.ChatChunk, None]:
        redactor = StreamRedactor(version.guards) if version.guards.rules_for("output") else None
        settled = False
        try:
            async for item in _chain(first, stream):
                if isinstance(item, ChatResult):
                    state.result = item
                    continue
                text = item
                if redactor is not None:
                    out = redactor.feed(item)
                    state.guard_hits += self._safety.report(session, out.hits, "output", "chat_stream")
                    text = out.text_to_emit
                    if out.blocked:
                        if text:
                            yield sidecar_pb2.ChatChunk(content_delta=text)
                        raise _GuardBlocked(out.hits)  # noqa: TRY301
                if text:
                    if not state.ttft_ms:
                        state.ttft_ms = elapsed_ms(state.start)
                    yield sidecar_pb2.ChatChunk(content_delta=text)
            if stream is None:  # a static tier: its one item was the whole answer
                state.result = served.result
            if redactor is not None:
                out = redactor.finish()
                state.guard_hits += self._safety.report(session, out.hits, "output", "chat_stream")
                if out.text_to_emit:
                    yield sidecar_pb2.ChatChunk(content_delta=out.text_to_emit)
                if out.blocked:
                    raise _GuardBlocked(out.hits)  # noqa: TRY301
                if state.result is not None and redactor.hits:
                    # the final message carries the same redactions the deltas had
                    state.result.content = version.guards.scan_output(state.result.content).text
        except UpstreamError as exc:
            self._executor.stream_done(version, served, exc)
            settled = True
            self._stream_failed(session, version, state, exc.error_class)
            fail(upstream_status(exc), f"stream from {served.tier.name} failed after the first delta: {exc}")
        except _GuardBlocked as blocked:
            self._executor.stream_done(version, served, None)
            settled = True
            self._stream_failed(session, version, state, "guard_blocked_output")
            fail(grpc.StatusCode.PERMISSION_DENIED, f"reply blocked by guardrail {blocked.category}")
        finally:
            if stream is not None:
                await stream.aclose()
            if not settled and state.result is None:  # cancelled by the agent
                self._executor.stream_cancelled(version, served)
                self._stream_failed(session, version, state, "")

    def _stream_failed(self, session: Session, version: Version, state: ChatState, error_class: str) -> None:
        self._release(state)
        state.result = None
        state.error_class = error_class
        self._recorder.chat(session, version, state)

    # tools and feedback

    async def call_tool(self, call: ToolCall) -> sidecar_pb2.CallToolResponse:
        session, version = self.resolve(call.session_token)
        if self._flags is not None and call.tool_name not in version.tools:
            flag = self._flags.off_tool_flag(session, call.tool_name)
            if flag is not None and call.tool_name in self._versions[session.version_id].tools:
                message = f"tool_name: {call.tool_name!r} is off for this session: feature flag {flag!r}"
                raise CallError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    message,
                    precondition_status(FLAG_OFF, message, {"flag": flag, "tool": call.tool_name}),
                )
        return await self._tools.call(session, version, call)

    def feedback(self, session_token: str, kind: int, score: float) -> None:
        # feedback often arrives after the conversation: an expired (but genuine) session counts
        session, _ = self.resolve(session_token, allow_expired=True)
        if kind not in _FEEDBACK_KINDS:
            fail(grpc.StatusCode.INVALID_ARGUMENT, f"kind: unknown feedback kind {kind}")
        if kind == sidecar_pb2.FEEDBACK_KIND_SCORE and not 0.0 <= score <= 1.0:
            fail(grpc.StatusCode.INVALID_ARGUMENT, f"score: must be in [0, 1], got {score}")
        event = self._recorder.event(session)
        event.feedback.kind = kind
        event.feedback.score = score
        self._recorder.emit(event)
