"""A simulated OpenAI-compatible LLM provider and tool server: a real aiohttp HTTP server.

It stands in for real providers in `outrider dev`, demos and tests. Each model and tool has
a behavior (latency, jitter, error rate and status, SSE chunk delay) that can change at run
time, through `set_model`/`set_tool` or ``PUT /_sim/models/{model}``. All randomness comes
from one `random.Random(seed)`, so a test run is reproducible. For shadow mode, a behavior
can make a candidate that differs (tool_rename, ignore_tools, reply_style, reply_prefix) and a
judge model with scripted scores (judge, judge_scores, judge_default_score): `sim-divergent`
and `sim-judge` are served by default.

Endpoints: ``POST /v1/chat/completions`` (unary and SSE), ``GET /v1/models[/{model}]``,
``POST /tools/{name}``, ``PUT|PATCH /_sim/models/{model}``, ``PUT|PATCH /_sim/tools/{name}``
(PUT replaces the behavior, PATCH changes only the fields given), ``GET /_sim/stats``.

Fault endpoints: ``GET|DELETE /_sim/faults`` (list / clear all), ``POST|DELETE
/_sim/faults/models/{model}`` and ``/_sim/faults/tools/{name}`` (queue a JSON list of faults /
clear them).

Scripted faults (`Fault`, `script`, `script_tool`, ``/_sim/faults/...``) make the next requests
to a model or tool fail the way real providers fail: error statuses with retry headers, hangs,
slow first bytes, cut or stalled streams, malformed JSON or SSE. They are deterministic: each
applies, in the order scripted, to its next `times` matching requests. A refused connection is
not a server fault: `refused_base_url()` gives a URL where nothing listens.

This module has the server's lifecycle, the scripting API and the control endpoints; the
OpenAI-compatible serving of /v1 and /tools is in `devstack._sim_serving`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

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
from ._sim_faults import (
    FAULT_KINDS,
    STREAM_ONLY,
    Fault,
    FaultError,
    FaultKind,
    FaultQueue,
    fault_to_dict,
    faults_from_json,
    refused_base_url,
)
from ._sim_openai import (
    RequestError,
)
from ._sim_serving import SimServing, json_error
from ._sim_state import RECEIVED_MAX, B, ReceivedRequest, SimState

__all__ = [
    "API_KEY_ENV",
    "RECEIVED_MAX",
    "FAULT_KINDS",
    "BehaviorError",
    "Fault",
    "FaultError",
    "FaultKind",
    "ModelBehavior",
    "ReceivedRequest",
    "SimConfigError",
    "SimProvider",
    "ToolBehavior",
    "load_sim_config",
    "refused_base_url",
    "refused_tool_url",
    "serve",
]

logger = logging.getLogger(__name__)

API_KEY_ENV = "OUTRIDER_SIM_API_KEY"  # read by serve() when no api_key is passed
SHUTDOWN_TIMEOUT_S = 1.0


def refused_tool_url(name: str, host: str = "127.0.0.1") -> str:
    """A tool URL where nothing listens (see refused_base_url)."""
    return refused_base_url(host).removesuffix("/v1") + f"/tools/{name}"


class SimProvider:
    """The simulated provider; an async context manager, `start`/`stop` idempotent.

    Without `models`, it serves `sim-fast`, `sim-divergent` and `sim-judge` (5 ms each); without
    `tools`, `lookup_order` and `echo`.
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
        self._stopping = asyncio.Event()  # ends scripted pauses at once, so stop() never waits them out
        self._serving = SimServing(self._state, self._stopping)

    # lifecycle

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._stopping.clear()
        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/chat/completions", self._serving.chat),
                web.get("/v1/models", self._serving.list_models),
                web.get("/v1/models/{model}", self._serving.get_model),
                web.post("/tools/{name}", self._serving.tool),
                web.put("/_sim/models/{name}", self._put_model),
                web.patch("/_sim/models/{name}", self._put_model),
                web.put("/_sim/tools/{name}", self._put_tool),
                web.patch("/_sim/tools/{name}", self._put_tool),
                web.get("/_sim/stats", self._get_stats),
                web.get("/_sim/faults", self._get_faults),
                web.delete("/_sim/faults", self._delete_faults),
                web.post("/_sim/faults/models/{name}", self._post_model_faults),
                web.delete("/_sim/faults/models/{name}", self._delete_model_faults),
                web.post("/_sim/faults/tools/{name}", self._post_tool_faults),
                web.delete("/_sim/faults/tools/{name}", self._delete_tool_faults),
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
            self._stopping.set()
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

    @staticmethod
    def refused_url(host: str = "127.0.0.1") -> str:
        """A base URL where connecting is really refused (nothing listens); see refused_base_url."""
        return refused_base_url(host)

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
        """What ``GET /_sim/stats`` returns: {"models"|"tools": {name: {requests, errors, faults,
        pending_faults, behavior}}}; `faults` counts applied scripted faults by kind."""
        return self._state.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters and forget the received requests (scripted faults stay queued)."""
        self._state.reset()

    # scripted faults

    def script(self, model: str, *faults: Fault) -> None:
        """Queue faults for chat requests naming `model`, after any already queued. Each applies
        to the next `fault.times` matching requests (None: until cleared), then the next one.

        Stream-only kinds (cut_stream, stall, malformed_sse) wait at the head of the queue while
        unary requests pass untouched; cut_body likewise waits for a unary request. A request
        suffering a fault skips the behavior's random error draw, not its latency.
        Raises FaultError (a ValueError) naming `model` if the model is unknown, `times` if a
        fault would follow one that never expires.
        """
        if model not in self._state.models:
            known = ", ".join(sorted(self._state.models))
            raise FaultError("model", f"unknown model {model!r} (known: {known})")
        self._state.model_faults[model].push(faults)
        logger.info("scripted faults for model %r: %s", model, ", ".join(f.kind for f in faults))

    def script_tool(self, name: str, *faults: Fault) -> None:
        """Queue faults for `POST /tools/{name}`, as `script` does for models. Stream-only kinds
        make no sense for a tool (FaultError naming `kind`)."""
        if name not in self._state.tools:
            known = ", ".join(sorted(self._state.tools))
            raise FaultError("tool", f"unknown tool {name!r} (known: {known})")
        for fault in faults:
            if isinstance(fault, Fault) and fault.kind in STREAM_ONLY:
                raise FaultError("kind", f"{fault.kind!r} is for streamed chat only, not for tools")
        self._state.tool_faults[name].push(faults)
        logger.info("scripted faults for tool %r: %s", name, ", ".join(f.kind for f in faults))

    def clear_faults(self, model: str | None = None) -> None:
        """Drop the faults still queued for `model`; without a model, for every model and tool."""
        if model is None:
            self._state.model_faults.clear()
            self._state.tool_faults.clear()
        else:
            self._state.model_faults.pop(model, None)

    def clear_tool_faults(self, name: str | None = None) -> None:
        """Drop the faults still queued for tool `name`; without a name, for every tool."""
        if name is None:
            self._state.tool_faults.clear()
        else:
            self._state.tool_faults.pop(name, None)

    def pending_faults(self, model: str) -> list[Fault]:
        """The faults still queued for `model`, head first, `times` set to the uses left."""
        queue = self._state.model_faults.get(model)
        return queue.pending() if queue is not None else []

    def pending_tool_faults(self, name: str) -> list[Fault]:
        queue = self._state.tool_faults.get(name)
        return queue.pending() if queue is not None else []

    def fault_counts(self, model: str) -> dict[str, int]:
        """Scripted faults applied to this model's requests so far, by kind."""
        counts = self._state.model_counts.get(model)
        return dict(counts.faults) if counts else {}

    def tool_fault_counts(self, name: str) -> dict[str, int]:
        counts = self._state.tool_counts.get(name)
        return dict(counts.faults) if counts else {}

    @property
    def received(self) -> list[ReceivedRequest]:
        """The last RECEIVED_MAX requests to /v1 and /tools, oldest first."""
        return list(self._state.received)

    # control endpoints (/_sim/...); /v1 and /tools are served by SimServing (_sim_serving)

    async def _put_behavior(self, request: web.Request, cls: type[B], table: dict[str, B]) -> web.Response:
        name = request.match_info["name"]
        try:
            data = await request.json()
        except ValueError:
            return json_error(RequestError(400, "The request body is not valid JSON.", param="body"))
        base = table.get(name) if request.method == "PATCH" else None
        try:
            behavior = behavior_from_mapping(cls, data, base)
        except BehaviorError as exc:
            return json_error(RequestError(400, str(exc), param=exc.field))
        table[name] = behavior
        logger.info("simulated %s %r set to %s", cls.__name__, name, behavior)
        return web.json_response({"name": name, "behavior": behavior_to_dict(behavior)})

    async def _put_model(self, request: web.Request) -> web.Response:
        return await self._put_behavior(request, ModelBehavior, self._state.models)

    async def _put_tool(self, request: web.Request) -> web.Response:
        return await self._put_behavior(request, ToolBehavior, self._state.tools)

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    def _faults_view(self) -> dict[str, Any]:
        def view(queues: Mapping[str, FaultQueue]) -> dict[str, Any]:
            return {n: [fault_to_dict(f) for f in q.pending()] for n, q in sorted(queues.items()) if len(q)}

        return {"models": view(self._state.model_faults), "tools": view(self._state.tool_faults)}

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self._faults_view())

    async def _delete_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return web.json_response(self._faults_view())

    async def _post_faults(self, request: web.Request, script: Callable[..., None], key: str) -> web.Response:
        name = request.match_info["name"]
        try:
            data = await request.json()
        except ValueError:
            return json_error(RequestError(400, "The request body is not valid JSON.", param="body"))
        try:
            faults = faults_from_json(data)
            script(name, *faults)
        except FaultError as exc:
            status = 404 if exc.field in ("model", "tool") else 400
            return json_error(RequestError(status, str(exc), param=exc.field))
        pending = self.pending_faults(name) if key == "model" else self.pending_tool_faults(name)
        return web.json_response({key: name, "pending_faults": [fault_to_dict(f) for f in pending]})

    async def _post_model_faults(self, request: web.Request) -> web.Response:
        return await self._post_faults(request, self.script, "model")

    async def _post_tool_faults(self, request: web.Request) -> web.Response:
        return await self._post_faults(request, self.script_tool, "tool")

    async def _delete_model_faults(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.clear_faults(name)
        return web.json_response({"model": name, "pending_faults": []})

    async def _delete_tool_faults(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.clear_tool_faults(name)
        return web.json_response({"tool": name, "pending_faults": []})


async def serve(
    host: str,
    port: int,
    config_path: Path | None,
    *,
    api_key: str | None = None,
    seed: int = 0,
    on_ready: Callable[[SimProvider], None] | None = None,
) -> None:
    """Run a simulated provider until cancelled: the default models and built-in tools,
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
