"""The simulated provider's OpenAI-compatible serving: ``POST /v1/chat/completions`` (unary
and SSE), ``GET /v1/models[/{model}]`` and ``POST /tools/{name}``, each request drawing its
latency and random errors from its behavior and bent by the next scripted fault, if any.

`SimServing` holds the handlers; `SimProvider` (in `devstack.simprovider`) routes to them and
owns the server's lifecycle and the ``/_sim/...`` control endpoints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ._sim_behavior import ModelBehavior
from ._sim_faults import DEFAULT_BAD_SSE_LINE, Fault
from ._sim_openai import (
    ChatRequest,
    RequestError,
    completion_body,
    injected_error,
    model_object,
    models_list,
    parse_chat_request,
    sse_event,
    stream_chunks,
)
from ._sim_replies import reply_for
from ._sim_state import ReceivedRequest, SimState
from ._sim_tools import run_tool

logger = logging.getLogger("devstack.simprovider")  # the logger it had before moving here

_INVALID = object()  # stands for a body that is not valid JSON
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
PAUSE_POLL_S = 0.02  # how often a scripted pause checks whether the client left or the server stops


def json_error(exc: RequestError) -> web.Response:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return web.json_response(exc.body(), status=exc.status, headers=headers)


def _fault_error(fault: Fault, what: str) -> web.Response:
    """A scripted error status: an OpenAI-style body, retry headers only as scripted."""
    assert fault.status is not None  # Fault checks it for kind "status"
    exc = injected_error(fault.status, what)
    if fault.status == 429:
        wait = fault.retry_after_s
        if wait is None and fault.retry_after_ms is not None:
            wait = fault.retry_after_ms / 1000.0
        exc.message = f"Simulated rate limit reached for {what}." + (
            f" Please retry after {wait:g}s." if wait is not None else ""
        )
    return web.json_response(exc.body(), status=exc.status, headers=fault.retry_headers())


def _cut(request: web.Request) -> None:
    """Close the connection after what was written is flushed: the client sees the body end early."""
    transport = request.transport
    if transport is not None:
        transport.close()


class SimServing:
    """The /v1 and /tools handlers over the provider's state. `stopping` is set when the server
    stops, so that scripted pauses end at once."""

    def __init__(self, state: SimState, stopping: asyncio.Event) -> None:
        self._state = state
        self._stopping = stopping

    async def _receive(self, request: web.Request) -> object:
        text = await request.text()
        body: object = None
        if text.strip():
            try:
                body = json.loads(text)
            except ValueError:
                body = _INVALID
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        recorded = None if body is _INVALID else body
        self._state.received.append(ReceivedRequest(request.method, request.path, headers, recorded, text))
        return body

    def _check_chat(self, request: web.Request, body: object) -> tuple[ChatRequest, ModelBehavior]:
        self._state.authorize(request.headers.get("Authorization"))
        if body is _INVALID or body is None:
            raise RequestError(400, "We could not parse the JSON body of your request.", param="body")
        req = parse_chat_request(body)
        behavior = self._state.models.get(req.model)
        if behavior is None:
            raise RequestError(
                404,
                f"The model '{req.model}' does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return req, behavior

    async def _pause(self, request: web.Request, seconds: float) -> bool:
        """Sleep for a scripted fault; False (early) if the client left or the server is stopping,
        so a hang never outlives its client nor delays stop()."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            transport = request.transport
            if self._stopping.is_set() or transport is None or transport.is_closing():
                return False
            await asyncio.sleep(min(left, PAUSE_POLL_S))
        return True

    async def _unary(self, request: web.Request, payload: Any, fault: Fault | None) -> web.StreamResponse:
        """A 200 JSON answer, as the fault (if any) bends it."""
        if fault is None:
            return web.json_response(payload)
        if fault.kind == "slow_first_byte" and not await self._pause(request, fault.delay_s):
            _cut(request)
            return web.Response()
        text = json.dumps(payload)
        if fault.kind == "malformed_json":
            bad = fault.body if fault.body is not None else text[: len(text) // 2]
            return web.Response(text=bad, content_type="application/json")
        if fault.kind == "cut_body":
            data = text.encode()
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(data)
            try:
                await response.prepare(request)
                await response.write(data[: len(data) // 2])
            except ConnectionResetError:
                pass
            _cut(request)
            return response
        return web.json_response(payload)

    async def _stream(
        self, request: web.Request, chunks: list[dict[str, Any]], chunk_delay_ms: float, fault: Fault | None
    ) -> web.StreamResponse:
        """The SSE answer: the chunks then [DONE], as the fault (if any) bends it. A stream fault
        strikes after min(after_chunks, len(chunks)) chunks, i.e. at the latest just before [DONE]."""
        response = web.StreamResponse(headers=_SSE_HEADERS)
        strike = min(fault.after_chunks, len(chunks)) if fault is not None else -1
        try:
            await response.prepare(request)  # a StreamResponse sends its headers here
            slow = fault is not None and fault.kind == "slow_first_byte"
            if slow and fault is not None and not await self._pause(request, fault.delay_s):
                _cut(request)
                return response
            for i in range(len(chunks) + 1):
                if i == strike and fault is not None:
                    if fault.kind == "cut_stream":
                        _cut(request)
                        return response
                    if fault.kind == "stall" and not await self._pause(request, fault.delay_s):
                        _cut(request)
                        return response
                    if fault.kind == "malformed_sse":
                        line = fault.body if fault.body is not None else DEFAULT_BAD_SSE_LINE
                        await response.write(f"{line}\n\n".encode())
                if i == len(chunks):
                    break
                if i and chunk_delay_ms > 0:
                    await asyncio.sleep(chunk_delay_ms / 1000.0)
                await response.write(sse_event(chunks[i]))
            await response.write(sse_event("[DONE]"))
            await response.write_eof()
        except ConnectionResetError:
            logger.debug("client went away mid-stream")
        return response

    # handlers

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._receive(request)
        try:
            req, behavior = self._check_chat(request, body)
        except RequestError as exc:
            return json_error(exc)
        counts = self._state.model_counts[req.model]
        counts.requests += 1
        fault = self._state.take_fault(self._state.model_faults, req.model, req.stream)
        if fault is not None:
            counts.count_fault(fault)
        await asyncio.sleep(self._state.delay_s(behavior.latency_ms, behavior.latency_jitter_ms))
        what = f"model '{req.model}'"
        if fault is None and self._state.fails(behavior.error_rate):
            counts.errors += 1
            return json_error(injected_error(behavior.error_status, what))
        if fault is not None and fault.kind == "status":
            return _fault_error(fault, what)
        if fault is not None and fault.kind == "hang" and not await self._pause(request, fault.delay_s):
            _cut(request)
            return web.Response()
        completion_id, call_id = self._state.next_ids()
        reply = reply_for(req, call_id, behavior)
        created = int(time.time())
        # malformed_json answers a JSON body whatever `stream` asked for
        if not req.stream or (fault is not None and fault.kind == "malformed_json"):
            payload = completion_body(completion_id, created, req.model, reply)
            return await self._unary(request, payload, fault)
        chunks = stream_chunks(completion_id, created, req.model, reply, req.include_usage)
        return await self._stream(request, chunks, behavior.chunk_delay_ms, fault)

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            self._state.authorize(request.headers.get("Authorization"))
        except RequestError as exc:
            return json_error(exc)
        return web.json_response(models_list(sorted(self._state.models)))

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            self._state.authorize(request.headers.get("Authorization"))
        except RequestError as exc:
            return json_error(exc)
        if name not in self._state.models:
            message = f"The model '{name}' does not exist."
            return json_error(RequestError(404, message, param="model", code="model_not_found"))
        return web.json_response(model_object(name))

    async def tool(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = await self._receive(request)
        behavior = self._state.tools.get(name)
        if behavior is None:
            return json_error(RequestError(404, f"Unknown tool '{name}'.", type_="not_found", param="name"))
        counts = self._state.tool_counts[name]
        counts.requests += 1
        fault = self._state.take_fault(self._state.tool_faults, name, stream=False)
        if fault is not None:
            counts.count_fault(fault)
        await asyncio.sleep(self._state.delay_s(behavior.latency_ms))
        if fault is None and self._state.fails(behavior.error_rate):
            counts.errors += 1
            return json_error(injected_error(behavior.error_status, f"tool '{name}'"))
        if fault is not None and fault.kind == "status":
            return _fault_error(fault, f"tool '{name}'")
        if fault is not None and fault.kind == "hang" and not await self._pause(request, fault.delay_s):
            _cut(request)
            return web.Response()
        if body is _INVALID:
            return json_error(RequestError(400, "The request body is not valid JSON.", param="body"))
        try:
            result = run_tool(name, body)
        except RequestError as exc:
            return json_error(exc)
        return await self._unary(request, result, fault)
