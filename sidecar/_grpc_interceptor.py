"""The gRPC server's one interceptor: every RPC is counted in
`outrider_sidecar_requests_total{method,code}`, and a request that does not decode (random bytes,
nesting deeper than protobuf allows) is answered `INVALID_ARGUMENT` with the parser's reason
instead of grpc's `UNKNOWN`.

A decode failure cannot abort from the deserializer (grpc calls it before there is a context),
so the wrapped deserializer returns an `_Undecodable` marker and the wrapped behavior aborts.
Only unary requests need it: every `outrider.v1.Sidecar` method is one; streaming-request
handlers (reflection) are counted but decoded as grpc does.

`method` is the full method without the leading slash (`outrider.v1.Sidecar/Chat`), or
`unknown` for a method the server does not have, so a client cannot grow the label set.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.telemetry._series import SeriesCache

if TYPE_CHECKING:  # generic only in grpc-stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    _Base: TypeAlias = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Base = grpc.aio.ServerInterceptor
UNKNOWN_METHOD = "unknown"
_MAX_REASON_CHARS = 200


class _Undecodable:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            return _Undecodable(str(exc)[:_MAX_REASON_CHARS] or type(exc).__name__)

    return decode


def _code(context: Any, exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return grpc.StatusCode.UNKNOWN.name if exc is not None else grpc.StatusCode.OK.name


class RequestInterceptor(_Base):
    def __init__(self, metrics: SidecarMetrics) -> None:
        self._metrics = metrics
        # grpc asks for a method's handler on every call: wrap each servicer handler once
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}  # method -> (given, wrapped)
        self._series = SeriesCache()

    def _count(self, method: str, context: Any, exc: BaseException | None) -> None:
        self._series(self._metrics.requests, method, _code(context, exc)).inc()

    async def _reject(self, method: str, request: Any, context: Any) -> None:
        if isinstance(request, _Undecodable):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request: cannot decode the {method.rpartition('/')[2]} request: {request.reason}",
            )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler | None = await continuation(handler_call_details)
        if handler is None:
            # grpc answers UNIMPLEMENTED itself; count it under one label
            self._metrics.requests.labels(UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED.name).inc()
            return handler  # type: ignore[return-value]  # grpc answers UNIMPLEMENTED
        method = handler_call_details.method.lstrip("/")
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        if handler.unary_unary is not None:
            return self._unary_unary(method, handler)
        if handler.unary_stream is not None:
            return self._unary_stream(method, handler)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._counted(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._counted_stream(method, handler.stream_stream),  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary_unary(self, method: str, handler: Handler) -> Handler:
        behavior: Callable[..., Any] = handler.unary_unary  # type: ignore[assignment]
        assert inspect.iscoroutinefunction(behavior), f"{method}: a grpc.aio servicer is async"

        async def guarded(request: Any, context: Any) -> Any:
            await self._reject(method, request, context)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            self._counted(method, guarded),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _unary_stream(self, method: str, handler: Handler) -> Handler:
        behavior: Callable[..., Any] = handler.unary_stream  # type: ignore[assignment]
        if inspect.isasyncgenfunction(behavior):

            async def guarded_gen(request: Any, context: Any) -> AsyncIterator[Any]:
                await self._reject(method, request, context)
                async with aclosing(behavior(request, context)) as items:
                    async for item in items:
                        yield item

            wrapped: Callable[..., Any] = self._counted_stream(method, guarded_gen)
        else:  # a coroutine that writes with context.write (grpc.health Watch)

            async def guarded(request: Any, context: Any) -> Any:
                await self._reject(method, request, context)
                return await behavior(request, context)

            wrapped = self._counted(method, guarded)
        return grpc.unary_stream_rpc_method_handler(
            wrapped,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _counted(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def counted(request: Any, context: Any) -> Any:
            try:
                result = await behavior(request, context)
            except BaseException as exc:
                self._count(method, context, exc)
                raise
            self._count(method, context, None)
            return result

        return counted

    def _counted_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def counted(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                # aclosing: a stream the client stops reading closes the servicer's generator now
                async with aclosing(behavior(request, context)) as items:
                    async for item in items:
                        yield item
            except BaseException as exc:
                gone = isinstance(exc, GeneratorExit)  # the client went away mid-stream
                self._count(method, context, asyncio.CancelledError() if gone else exc)
                raise
            self._count(method, context, None)

        return counted
