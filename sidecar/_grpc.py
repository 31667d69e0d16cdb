"""The agent-facing gRPC service (`outrider.v1.Sidecar`) on grpc.aio: a thin mapping of its
messages onto the call pipeline (`sidecar._pipeline`), and of a `CallError` onto the status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, NoReturn

import grpc

from outrider.v1 import sidecar_pb2, sidecar_pb2_grpc
from sidecar._call_errors import CallError
from sidecar._pipeline import CallPipeline, ChatCall
from sidecar._tool_calls import ToolCall

Context = grpc.aio.ServicerContext[Any, Any]


async def _abort(context: Context, exc: CallError) -> NoReturn:
    if exc.status is not None:
        await context.abort_with_status(exc.status)  # type: ignore[attr-defined]
    await context.abort(exc.code, exc.message)
    raise AssertionError("unreachable")  # context.abort raises


def _chat_call(request: sidecar_pb2.ChatRequest, context: Context) -> ChatCall:
    return ChatCall(
        session_token=request.session_id,
        messages=request.messages,
        priority=request.priority,
        time_remaining=context.time_remaining(),
        trace=context.invocation_metadata(),
        request_bytes=request.ByteSize(),
    )


class SidecarService(sidecar_pb2_grpc.SidecarServicer):
    def __init__(self, pipeline: CallPipeline) -> None:
        self._pipeline = pipeline

    async def OpenSession(
        self, request: sidecar_pb2.OpenSessionRequest, context: Context
    ) -> sidecar_pb2.OpenSessionResponse:
        try:
            return self._pipeline.open_session(
                request.agent, request.user_id, request.tenant_id, request.shadow_of
            )
        except CallError as exc:
            await _abort(context, exc)

    async def Chat(self, request: sidecar_pb2.ChatRequest, context: Context) -> sidecar_pb2.ChatResponse:
        try:
            return await self._pipeline.chat(_chat_call(request, context))
        except CallError as exc:
            await _abort(context, exc)

    async def ChatStream(
        self, request: sidecar_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[sidecar_pb2.ChatChunk]:
        try:
            # aclosing: a stream the client stops reading ends (and is recorded) now, not at GC
            async with aclosing(self._pipeline.chat_stream(_chat_call(request, context))) as chunks:
                async for chunk in chunks:
                    yield chunk
        except CallError as exc:
            await _abort(context, exc)

    async def CallTool(
        self, request: sidecar_pb2.CallToolRequest, context: Context
    ) -> sidecar_pb2.CallToolResponse:
        call = ToolCall(
            session_token=request.session_id,
            tool_name=request.tool_name,
            arguments_json=request.arguments_json,
            time_remaining=context.time_remaining(),
            trace=context.invocation_metadata(),
        )
        try:
            return await self._pipeline.call_tool(call)
        except CallError as exc:
            await _abort(context, exc)

    async def Feedback(
        self, request: sidecar_pb2.FeedbackRequest, context: Context
    ) -> sidecar_pb2.FeedbackResponse:
        try:
            self._pipeline.feedback(request.session_id, request.kind, request.score)
        except CallError as exc:
            await _abort(context, exc)
        return sidecar_pb2.FeedbackResponse()

    async def GetVersion(
        self, request: sidecar_pb2.GetVersionRequest, context: Context
    ) -> sidecar_pb2.VersionInfo:
        try:
            return self._pipeline.get_version(request.session_id, request.version_id)
        except CallError as exc:
            await _abort(context, exc)
