"""CallTool: a tool of the session's version, run through its breaker, timeout and retries
(only when idempotent), with one ToolRecord event and one `execute_tool` span.

In a whole-trajectory shadow session (role SHADOW) a `side_effects: write` tool is not run:
the call is answered `intercepted: true` with the tool's `shadow_response` (or an empty
success), and the intended action is recorded: the tool, a canonical hash of the arguments,
and the arguments themselves only when content capture is on. Read tools run as usual.
The span's `gen_ai.tool.call.disposition` says which: `execute` or `simulate`.

Before anything is sent (or intercepted) the arguments are checked against the tool's JSON
schema: `INVALID_ARGUMENT` naming the failing field's path. A tool's failures map to what the
agent can act on: a 4xx to `FAILED_PRECONDITION` (its status and reason phrase, never the body;
408 and 429 are retriable and count as 5xx), a 5xx, a timeout, a broken connection or an open
breaker to `UNAVAILABLE`, a 2xx body that is not JSON to `INTERNAL`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import grpc

from outrider import TOOL_REJECTED
from outrider.v1 import common_pb2, events_pb2, sidecar_pb2
from sidecar._call_errors import CallError, deadline_of, fail
from sidecar._record import ERROR, OK, Recorder, TraceCarrier, elapsed_ms
from sidecar.resilience._executor import ChatFailed, Executor, upstream_status
from sidecar.routing._drain import precondition_status
from sidecar.routing._session import Session
from sidecar.routing._versions import Version
from sidecar.shadow._compare import arguments_sha256
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.upstream._exceptions import UpstreamError, UpstreamStatusError, UpstreamTimeout
from sidecar.upstream._tool_schema import BadToolSchema, SchemaViolation, ToolSchemas

EMPTY_SUCCESS = "{}"


def _tool_error(name: str, exc: UpstreamError) -> CallError:
    code = tool_status(exc)
    if code != grpc.StatusCode.FAILED_PRECONDITION:
        return CallError(code, str(exc))
    # ErrorInfo TOOL_REJECTED: an agent tells "fix the arguments" from a drained session's
    # FAILED_PRECONDITION without parsing the message
    status = precondition_status(TOOL_REJECTED, str(exc), {"tool": name, "http_status": str(exc.status)})
    return CallError(code, str(exc), status)


def tool_status(exc: UpstreamError) -> grpc.StatusCode:
    """A tool's failure as the status the agent acts on (see the module docstring)."""
    if isinstance(exc, UpstreamStatusError) and not exc.retriable:
        return grpc.StatusCode.FAILED_PRECONDITION  # the tool refused these arguments: do not retry
    if isinstance(exc, UpstreamTimeout) or exc.retriable:
        return grpc.StatusCode.UNAVAILABLE
    return upstream_status(exc)


@dataclass(frozen=True, slots=True)
class ToolCall:
    session_token: str
    tool_name: str
    arguments_json: str
    time_remaining: float | None = None
    trace: TraceCarrier = None


class ToolCalls:
    def __init__(
        self,
        *,
        executor: Executor,
        recorder: Recorder,
        metrics: SidecarMetrics,
        max_request_bytes: int,
        capture_content: bool = False,
    ) -> None:
        self._executor = executor
        self._recorder = recorder
        self._metrics = metrics
        self._max_bytes = max_request_bytes
        self._capture = capture_content
        self._schemas = ToolSchemas()

    def _arguments(self, version: Version, call: ToolCall) -> str:
        if not call.tool_name:
            fail(grpc.StatusCode.INVALID_ARGUMENT, "tool_name: must not be empty")
        if call.tool_name not in version.tools:
            fail(
                grpc.StatusCode.NOT_FOUND,
                f"tool_name: version {version.label} ({version.version_id}) has no tool {call.tool_name!r}",
            )
        arguments = call.arguments_json or "{}"
        if len(arguments) > self._max_bytes:
            fail(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"arguments_json: {len(arguments)} bytes exceeds max_request_bytes ({self._max_bytes})",
            )
        try:
            parsed = json.loads(arguments)
        except ValueError as exc:
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT, f"arguments_json: not valid JSON: {exc}"
            ) from None
        except RecursionError:
            fail(grpc.StatusCode.INVALID_ARGUMENT, "arguments_json: nested too deeply")
        if not isinstance(parsed, dict):
            fail(grpc.StatusCode.INVALID_ARGUMENT, "arguments_json: must be a JSON object")
        try:
            self._schemas.check(version.version_id, version.tools[call.tool_name], parsed)
        except SchemaViolation as exc:
            fail(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except BadToolSchema as exc:
            where = f"version {version.label} ({version.version_id})"
            fail(grpc.StatusCode.FAILED_PRECONDITION, f"{where}: {exc}")
        return arguments

    async def call(self, session: Session, version: Version, call: ToolCall) -> sidecar_pb2.CallToolResponse:
        arguments = self._arguments(version, call)
        tool = version.tools[call.tool_name]
        deadline = deadline_of(call.time_remaining, version)
        intercept = session.role == common_pb2.ROLE_SHADOW and tool.side_effects == "write"
        start = time.perf_counter()
        event = self._recorder.event(session)
        record = event.tool
        record.tool_name = tool.name
        record.side_effects = tool.side_effects
        with self._recorder.tool_span(call.trace, session, version, tool.name, tool.endpoint) as span:
            span.set_arguments(arguments)
            span.set_disposition("simulate" if intercept else "execute")
            if intercept:
                return self._intercepted(event, version, tool.name, tool.shadow_response, arguments, start)
            try:
                result, attempts = await self._executor.call_tool(version, tool, arguments, deadline, span)
            except (ChatFailed, UpstreamError, asyncio.CancelledError) as exc:
                record.latency_ms = elapsed_ms(start)
                record.outcome = ERROR
                record.error_class = (
                    "cancelled" if isinstance(exc, asyncio.CancelledError) else exc.error_class
                )
                if isinstance(exc, UpstreamError):
                    record.status_code = exc.status or 0
                    record.attempts = getattr(exc, "attempts", 1)
                self._recorder.emit(event)
                span.set_error(record.error_class)
                if isinstance(exc, ChatFailed):
                    fail(exc.code, exc.message)
                if isinstance(exc, UpstreamError):
                    raise _tool_error(tool.name, exc) from None
                raise
            span.set_result(result.result_json)
        latency = elapsed_ms(start)
        record.latency_ms = latency
        record.outcome = OK
        record.status_code = result.status
        record.attempts = attempts
        self._recorder.emit(event)
        return sidecar_pb2.CallToolResponse(
            result_json=result.result_json,
            status_code=result.status,
            version_id=version.version_id,
            latency_ms=latency,
            attempts=attempts,
        )

    def _intercepted(
        self,
        event: events_pb2.Event,
        version: Version,
        tool: str,
        shadow_response: str | None,
        arguments: str,
        start: float,
    ) -> sidecar_pb2.CallToolResponse:
        """A write of a shadow session: recorded as intended, answered, not run."""
        record = event.tool
        record.intercepted = True
        record.outcome = OK
        record.status_code = 200
        record.arguments_sha256 = arguments_sha256(arguments)
        if self._capture:
            record.arguments_json = arguments
        latency = elapsed_ms(start)
        record.latency_ms = latency
        self._recorder.emit(event)
        self._metrics.shadow_intercepted.labels(tool).inc()
        return sidecar_pb2.CallToolResponse(
            result_json=shadow_response or EMPTY_SUCCESS,
            status_code=200,
            version_id=version.version_id,
            intercepted=True,
            latency_ms=latency,
        )
