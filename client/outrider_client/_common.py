"""What the sync and asyncio clients share: message coercion, the result types, the
deadline/quota-wait policy and the pieces of the tool-calling loop."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from outrider.v1 import common_pb2, sidecar_pb2
from outrider_client._errors import InvalidArgumentError, OutriderError, QuotaExceededError, ToolRejectedError

#: A chat message: the protobuf, or a mapping with role/content (and name, tool_call_id,
#: tool_calls as [{"id", "name", "arguments"}]); a bare string is one user message.
MessageLike: TypeAlias = common_pb2.ChatMessage | Mapping[str, Any] | str
#: A local tool for the loop: called with the parsed arguments, returns JSON-serialisable data
#: (or a string, sent as is). The async client also awaits a coroutine's result.
LocalTool: TypeAlias = Callable[[dict[str, Any]], Any]

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_QUOTA_WAITS = 3  # RESOURCE_EXHAUSTED waits per call, each within the call's deadline
DEFAULT_TOOL_ROUNDS = 8

_FEEDBACK = {
    "thumbs_up": sidecar_pb2.FEEDBACK_KIND_THUMBS_UP,
    "thumbs_down": sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN,
    "task_success": sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS,
    "task_failure": sidecar_pb2.FEEDBACK_KIND_TASK_FAILURE,
    "score": sidecar_pb2.FEEDBACK_KIND_SCORE,
}


def to_message(item: MessageLike) -> common_pb2.ChatMessage:
    if isinstance(item, common_pb2.ChatMessage):
        return item
    if isinstance(item, str):
        return common_pb2.ChatMessage(role="user", content=item)
    if not isinstance(item, Mapping) or not isinstance(item.get("role"), str):
        raise TypeError(
            f"a chat message must be a ChatMessage, a str or a mapping with a 'role'; got {item!r}"
        )
    calls = [
        c
        if isinstance(c, common_pb2.ToolCall)
        else common_pb2.ToolCall(
            id=c.get("id", ""), name=c.get("name", ""), arguments_json=_arguments_json(c.get("arguments"))
        )
        for c in item.get("tool_calls") or ()
    ]
    return common_pb2.ChatMessage(
        role=item["role"],
        content=item.get("content") or "",
        name=item.get("name") or "",
        tool_call_id=item.get("tool_call_id") or "",
        tool_calls=calls,
    )


def to_messages(messages: MessageLike | Sequence[MessageLike]) -> list[common_pb2.ChatMessage]:
    if isinstance(messages, str | Mapping | common_pb2.ChatMessage):
        return [to_message(messages)]
    return [to_message(m) for m in messages]


def _arguments_json(arguments: Any) -> str:
    if arguments is None:
        return "{}"
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def tool_request(session_id: str, name: str, arguments: Any, call_id: str) -> sidecar_pb2.CallToolRequest:
    return sidecar_pb2.CallToolRequest(
        session_id=session_id, tool_name=name, arguments_json=_arguments_json(arguments), call_id=call_id
    )


def feedback_request(session_id: str, kind: str | int, score: float | None) -> sidecar_pb2.FeedbackRequest:
    if isinstance(kind, str):
        if kind.lower() not in _FEEDBACK:
            raise ValueError(f"feedback kind {kind!r} is not one of {', '.join(_FEEDBACK)}")
        kind = _FEEDBACK[kind.lower()]
    if kind == sidecar_pb2.FEEDBACK_KIND_SCORE and (score is None or not 0.0 <= score <= 1.0):
        raise ValueError(f"feedback kind score needs a score in [0, 1], got {score!r}")
    return sidecar_pb2.FeedbackRequest(
        session_id=session_id, kind=sidecar_pb2.FeedbackKind.ValueType(kind), score=score or 0.0
    )


@dataclass(frozen=True, slots=True)
class ToolResult:
    """One tool call's answer: `result` is the parsed JSON (or the text when it is not JSON)."""

    name: str
    result: Any
    status_code: int = 200
    intercepted: bool = False  # a shadow session's write tool, not run
    version_id: str = ""
    local: bool = False  # run by a Python callable, not through the sidecar
    error: str = ""  # a rejected call: what the model was told instead of a result

    @classmethod
    def of(cls, name: str, response: sidecar_pb2.CallToolResponse) -> ToolResult:
        try:
            result = json.loads(response.result_json) if response.result_json else None
        except json.JSONDecodeError:
            result = response.result_json
        return cls(name, result, response.status_code, response.intercepted, response.version_id)


@dataclass(slots=True)
class ToolLoopResult:
    """The tool loop's outcome: the final answer, the whole conversation and every tool run."""

    response: sidecar_pb2.ChatResponse
    messages: list[common_pb2.ChatMessage]
    tool_results: list[ToolResult] = field(default_factory=list)
    rounds: int = 0

    @property
    def content(self) -> str:
        return self.response.message.content


class Deadline:
    """One call's deadline on the monotonic clock (None: no deadline)."""

    def __init__(self, timeout_s: float | None) -> None:
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def quota_wait(self, error: OutriderError, waits_done: int, max_waits: int) -> float | None:
        """How long to wait before retrying `error`, or None to give up with it: not a quota
        refusal, no hint, out of waits, or the wait would end past the deadline."""
        if not isinstance(error, QuotaExceededError):
            return None
        wait = error.retry_after_s
        if wait is None or waits_done >= max_waits:
            return None
        if self.at is not None and time.monotonic() + wait >= self.at:
            return None
        return wait


def assistant_message(response: sidecar_pb2.ChatResponse) -> common_pb2.ChatMessage:
    message = common_pb2.ChatMessage()
    message.CopyFrom(response.message)
    message.role = message.role or "assistant"
    return message


def parse_arguments(call: common_pb2.ToolCall) -> dict[str, Any]:
    try:
        parsed = json.loads(call.arguments_json or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"tool {call.name}: the model's arguments are not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgumentError(f"tool {call.name}: the model's arguments are not a JSON object")
    return parsed


def local_result(call: common_pb2.ToolCall, value: Any) -> ToolResult:
    return ToolResult(call.name, value, local=True)


def rejected_result(call: common_pb2.ToolCall, exc: InvalidArgumentError | ToolRejectedError) -> ToolResult:
    """A call the sidecar refused for its arguments or the tool rejected: the model is told
    why (so it can correct itself), the loop goes on."""
    status = exc.metadata.get("http_status", "")
    return ToolResult(
        call.name, None, int(status) if status.isdigit() else 400, error=exc.details or str(exc)
    )


def tool_message(call: common_pb2.ToolCall, result: ToolResult) -> common_pb2.ChatMessage:
    if result.error:
        content = json.dumps({"error": result.error})
    elif isinstance(result.result, str):
        content = result.result
    else:
        content = json.dumps(result.result)
    return common_pb2.ChatMessage(role="tool", tool_call_id=call.id, name=call.name, content=content)
