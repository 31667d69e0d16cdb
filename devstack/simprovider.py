"""A simulated OpenAI-compatible LLM provider and tool server: a real aiohttp HTTP server.

It stands in for real providers in `outrider dev`, demos and tests. Each model and tool has
a behavior (latency, jitter, error rate and status, SSE chunk delay) that can change at run
time, through `set_model`/`set_tool` or ``PUT /_sim/models/{model}``. All randomness comes
from one `random.Random(seed)`, so a test run is reproducible.

Endpoints: ``POST /v1/chat/completions`` (unary and SSE), ``GET /v1/models[/{model}]``,
``POST /tools/{name}``, ``PUT|PATCH /_sim/models/{model}``, ``PUT|PATCH /_sim/tools/{name}``
(PUT replaces the behavior, PATCH changes only the fields given), ``GET /_sim/stats``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ._sim_behavior import (
    BehaviorError,
    ModelBehavior,
    SimConfigError,
    ToolBehavior,
    behavior_from_mapping,
    behavior_to_dict,
    default_models,
    default_tools,
    load_sim_config,
)
from ._sim_openai import (
    ChatRequest,
    RequestError,
    completion_body,
    injected_error,
    model_object,
    models_list,
    parse_chat_request,
    plan_reply,
    sse_event,
    stream_chunks,
)
from ._sim_state import RECEIVED_MAX, B, ReceivedRequest, SimState
from ._sim_tools import run_tool

__all__ = [
    "API_KEY_ENV",
    "RECEIVED_MAX",
    "BehaviorError",
    "ModelBehavior",
    "ReceivedRequest",
    "SimConfigError",
    "SimProvider",
    "ToolBehavior",
    "load_sim_config",
    "serve",
]

logger = logging.getLogger(__name__)

API_KEY_ENV = "OUTRIDER_SIM_API_KEY"  # read by serve() when no api_key is passed
SHUTDOWN_TIMEOUT_S = 1.0
_INVALID = object()  # stands for a body that is not valid JSON
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _json_error(exc: RequestError) -> web.Response:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return web.json_response(exc.body(), status=exc.status, headers=headers)


class SimProvider:
    """The simulated provider; an async context manager, `start`/`stop` idempotent.

    Without `models`, it serves `sim-fast` (5 ms); without `tools`, `lookup_order` and `echo`.
    """

    def __init__(
        self,
        models: Mapping[str, ModelBehavior] | None = None,
        *,
        tools: Mapping[str, ToolBehavior] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        seed: int = 0,
    ) -> None:
        self._state = SimState(
            models=dict(models) if models is not None else default_models(),
            tools=dict(tools) if tools is not None else default_tools(),
            api_key=api_key,
            seed=seed,
        )
        self._host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # lifecycle

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/chat/completions", self._chat),
                web.get("/v1/models", self._list_models),
                web.get("/v1/models/{model}", self._get_model),
                web.post("/tools/{name}", self._tool),
                web.put("/_sim/models/{name}", self._put_model),
                web.patch("/_sim/models/{name}", self._put_model),
                web.put("/_sim/tools/{name}", self._put_tool),
                web.patch("/_sim/tools/{name}", self._put_tool),
                web.get("/_sim/stats", self._get_stats),
            ]
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._requested_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        logger.info("simulated provider listening on %s (models: %s)", self.base_url, ", ".join(self.models))

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> SimProvider:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # addresses

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("SimProvider is not started")
        return self._port

    @property
    def _origin(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self._origin}/v1"

    def tool_url(self, name: str) -> str:
        return f"{self._origin}/tools/{name}"

    # behavior and stats

    @property
    def models(self) -> dict[str, ModelBehavior]:
        return dict(self._state.models)

    @property
    def tools(self) -> dict[str, ToolBehavior]:
        return dict(self._state.tools)

    def set_model(self, model: str, behavior: ModelBehavior) -> None:
        self._state.models[model] = behavior

    def set_tool(self, name: str, behavior: ToolBehavior) -> None:
        self._state.tools[name] = behavior

    def requests(self, model: str) -> int:
        """Chat requests that named this (known) model, injected errors included."""
        counts = self._state.model_counts.get(model)
        return counts.requests if counts else 0

    def errors(self, model: str) -> int:
        """Injected errors this model answered with."""
        counts = self._state.model_counts.get(model)
        return counts.errors if counts else 0

    def tool_requests(self, name: str) -> int:
        counts = self._state.tool_counts.get(name)
        return counts.requests if counts else 0

    def tool_errors(self, name: str) -> int:
        counts = self._state.tool_counts.get(name)
        return counts.errors if counts else 0

    @property
    def stats(self) -> dict[str, Any]:
        """What ``GET /_sim/stats`` returns: {"models"|"tools": {name: {requests, errors, behavior}}}."""
        return self._state.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters and forget the received requests."""
        self._state.reset()

    @property
    def received(self) -> list[ReceivedRequest]:
        """The last RECEIVED_MAX requests to /v1 and /tools, oldest first."""
        return list(self._state.received)

    # request plumbing

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

    # handlers

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._receive(request)
        try:
            req, behavior = self._check_chat(request, body)
        except RequestError as exc:
            return _json_error(exc)
        counts = self._state.model_counts[req.model]
        counts.requests += 1
        await asyncio.sleep(self._state.delay_s(behavior.latency_ms, behavior.latency_jitter_ms))
        if self._state.fails(behavior.error_rate):
            counts.errors += 1
            return _json_error(injected_error(behavior.error_status, f"model '{req.model}'"))
        completion_id, call_id = self._state.next_ids()
        reply = plan_reply(req, call_id)
        created = int(time.time())
        if not req.stream:
            return web.json_response(completion_body(completion_id, created, req.model, reply))
        chunks = stream_chunks(completion_id, created, req.model, reply, req.include_usage)
        response = web.StreamResponse(headers=_SSE_HEADERS)
        try:
            await response.prepare(request)
            for i, chunk in enumerate(chunks):
                if i and behavior.chunk_delay_ms > 0:
                    await asyncio.sleep(behavior.chunk_delay_ms / 1000.0)
                await response.write(sse_event(chunk))
            await response.write(sse_event("[DONE]"))
            await response.write_eof()
        except ConnectionResetError:
            logger.debug("client went away mid-stream (%s)", completion_id)
        return response

    async def _list_models(self, request: web.Request) -> web.Response:
        try:
            self._state.authorize(request.headers.get("Authorization"))
        except RequestError as exc:
            return _json_error(exc)
        return web.json_response(models_list(sorted(self._state.models)))

    async def _get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            self._state.authorize(request.headers.get("Authorization"))
        except RequestError as exc:
            return _json_error(exc)
        if name not in self._state.models:
            message = f"The model '{name}' does not exist."
            return _json_error(RequestError(404, message, param="model", code="model_not_found"))
        return web.json_response(model_object(name))

    async def _tool(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await self._receive(request)
        behavior = self._state.tools.get(name)
        if behavior is None:
            return _json_error(RequestError(404, f"Unknown tool '{name}'.", type_="not_found", param="name"))
        counts = self._state.tool_counts[name]
        counts.requests += 1
        await asyncio.sleep(self._state.delay_s(behavior.latency_ms))
        if self._state.fails(behavior.error_rate):
            counts.errors += 1
            return _json_error(injected_error(behavior.error_status, f"tool '{name}'"))
        if body is _INVALID:
            return _json_error(RequestError(400, "The request body is not valid JSON.", param="body"))
        try:
            return web.json_response(run_tool(name, body))
        except RequestError as exc:
            return _json_error(exc)

    async def _put_behavior(self, request: web.Request, cls: type[B], table: dict[str, B]) -> web.Response:
        name = request.match_info["name"]
        try:
            data = await request.json()
        except ValueError:
            return _json_error(RequestError(400, "The request body is not valid JSON.", param="body"))
        base = table.get(name) if request.method == "PATCH" else None
        try:
            behavior = behavior_from_mapping(cls, data, base)
        except BehaviorError as exc:
            return _json_error(RequestError(400, str(exc), param=exc.field))
        table[name] = behavior
        logger.info("simulated %s %r set to %s", cls.__name__, name, behavior)
        return web.json_response({"name": name, "behavior": behavior_to_dict(behavior)})

    async def _put_model(self, request: web.Request) -> web.Response:
        return await self._put_behavior(request, ModelBehavior, self._state.models)

    async def _put_tool(self, request: web.Request) -> web.Response:
        return await self._put_behavior(request, ToolBehavior, self._state.tools)

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)


async def serve(
    host: str,
    port: int,
    config_path: Path | None,
    *,
    api_key: str | None = None,
    seed: int = 0,
    on_ready: Callable[[SimProvider], None] | None = None,
) -> None:
    """Run a simulated provider until cancelled: the default `sim-fast` model and built-in tools,
    plus (overridden by) whatever the config file has. Without `api_key`, the key is read from
    the OUTRIDER_SIM_API_KEY environment variable; unset or empty means no auth.

    Raises SimConfigError (naming file and field) for a bad config file, OSError if the
    address is taken. `on_ready` is called with the started provider (its port is known then).
    """
    models, tools = default_models(), default_tools()
    if config_path is not None:
        more_models, more_tools = load_sim_config(config_path)
        models.update(more_models)
        tools.update(more_tools)
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    async with SimProvider(models, tools=tools, host=host, port=port, api_key=api_key, seed=seed) as sim:
        if on_ready is not None:
            on_ready(sim)
        await asyncio.Event().wait()  # until cancelled; leaving the block stops the server
