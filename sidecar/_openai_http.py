"""The sidecar's OpenAI-compatible endpoint: `POST /v1/chat/completions` and `GET /v1/models`.

An agent built on the openai SDK (or anything speaking chat completions) changes its
`base_url` only. Every call goes through the same `CallPipeline` as gRPC, so guards, quotas,
fallback, telemetry and routing are the same. The agent runs its own tools: the sidecar sees
the model calls only (no write interception, tool breakers or tool flags; CallTool has them).

Sessions: `x-outrider-session` carries an OpenSession token. Without it the sidecar keeps an
implicit session per sticky key, `x-outrider-user` (with `x-outrider-tenant`), else the body's
`user`, else a new session per request; an implicit session that expired or was drained is
reopened transparently. Every response names its session in `x-outrider-session`.

Errors are OpenAI's body with the grpc-gateway status of the pipeline's code (400 naming the
field, 403 guard block, 409 drained explicit session, 429 with retry-after, 503 when every tier
failed), and `x-should-retry: false` on what a retry cannot fix.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
from collections.abc import Mapping
from contextlib import aclosing
from typing import Any

import grpc
from aiohttp import web
from cachetools import LRUCache
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from outrider import SESSION_DRAINED, SESSION_EXPIRED
from outrider.v1 import sidecar_pb2
from sidecar import _openai_wire as wire
from sidecar._call_errors import CallError
from sidecar._pipeline import CallPipeline, ChatCall

log = logging.getLogger(__name__)

SESSION_HEADER = "x-outrider-session"
USER_HEADER = "x-outrider-user"
TENANT_HEADER = "x-outrider-tenant"
PRIORITY_HEADER = "x-outrider-priority"
IMPLICIT_SESSIONS_MAX = 10_000  # sticky keys remembered; the oldest is forgotten (it reopens)
_REOPEN_REASONS = frozenset({SESSION_DRAINED, SESSION_EXPIRED})


class OpenAIHttpError(RuntimeError):
    """The endpoint could not start (the message names the `openai_http` field)."""


def _reason(exc: CallError) -> str:
    """The ErrorInfo reason of a rich status (SESSION_DRAINED...), else ""."""
    status = exc.status
    for key, value in getattr(status, "trailing_metadata", None) or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


def _retry_after_s(exc: CallError) -> float:
    for key, value in getattr(exc.status, "trailing_metadata", None) or ():
        if key == "retry-after-ms":
            return int(value) / 1000.0
    return 1.0


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None, retry_after: float = 0.0
) -> web.Response:
    headers = {"x-should-retry": "true" if status in wire.RETRYABLE_STATUS else "false"}
    if retry_after > 0:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        headers["retry-after-ms"] = str(math.ceil(retry_after * 1000))
    body = wire.error_body(message, wire.error_type(status), param, code)
    return web.json_response(body, status=status, headers=headers)


def call_error_response(exc: CallError, session: str = "") -> web.Response:
    status = wire.http_status(exc.code)
    code = _reason(exc).lower() or exc.code.name.lower()
    retry = _retry_after_s(exc) if exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED else 0.0
    response = error_response(
        status, exc.message, param=wire.param_of(exc.message), code=code, retry_after=retry
    )
    if session:
        response.headers[SESSION_HEADER] = session
    return response


class OpenAIEndpoint:
    """The aiohttp application over one pipeline, and its listener."""

    def __init__(self, pipeline: CallPipeline, config: wire.OpenAIHttpConfig, max_request_bytes: int) -> None:
        self._pipeline = pipeline
        self._config = config
        self._implicit: LRUCache[tuple[str, str], str] = LRUCache(IMPLICIT_SESSIONS_MAX)
        self._api_key = b""
        if config.require_api_key:
            key = os.environ.get(config.api_key_env, "").strip()
            if not key:
                raise OpenAIHttpError(
                    f"openai_http.api_key_env: environment variable {config.api_key_env} is not set or "
                    "empty (require_api_key is on)"
                )
            self._api_key = key.encode()
        # room beyond max_request_bytes for JSON framing, so the pipeline names the size problem
        self.app = web.Application(client_max_size=max_request_bytes * 2 + 64 * 1024)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_get("/v1/models", self._models)
        self._runner: web.AppRunner | None = None
        self.address = ""

    @property
    def base_url(self) -> str:
        return f"http://{self.address}/v1"

    async def start(self) -> None:
        host, _, port = self._config.listen.rpartition(":")
        if not host or not port.isdigit():
            raise OpenAIHttpError(f"openai_http.listen: expected host:port, got {self._config.listen!r}")
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        self._runner = runner
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            raise OpenAIHttpError(f"openai_http.listen: cannot bind {self._config.listen}: {exc}") from None
        bound = runner.addresses[0]
        self.address = f"{host}:{bound[1]}"

    async def stop(self, grace: float) -> None:
        """Stop listening; calls in flight get `grace` seconds to finish."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner._shutdown_timeout = grace  # AppRunner takes it only at construction
            await runner.cleanup()

    # requests

    def _authorized(self, request: web.Request) -> bool:
        if not self._api_key:
            return True  # the Authorization header is ignored unless a key is required
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key)

    def _sticky_key(self, request: web.Request, body_user: str) -> tuple[str, str] | None:
        user = request.headers.get(USER_HEADER, "") or body_user
        if not user:
            return None
        return request.headers.get(TENANT_HEADER, ""), user

    def _open(self, key: tuple[str, str] | None) -> str:
        tenant, user = key if key is not None else ("", "")
        token = self._pipeline.open_session("", user, tenant).session_id
        if key is not None:
            self._implicit[key] = token
        return token

    def _session(self, request: web.Request, body_user: str) -> str:
        """The session token of a request: the header's, else the implicit session of its
        sticky key (reopened when it expired or was drained), else a new one."""
        explicit = request.headers.get(SESSION_HEADER, "")
        if explicit:
            return explicit
        key = self._sticky_key(request, body_user)
        token = self._implicit.get(key) if key is not None else None
        if token is None:
            return self._open(key)
        try:
            self._pipeline.resolve(token)
        except CallError as exc:
            if _reason(exc) not in _REOPEN_REASONS and exc.code is not grpc.StatusCode.NOT_FOUND:
                raise
            log.debug("openai_http: implicit session reopened (%s)", _reason(exc) or exc.code.name)
            return self._open(key)
        return token

    def _check_model(self, model: str, token: str) -> None:
        if not self._config.check_model or not model:
            return
        _, version = self._pipeline.resolve(token)
        if model not in (version.version_id, version.model, version.label):
            raise wire.WireError(
                "model",
                f"{model!r} is not this session's version ({version.version_id}, model {version.model})",
            )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return error_response(401, "Authorization: missing or wrong API key", code="invalid_api_key")
        raw = await request.read()
        token = ""
        try:
            try:
                body = wire.ChatBody(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise wire.WireError("body", "not valid JSON") from None
            token = self._session(request, body.user)
            self._check_model(body.model, token)
            call = ChatCall(
                session_token=token,
                messages=body.messages,
                priority=request.headers.get(PRIORITY_HEADER, "").lower() in ("1", "true"),
                trace=[(k.lower(), v) for k, v in request.headers.items()],
                request_bytes=sum(m.ByteSize() for m in body.messages),
            )
            if body.stream:
                return await self._stream(request, call, body.include_usage)
            response = await self._pipeline.chat(call)
        except wire.WireError as exc:
            return error_response(400, exc.message, param=exc.param, code="invalid_request")
        except CallError as exc:
            return call_error_response(exc, token)
        return web.json_response(
            wire.completion(response, wire.completion_id()), headers=self._headers(token)
        )

    @staticmethod
    def _headers(token: str) -> dict[str, str]:
        return {SESSION_HEADER: token}

    async def _stream(self, request: web.Request, call: ChatCall, include_usage: bool) -> web.StreamResponse:
        """SSE chunks. The first chunk is awaited before the 200 goes out, so a refusal (guard,
        quota, every tier failed) is still a proper error status; later ones are an error event."""
        writer = wire.ChunkWriter(wire.completion_id(), "")
        async with aclosing(self._pipeline.chat_stream(call)) as chunks:
            try:
                first = await anext(chunks)
            except StopAsyncIteration:  # pragma: no cover - the pipeline always ends with a final
                return error_response(500, "the stream ended without a response")
            writer.model = self._pipeline.resolve(call.session_token)[1].model
            response = web.StreamResponse(
                headers={
                    "content-type": "text/event-stream",
                    "cache-control": "no-cache",
                    **self._headers(call.session_token),
                }
            )
            await response.prepare(request)
            await response.write(writer.delta({"role": "assistant", "content": ""}))
            try:
                await self._relay(response, writer, first, chunks, include_usage)
            except CallError as exc:
                status = wire.http_status(exc.code)
                body = wire.error_body(exc.message, wire.error_type(status), None, exc.code.name.lower())
                await response.write(wire.sse(body))
            await response.write(wire.DONE)
            await response.write_eof()
            return response

    @staticmethod
    async def _relay(
        response: web.StreamResponse,
        writer: wire.ChunkWriter,
        first: sidecar_pb2.ChatChunk,
        chunks: Any,
        include_usage: bool,
    ) -> None:
        chunk: sidecar_pb2.ChatChunk | None = first
        while chunk is not None:
            if chunk.content_delta:
                await response.write(writer.delta({"content": chunk.content_delta}))
            elif chunk.tool_calls:
                await response.write(writer.tool_calls(chunk.tool_calls))
            elif chunk.HasField("final"):
                await response.write(writer.final(chunk.final))
                if include_usage:
                    await response.write(writer.usage(chunk.final))
            chunk = await anext(chunks, None)

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return error_response(401, "Authorization: missing or wrong API key", code="invalid_api_key")
        token = ""
        try:
            token = self._session(request, "")
            _, version = self._pipeline.resolve(token)
        except CallError as exc:
            return call_error_response(exc, token)
        model: Mapping[str, Any] = {
            "id": version.version_id,
            "object": "model",
            "created": 0,
            "owned_by": self._pipeline.agent,
            "outrider_label": version.label,
            "outrider_model": version.model,
        }
        return web.json_response({"object": "list", "data": [model]}, headers=self._headers(token))
