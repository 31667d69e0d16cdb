"""The blocking client: `Client` owns a channel, `Session` one conversation pinned to a version.

    with Client("127.0.0.1:50051") as client:
        with client.session(user_id="u1", tenant_id="acme") as s:
            print(s.chat("Where is my order?").message.content)

Every call has one deadline (`timeout`, else the client's): RESOURCE_EXHAUSTED is retried after
the sidecar's retry-after while the retry can still finish before it; a drained or expired
session is reopened (same agent, user and tenant) at the next turn, i.e. the next chat/stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from outrider_client._common import (
    DEFAULT_QUOTA_WAITS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_TOOL_ROUNDS,
    Deadline,
    LocalTool,
    MessageLike,
    ToolLoopResult,
    ToolResult,
    assistant_message,
    feedback_request,
    local_result,
    parse_arguments,
    rejected_result,
    to_messages,
    tool_message,
    tool_request,
)
from outrider_client._errors import (
    InvalidArgumentError,
    OutriderError,
    SessionEndedError,
    ToolLoopError,
    ToolRejectedError,
    from_rpc_error,
)
from outrider_client._trace import trace_metadata

_Resp = TypeVar("_Resp")


class Client:
    """A connection to one sidecar (`target`: "host:port"); close it, or use it as a context."""

    def __init__(
        self,
        target: str,
        *,
        agent: str = "",
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_quota_waits: int = DEFAULT_QUOTA_WAITS,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.agent = agent
        self.timeout = timeout
        self.max_quota_waits = max_quota_waits
        self._metadata = tuple(metadata)
        self._sleep: Callable[[float], None] = time.sleep  # the retry-after wait (tests move a clock)
        self._channel = (
            grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        )
        self._stub = sidecar_pb2_grpc.SidecarStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def session(
        self, *, user_id: str = "", tenant_id: str = "", agent: str | None = None, shadow_of: str = ""
    ) -> Session:
        """Open a session (OpenSession): pinned to the version the rollout gives this user."""
        request = sidecar_pb2.OpenSessionRequest(
            agent=self.agent if agent is None else agent,
            user_id=user_id,
            tenant_id=tenant_id,
            shadow_of=shadow_of,
        )
        return Session(self, request)

    def get_version(self, version_id: str, *, timeout: float | None = None) -> sidecar_pb2.VersionInfo:
        request = sidecar_pb2.GetVersionRequest(version_id=version_id)
        return self._unary("GetVersion", self._stub.GetVersion, request, timeout)

    # the one place a unary call is made: deadline, metadata, quota waits, error mapping
    def _unary(
        self, method: str, rpc: grpc.UnaryUnaryMultiCallable[Any, _Resp], request: Any, timeout: float | None
    ) -> _Resp:
        deadline = Deadline(self.timeout if timeout is None else timeout)
        waits = 0
        while True:
            try:
                return rpc(request, timeout=deadline.remaining(), metadata=self.call_metadata())
            except grpc.RpcError as exc:
                error = from_rpc_error(method, exc)
            wait = deadline.quota_wait(error, waits, self.max_quota_waits)
            if wait is None:
                raise error
            waits += 1
            self._sleep(wait)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata + trace_metadata()


class Session:
    """One conversation on the sidecar, pinned to a version; reopens itself after a drain."""

    def __init__(self, client: Client, request: sidecar_pb2.OpenSessionRequest) -> None:
        self._client = client
        self._request = request
        self.reopened = 0  # how many times a drained/expired session was replaced
        self._ended = False  # the sidecar said drained/expired: the next turn reopens first
        self._closed = False
        self.info = self._open()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to send (the sidecar's sessions expire on their own); later turns fail."""
        self._closed = True

    @property
    def id(self) -> str:
        return self.info.session_id

    @property
    def version_id(self) -> str:
        return self.info.version_id

    @property
    def role(self) -> common_pb2.Role.ValueType:
        return self.info.role

    def _open(self) -> sidecar_pb2.OpenSessionResponse:
        info = self._client._unary("OpenSession", self._client._stub.OpenSession, self._request, None)
        self._ended = False
        return info

    def _turn_start(self) -> None:
        if self._closed:
            raise OutriderError(f"session {self.id} is closed: open a new one with client.session()")
        if self._ended:
            self._reopen()

    def _reopen(self) -> None:
        self.info = self._open()
        self.reopened += 1

    def _call(
        self, method: str, rpc: grpc.UnaryUnaryMultiCallable[Any, _Resp], request: Any, timeout: float | None
    ) -> _Resp:
        try:
            return self._client._unary(method, rpc, request, timeout)
        except SessionEndedError:
            self._ended = True
            raise

    def chat(
        self,
        messages: MessageLike | Sequence[MessageLike],
        *,
        timeout: float | None = None,
        priority: bool = False,
    ) -> sidecar_pb2.ChatResponse:
        """One model call (Chat) with the conversation so far; the version adds its model,
        system prompt, parameters and tools."""
        return self._chat(to_messages(messages), timeout, priority, reopen=True)

    def _chat(
        self, messages: list[common_pb2.ChatMessage], timeout: float | None, priority: bool, *, reopen: bool
    ) -> sidecar_pb2.ChatResponse:
        self._turn_start()
        try:
            return self._call(
                "Chat", self._client._stub.Chat, self._chat_request(messages, priority), timeout
            )
        except SessionEndedError:
            if not reopen:
                raise
        self._reopen()  # a turn boundary: the new session gets whatever the rollout gives now
        return self._call("Chat", self._client._stub.Chat, self._chat_request(messages, priority), timeout)

    def _chat_request(
        self, messages: list[common_pb2.ChatMessage], priority: bool
    ) -> sidecar_pb2.ChatRequest:
        return sidecar_pb2.ChatRequest(session_id=self.id, messages=messages, priority=priority)

    def stream(
        self,
        messages: MessageLike | Sequence[MessageLike],
        *,
        timeout: float | None = None,
        priority: bool = False,
    ) -> Iterator[sidecar_pb2.ChatChunk]:
        """The answer as it is generated (ChatStream): deltas, then a chunk with `final`. Quota
        waits and the drained reopen happen before the first chunk only."""
        request_messages = to_messages(messages)
        self._turn_start()
        deadline = Deadline(self._client.timeout if timeout is None else timeout)
        waits = reopens = 0
        while True:
            call = self._client._stub.ChatStream(
                self._chat_request(request_messages, priority),
                timeout=deadline.remaining(),
                metadata=self._client.call_metadata(),
            )
            started = False
            try:
                for chunk in call:
                    started = True
                    yield chunk
                return
            except grpc.RpcError as exc:
                error = from_rpc_error("ChatStream", exc)
            finally:
                cancel: Any = call.cancel  # grpc-stubs leave it untyped
                cancel()  # a no-op once finished; ends the RPC when the caller stops early
            if started:
                raise error
            if isinstance(error, SessionEndedError) and reopens == 0:
                reopens += 1
                self._reopen()
                continue
            if isinstance(error, SessionEndedError):
                self._ended = True
            wait = deadline.quota_wait(error, waits, self._client.max_quota_waits)
            if wait is None:
                raise error
            waits += 1
            self._client._sleep(wait)

    def call_tool(
        self,
        name: str,
        args: Mapping[str, Any] | str | None = None,
        *,
        call_id: str = "",
        timeout: float | None = None,
    ) -> ToolResult:
        """Run one of the version's tools through the sidecar (CallTool): its arguments are
        checked against the tool's schema, breakers, flags and shadow interception apply."""
        request = tool_request(self.id, name, args, call_id)
        return ToolResult.of(name, self._call("CallTool", self._client._stub.CallTool, request, timeout))

    def run_tools(
        self,
        messages: MessageLike | Sequence[MessageLike],
        *,
        tools: Mapping[str, LocalTool] | None = None,
        max_rounds: int = DEFAULT_TOOL_ROUNDS,
        timeout: float | None = None,
    ) -> ToolLoopResult:
        """The tool-calling loop: chat; while the model asks for tools, run each (a callable in
        `tools` by name, else CallTool on the sidecar), append the results and chat again; stop
        at a final answer. At most `max_rounds` chats; `timeout` bounds each call."""
        conversation = to_messages(messages)
        loop = ToolLoopResult(sidecar_pb2.ChatResponse(), conversation)
        local = dict(tools or {})
        while loop.rounds < max_rounds:
            loop.rounds += 1
            # only the turn's first chat may reopen: later ones carry tool results of this session
            response = self._chat(conversation, timeout, False, reopen=loop.rounds == 1)
            loop.response = response
            conversation.append(assistant_message(response))
            if not response.message.tool_calls:
                return loop
            for call in response.message.tool_calls:
                result = self._run_tool(call, local, timeout)
                loop.tool_results.append(result)
                conversation.append(tool_message(call, result))
        raise ToolLoopError(f"tool loop: no final answer after {max_rounds} rounds (max_rounds)")

    def _run_tool(
        self, call: common_pb2.ToolCall, local: Mapping[str, LocalTool], timeout: float | None
    ) -> ToolResult:
        if call.name in local:
            return local_result(call, local[call.name](parse_arguments(call)))
        try:
            return self.call_tool(call.name, call.arguments_json or "{}", call_id=call.id, timeout=timeout)
        except (InvalidArgumentError, ToolRejectedError) as exc:
            return rejected_result(call, exc)

    def feedback(self, kind: str | int, score: float | None = None, *, timeout: float | None = None) -> None:
        """Report an outcome (Feedback): "thumbs_up", "thumbs_down", "task_success",
        "task_failure", or "score" with `score` in [0, 1] (or a FeedbackKind value)."""
        request = feedback_request(self.id, kind, score)
        self._call("Feedback", self._client._stub.Feedback, request, timeout)

    def version(self, *, timeout: float | None = None) -> sidecar_pb2.VersionInfo:
        """The pinned version: model, system prompt, tools, flags (GetVersion)."""
        request = sidecar_pb2.GetVersionRequest(session_id=self.id)
        return self._call("GetVersion", self._client._stub.GetVersion, request, timeout)
