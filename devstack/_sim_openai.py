"""The OpenAI chat-completions wire format, as pure functions: request checks, the deterministic
reply, and the unary and streamed (SSE chunk) bodies. No I/O here; the server does that.

Tokens are estimated as whitespace-separated words (plus a small per-message overhead for
prompts), so truncation by ``max_tokens`` and the usage numbers agree exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
SNIPPET_CHARS = 60
WORDS_PER_CHUNK = 3
ARGS_CHARS_PER_CHUNK = 12
PER_MESSAGE_TOKENS = 3  # framing overhead per message, as OpenAI's own estimate counts it
REPLY_PRIMING_TOKENS = 3
_TOOL_COMMAND = re.compile(r"/tool\s+(\S+)\s*(.*)\Z", re.DOTALL)
_WORD_BOUNDARY = re.compile(r"(?<=\s)(?=\S)")


class RequestError(Exception):
    """A request the provider refuses; maps to an OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def injected_error(status: int, what: str) -> RequestError:
    """The error a behavior's error_rate injects: server_error for 5xx, rate limit for 429."""
    if status == 429:
        return RequestError(
            429,
            f"Simulated rate limit reached for {what}. Please retry after 1s.",
            type_="rate_limit_exceeded",
            code="rate_limit_exceeded",
        )
    if status >= 500:
        return RequestError(status, f"Simulated server error from {what}.", type_="server_error")
    return RequestError(status, f"Simulated error {status} from {what}.")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON string, passed through as the "model" wrote it


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: Sequence[Mapping[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    tools_offered: bool


@dataclass(frozen=True)
class Reply:
    content: str | None
    tool_call: ToolCall | None
    finish_reason: str  # "stop", "length" or "tool_calls"
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _bad(message: str, param: str) -> RequestError:
    return RequestError(400, message, param=param)


def _positive_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"Invalid '{key}': expected an integer >= 1, got {value!r}.", key)
    return value


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message whose content is a string, None, or a list of content parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def parse_chat_request(body: object) -> ChatRequest:
    """Check a decoded request body; raises RequestError (400) naming the bad field."""
    if not isinstance(body, Mapping):
        raise _bad("The request body must be a JSON object.", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("Missing required parameter: 'model'.", "model")
    messages = body.get("messages")
    if messages is None:
        raise _bad("Missing required parameter: 'messages'.", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("Invalid 'messages': expected a non-empty array of messages.", "messages")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise _bad(f"Invalid '{where}': expected an object.", where)
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(f"Invalid '{where}.role': {role!r} is not one of {sorted(ROLES)}.", f"{where}.role")
        content = msg.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(f"Invalid '{where}.content': expected a string or an array.", f"{where}.content")
        if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
            raise _bad(f"Missing required parameter: '{where}.tool_call_id'.", f"{where}.tool_call_id")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"Invalid 'stream': expected a boolean, got {stream!r}.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise _bad("Invalid 'stream_options': expected an object.", "stream_options")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad("Invalid 'tools': expected an array.", "tools")
    max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        max_tokens=max_tokens,
        tools_offered=bool(tools) and body.get("tool_choice") != "none",
    )


def count_tokens(text: str) -> int:
    return len(text.split())


def prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    total = REPLY_PRIMING_TOKENS
    for msg in messages:
        total += PER_MESSAGE_TOKENS + count_tokens(message_text(msg))
        for call in msg.get("tool_calls") or ():
            if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
                total += count_tokens(str(call["function"].get("arguments", "")))
    return total


def word_pieces(text: str) -> list[str]:
    """Split text into pieces of one word each (with its trailing space) that join back exactly."""
    return [p for p in _WORD_BOUNDARY.split(text) if p]


def reworded(model: str) -> str:
    """The "reworded" reply style: names the model but shares few words with the echo reply."""
    return f"Simulated reply from {model}: sorry, I cannot confirm anything about this right now."


def text_reply(text: str, p_tokens: int, max_tokens: int | None) -> Reply:
    """A text reply, cut to `max_tokens` words (finish_reason "length") when longer."""
    pieces = word_pieces(text)
    finish = "stop"
    if max_tokens is not None and len(pieces) > max_tokens:
        text = "".join(pieces[:max_tokens]).rstrip()
        finish = "length"
    return Reply(text, None, finish, p_tokens, count_tokens(text))


def plan_reply(
    req: ChatRequest,
    call_id: str,
    *,
    tool_rename: Mapping[str, str] | None = None,
    ignore_tools: bool = False,
    reply_style: str = "echo",
    reply_prefix: str = "",
) -> Reply:
    """The deterministic answer to a request: a tool call, or text derived from the last message.

    The keywords make a shadow candidate that differs: it renames the tool it calls, ignores
    the tools offered, or words its text differently ("reworded") or with a prefix.
    """
    p_tokens = prompt_tokens(req.messages)
    last = req.messages[-1]
    last_text = message_text(last)
    if req.tools_offered and not ignore_tools and last.get("role") == "user":
        match = _TOOL_COMMAND.match(last_text.strip())
        if match:
            arguments = match.group(2).strip() or "{}"
            name = (tool_rename or {}).get(match.group(1), match.group(1))
            call = ToolCall(id=call_id, name=name, arguments=arguments)
            c_tokens = 1 + max(1, len(arguments) // 4)
            return Reply(None, call, "tool_calls", p_tokens, c_tokens)
    if reply_style == "reworded":
        text = reworded(req.model)
    elif last.get("role") == "tool":
        text = f"Simulated reply from {req.model} to tool result: {last_text[:SNIPPET_CHARS]}"
    else:
        user_texts = [message_text(m) for m in req.messages if m.get("role") == "user"]
        snippet = user_texts[-1][:SNIPPET_CHARS] if user_texts else ""
        text = f"Simulated reply from {req.model} to: {snippet}"
    return text_reply(reply_prefix + text, p_tokens, req.max_tokens)


def completion_body(completion_id: str, created: int, model: str, reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_call is not None:
        call = reply.tool_call
        message["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}],
        "usage": reply.usage(),
    }


def stream_chunks(
    completion_id: str, created: int, model: str, reply: Reply, include_usage: bool
) -> list[dict[str, Any]]:
    """Every ``chat.completion.chunk`` of a streamed reply, in order (without the [DONE] marker)."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None  # as OpenAI does: null on every chunk but the last
        return body

    chunks: list[dict[str, Any]] = []
    if reply.tool_call is not None:
        call = reply.tool_call
        head = {
            "index": 0,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        chunks.append(chunk({"role": "assistant", "content": None, "tool_calls": [head]}))
        args = call.arguments
        for start in range(0, len(args), ARGS_CHARS_PER_CHUNK):
            fragment = args[start : start + ARGS_CHARS_PER_CHUNK]
            chunks.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}))
    else:
        chunks.append(chunk({"role": "assistant", "content": "", "refusal": None}))
        pieces = word_pieces(reply.content or "")
        for start in range(0, len(pieces), WORDS_PER_CHUNK):
            chunks.append(chunk({"content": "".join(pieces[start : start + WORDS_PER_CHUNK])}))
    chunks.append(chunk({}, reply.finish_reason))
    if include_usage:
        chunks.append(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [],
                "usage": reply.usage(),
            }
        )
    return chunks


def sse_event(data: Mapping[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def models_list(names: Sequence[str]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(n) for n in names]}


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "outrider-sim"}
