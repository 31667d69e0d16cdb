"""The asyncio client, the same API as `outrider_client.Client` with awaitables:

    async with AsyncClient("127.0.0.1:50051") as client:
        async with await client.session(user_id="u1") as s:
            reply = await s.chat("Where is my order?")
            async for chunk in s.stream("And when does it arrive?"):
                print(chunk.content_delta, end="")

Same deadline, retry-after and drained-reopen behaviour as the blocking client (`_sync`).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from grpc import aio

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


class AsyncClient:
    """A grpc.aio connection to one sidecar; `await close()` it, or use `async with`."""

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
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # the retry-after wait
        self._channel = (
            aio.secure_channel(target, credentials) if credentials else aio.insecure_channel(target)
        )
        self._stub = sidecar_pb2_grpc.SidecarStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def session(
        self, *, user_id: str = "", tenant_id: str = "", agent: str | None = None, shadow_of: str = ""
    ) -> AsyncSession:
        """Open a session (OpenSession): pinned to the version the rollout gives this user."""
        request = sidecar_pb2.OpenSessionRequest(
            agent=self.agent if agent is None else agent,
            user_id=user_id,
            tenant_id=tenant_id,
            shadow_of=shadow_of,
        )
        session = AsyncSession(self, request)
        await session._open()
        return session

    async def get_version(self, version_id: str, *, timeout: float | None = None) -> sidecar_pb2.VersionInfo:
        request = sidecar_pb2.GetVersionRequest(version_id=version_id)
        return await self._unary("GetVersion", self._stub.GetVersion, request, timeout)

    async def _unary(
        self, method: str, rpc: aio.UnaryUnaryMultiCallable[Any, _Resp], request: Any, timeout: float | None
    ) -> _Resp:
        deadline = Deadline(self.timeout if timeout is None else timeout)
        waits = 0
        while True:
            try:
                return await rpc(request, timeout=deadline.remaining(), metadata=self.call_metadata())
            except grpc.RpcError as exc:
                error = from_rpc_error(method, exc)
            wait = deadline.quota_wait(error, waits, self.max_quota_waits)
            if wait is None:
                raise error
            waits += 1
            await self._sleep(wait)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata + trace_metadata()


class AsyncSession:
    """One conversation on the sidecar, pinned to a version; reopens itself after a drain.
    Made by `await AsyncClient.session(...)`."""

    def __init__(self, client: AsyncClient, request: sidecar_pb2.OpenSessionRequest) -> None:
        self._client = client
        self._request = request
        self.reopened = 0
        self._ended = False
        self._closed = False
        self.info = sidecar_pb2.OpenSessionResponse()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
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

    async def _open(self) -> None:
        self.info = await self._client._unary(
            "OpenSession", self._client._stub.OpenSession, self._request, None
        )
        self._ended = False

    async def _turn_start(self) -> None:
        if self._closed:
            raise OutriderError(f"session {self.id} is closed: open a new one with client.session()")
        if self._ended:
            await self._reopen()

    async def _reopen(self) -> None:
        await self._open()
        self.reopened += 1

    async def _call(
        self, method: str, rpc: aio.UnaryUnaryMultiCallable[Any, _Resp], request: Any, timeout: float | None
    ) -> _Resp:
        try:
            return await self._client._unary(method, rpc, request, timeout)
        except SessionEndedError:
            self._ended = True
            raise

    async def chat(
        self,
        messages: MessageLike | Sequence[MessageLike],
        *,
        timeout: float | None = None,
        priority: bool = False,
    ) -> sidecar_pb2.ChatResponse:
        """One model call (Chat) with the conversation so far."""
        return await self._chat(to_messages(messages), timeout, priority, reopen=True)

    async def _chat(
        self, messages: list[common_pb2.ChatMessage], timeout: float | None, priority: bool, *, reopen: bool
    ) -> sidecar_pb2.ChatResponse:
        await self._turn_start()
        try:
            return await self._call(
                "Chat", self._client._stub.Chat, self._request_of(messages, priority), timeout
            )
        except SessionEndedError:
            if not reopen:
                raise
        await self._reopen()
        return await self._call(
            "Chat", self._client._stub.Chat, self._request_of(messages, priority), timeout
        )

    def _request_of(self, messages: list[common_pb2.ChatMessage], priority: bool) -> sidecar_pb2.ChatRequest:
        return sidecar_pb2.ChatRequest(session_id=self.id, messages=messages, priority=priority)

    async def stream(
        self,
        messages: MessageLike | Sequence[MessageLike],
        *,
        timeout: float | None = None,
        priority: bool = False,
    ) -> AsyncIterator[sidecar_pb2.ChatChunk]:
        """The answer as it is generated (ChatStream): deltas, then a chunk with `final`."""
        request_messages = to_messages(messages)
        await self._turn_start()
        deadline = Deadline(self._client.timeout if timeout is None else timeout)
        waits = reopens = 0
        while True:
            call = self._client._stub.ChatStream(
                self._request_of(request_messages, priority),
                timeout=deadline.remaining(),
                metadata=self._client.call_metadata(),
            )
            started = False
            try:
                async for chunk in call:
                    started = True
                    yield chunk
                return
            except grpc.RpcError as exc:
                error = from_rpc_error("ChatStream", exc)
            finally:
                call.cancel()  # a no-op once finished; ends the RPC when the caller stops early
            if started:
                raise error
            if isinstance(error, SessionEndedError) and reopens == 0:
                reopens += 1
                await self._reopen()
                continue
            if isinstance(error, SessionEndedError):
                self._ended = True
            wait = deadline.quota_wait(error, waits, self._client.max_quota_waits)
            if wait is None:
                raise error
            waits += 1
            await self._client._sleep(wait)

    async def call_tool(
        self,
        name: str,
        args: Mapping[str, Any] | str | None = None,
        *,
        call_id: str = "",
        timeout: float | None = None,
    ) -> ToolResult:
        """Run one of the version's tools through the sidecar (CallTool)."""
        request = tool_request(self.id, name, args, call_id)
        return ToolResult.of(
            name, await self._call("CallTool", self._client._stub.CallTool, request, timeout)
        )

    async def run_tools(
        self,
        messages: MessageLike | Sequence[MessageLike],
        *,
        tools: Mapping[str, LocalTool] | None = None,
        max_rounds: int = DEFAULT_TOOL_ROUNDS,
        timeout: float | None = None,
    ) -> ToolLoopResult:
        """The tool-calling loop (see `Session.run_tools`); a local tool may be async."""
        conversation = to_messages(messages)
        loop = ToolLoopResult(sidecar_pb2.ChatResponse(), conversation)
        local = dict(tools or {})
        while loop.rounds < max_rounds:
            loop.rounds += 1
            response = await self._chat(conversation, timeout, False, reopen=loop.rounds == 1)
            loop.response = response
            conversation.append(assistant_message(response))
            if not response.message.tool_calls:
                return loop
            for call in response.message.tool_calls:
                result = await self._run_tool(call, local, timeout)
                loop.tool_results.append(result)
                conversation.append(tool_message(call, result))
        raise ToolLoopError(f"tool loop: no final answer after {max_rounds} rounds (max_rounds)")

    async def _run_tool(
        self, call: common_pb2.ToolCall, local: Mapping[str, LocalTool], timeout: float | None
    ) -> ToolResult:
        if call.name in local:
            value = local[call.name](parse_arguments(call))
            if inspect.isawaitable(value):
                value = await value
            return local_result(call, value)
        try:
            return await self.call_tool(
                call.name, call.arguments_json or "{}", call_id=call.id, timeout=timeout
            )
        except (InvalidArgumentError, ToolRejectedError) as exc:
            return rejected_result(call, exc)

    async def feedback(
        self, kind: str | int, score: float | None = None, *, timeout: float | None = None
    ) -> None:
        """Report an outcome (Feedback); see `Session.feedback`."""
        request = feedback_request(self.id, kind, score)
        await self._call("Feedback", self._client._stub.Feedback, request, timeout)

    async def version(self, *, timeout: float | None = None) -> sidecar_pb2.VersionInfo:
        """The pinned version (GetVersion)."""
        request = sidecar_pb2.GetVersionRequest(session_id=self.id)
        return await self._call("GetVersion", self._client._stub.GetVersion, request, timeout)
