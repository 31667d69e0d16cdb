"""OpenAI chat-completions wire format <-> the call pipeline's messages (`sidecar._openai_http`).

The agent's request brings only its conversation: the version owns the model, the system
prompt, the parameters and the tools, so `model`, `tools`, `temperature` and the like in the
body are accepted and ignored (`model` is checked when `check_model` is on). A `CallError`
becomes OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, with the HTTP
status grpc-gateway gives its code (a drained session is 409, not 400).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from outrider.v1 import common_pb2, sidecar_pb2

DEFAULT_API_KEY_ENV = "OUTRIDER_OPENAI_API_KEY"
# OpenAI's "developer" role is its newer name for "system"
_ROLE_ALIASES = {"developer": "system"}
_FIELD = re.compile(r"[A-Za-z_][\w.\[\]-]*")


class OpenAIHttpConfig(BaseModel):
    """The `openai_http:` listener: loopback by default, off unless configured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    listen: str = Field(default="127.0.0.1:0", min_length=3)  # host:port, port 0 = any free port
    require_api_key: bool = False  # Authorization: Bearer <the key in api_key_env>
    api_key_env: str = Field(default=DEFAULT_API_KEY_ENV, min_length=1)
    check_model: bool = False  # refuse a `model` that is not the session's version (id or model)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"expected host:port (port 0 = any free port), got {value!r}")
        return value


class WireError(Exception):
    """A request that does not parse: 400 naming the field (`param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = f"{param}: {message}"


class ChatBody:
    """The parts of a chat-completions body the sidecar uses."""

    def __init__(self, body: object) -> None:
        if not isinstance(body, dict):
            raise WireError("body", "expected a JSON object")
        self.model = _opt_str(body, "model")
        self.user = _opt_str(body, "user")
        self.stream = bool(body.get("stream") or False)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise WireError("stream_options", "expected an object")
        self.include_usage = bool(options.get("include_usage") or False)
        raw = body.get("messages")
        if not isinstance(raw, list):
            raise WireError("messages", "expected an array of messages")
        self.messages = [_message(index, m) for index, m in enumerate(raw)]


def _opt_str(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise WireError(name, f"expected a string, got {type(value).__name__}")
    return value


def _content(where: str, value: object) -> str:
    """A string, or an array of text parts joined (images and audio are refused)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise WireError(f"{where}[{index}]", "only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise WireError(where, "expected a string or an array of text parts")


def _message(index: int, raw: object) -> common_pb2.ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise WireError(where, "expected an object")
    role = raw.get("role")
    if not isinstance(role, str):
        raise WireError(f"{where}.role", "expected a string")
    message = common_pb2.ChatMessage(
        role=_ROLE_ALIASES.get(role, role), content=_content(f"{where}.content", raw.get("content"))
    )
    for key in ("name", "tool_call_id"):
        value = raw.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise WireError(f"{where}.{key}", "expected a string")
            setattr(message, key, value)
    calls = raw.get("tool_calls") or []
    if not isinstance(calls, list):
        raise WireError(f"{where}.tool_calls", "expected an array")
    for n, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise WireError(f"{where}.tool_calls[{n}].function.name", "expected a string")
        arguments = function.get("arguments") or "{}"
        if not isinstance(arguments, str):
            raise WireError(f"{where}.tool_calls[{n}].function.arguments", "expected a JSON string")
        message.tool_calls.add(id=str(call.get("id") or ""), name=function["name"], arguments_json=arguments)
    return message


# responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _tool_calls(calls: Iterable[common_pb2.ToolCall], *, indexed: bool) -> list[dict[str, Any]]:
    out = []
    for index, call in enumerate(calls):
        entry: dict[str, Any] = {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_json or "{}"},
        }
        if indexed:
            entry["index"] = index
        out.append(entry)
    return out


def usage(response: sidecar_pb2.ChatResponse) -> dict[str, Any]:
    u = response.usage
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
    }


def finish_reason(response: sidecar_pb2.ChatResponse) -> str:
    if response.message.tool_calls:
        return "tool_calls"
    return response.finish_reason or "stop"


def completion(response: sidecar_pb2.ChatResponse, cid: str) -> dict[str, Any]:
    """The chat.completion object of a unary call."""
    message: dict[str, Any] = {"role": "assistant", "content": response.message.content or None}
    if response.message.tool_calls:
        message["tool_calls"] = _tool_calls(response.message.tool_calls, indexed=False)
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": response.model,
        "system_fingerprint": response.version_id,
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason(response), "logprobs": None}
        ],
        "usage": usage(response),
    }


class ChunkWriter:
    """chat.completion.chunk objects of one stream, as SSE `data:` lines."""

    def __init__(self, cid: str, model: str) -> None:
        self.cid = cid
        self.model = model
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {
            "id": self.cid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return sse(body)

    def delta(self, delta: Mapping[str, Any], finish: str | None = None) -> bytes:
        return self._chunk([{"index": 0, "delta": dict(delta), "finish_reason": finish, "logprobs": None}])

    def tool_calls(self, calls: Sequence[common_pb2.ToolCall]) -> bytes:
        return self.delta({"tool_calls": _tool_calls(calls, indexed=True)})

    def final(self, response: sidecar_pb2.ChatResponse) -> bytes:
        self.model = response.model or self.model
        return self._chunk(
            [{"index": 0, "delta": {}, "finish_reason": finish_reason(response), "logprobs": None}],
            system_fingerprint=response.version_id,
        )

    def usage(self, response: sidecar_pb2.ChatResponse) -> bytes:
        return self._chunk([], usage=usage(response))


def sse(body: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"

# errors: the HTTP status of each gRPC code (grpc-gateway's table), and OpenAI's error type
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,  # a drained or expired session: open a new one
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,  # every tier failed
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}
# worth retrying: the openai SDK honours x-should-retry, and would otherwise retry 409 too
RETRYABLE_STATUS = frozenset({429, 503, 504})


def http_status(code: grpc.StatusCode) -> int:
    return _HTTP_STATUS.get(code, 500)


def error_type(status: int) -> str:
    return _ERROR_TYPE.get(status, "server_error")


def param_of(message: str) -> str | None:
    """The field a pipeline message names (`messages[0].role: ...`), in wire terms."""
    head, sep, _ = message.partition(": ")
    if not sep or not _FIELD.fullmatch(head):
        return None
    return "x-outrider-session" if head == "session_id" else head


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
