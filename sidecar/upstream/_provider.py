"""The LLM provider client: OpenAI-compatible `POST {base_url}/chat/completions`.

The request is built from the pinned version (model, system prompt first, parameters,
tools in the OpenAI "function" format, bearer key); the agent only sends the conversation.
Streaming asks for `stream_options.include_usage` and parses the SSE stream with
`SSEDecoder` and `StreamAssembler`; a stream is complete only with a finish_reason *and*
`[DONE]`, anything less is `UpstreamInvalidResponse`, never a clean end.

Every aiohttp, timeout and JSON failure is mapped here into the `sidecar.upstream._exceptions` tree.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from outrider.v1 import common_pb2
from sidecar.routing._versions import Version
from sidecar.upstream import _json as fast_json
from sidecar.upstream._exceptions import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamStatusError,
    UpstreamStreamStall,
    UpstreamTimeout,
)
from sidecar.upstream._sse import SSEDecoder, SSEError

DONE = "[DONE]"
RETRY_HEADERS = frozenset({"retry-after", "retry-after-ms"})


@dataclass(slots=True)
class ToolCallOut:
    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ChatResult:
    content: str
    finish_reason: str
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    response_id: str = ""
    model: str = ""


class StreamError(ValueError):
    """A streamed completion that is malformed or ended early."""


def _usage(result: ChatResult, usage: object) -> None:
    if not isinstance(usage, dict):
        return
    result.input_tokens = int(usage.get("prompt_tokens") or 0)
    result.output_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        result.cached_input_tokens = int(details.get("cached_tokens") or 0)


class StreamAssembler:
    """Folds streamed chat-completion chunks (JSON strings) into deltas and one ChatResult."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._tools: dict[int, ToolCallOut] = {}
        self._tool_args: dict[int, list[str]] = {}
        self._result = ChatResult(content="", finish_reason="")
        self.done = False

    def feed(self, data: str) -> str:
        """Take one `data:` payload; return its content delta ("" if none)."""
        if self.done:
            raise StreamError("data after [DONE]")
        if data == DONE:
            self.done = True
            return ""
        try:
            chunk = fast_json.loads(data)
        except ValueError as exc:
            raise StreamError(f"stream chunk is not JSON: {exc}") from None
        if not isinstance(chunk, dict):
            raise StreamError("stream chunk is not a JSON object")
        if "error" in chunk:
            raise StreamError("provider sent an error in the stream")
        result = self._result
        result.response_id = result.response_id or str(chunk.get("id") or "")
        result.model = result.model or str(chunk.get("model") or "")
        if chunk.get("usage"):
            _usage(result, chunk["usage"])
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise StreamError("choices is not a list")
        delta_text = ""
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise StreamError("delta is not an object")
            text = delta.get("content")
            if text:
                delta_text += str(text)
            for fragment in delta.get("tool_calls") or ():
                self._tool_fragment(fragment)
            if choice.get("finish_reason"):
                result.finish_reason = str(choice["finish_reason"])
        if delta_text:
            self._content.append(delta_text)
        return delta_text

    def _tool_fragment(self, fragment: object) -> None:
        if not isinstance(fragment, dict):
            raise StreamError("tool call fragment is not an object")
        index = int(fragment.get("index", 0))
        call = self._tools.get(index)
        if call is None:
            call = self._tools[index] = ToolCallOut(id="", name="", arguments="")
            self._tool_args[index] = []
        if fragment.get("id"):
            call.id = str(fragment["id"])
        function = fragment.get("function") or {}
        if function.get("name"):
            call.name += str(function["name"])
        if function.get("arguments"):
            self._tool_args[index].append(str(function["arguments"]))

    def result(self) -> ChatResult:
        """The completed answer; StreamError if the stream lacked a finish_reason or [DONE]."""
        if not self._result.finish_reason:
            raise StreamError("stream ended without a finish_reason")
        if not self.done:
            raise StreamError("stream ended without [DONE]")
        result = self._result
        result.content = "".join(self._content)
        for index in sorted(self._tools):
            call = self._tools[index]
            call.arguments = "".join(self._tool_args[index])
            result.tool_calls.append(call)
        return result


def to_openai_messages(
    system_prompt: str, messages: Sequence[common_pb2.ChatMessage]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            item["name"] = m.name
        if m.tool_call_id:
            item["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
                for c in m.tool_calls
            ]
            if not m.content:
                item["content"] = None
        out.append(item)
    return out


def parse_completion(body: bytes, upstream: str) -> ChatResult:
    """A non-streamed chat completion; UpstreamInvalidResponse if it is not one."""
    try:
        data = fast_json.loads(body)
        choice = data["choices"][0]
        message = choice["message"]
        result = ChatResult(
            content=str(message.get("content") or ""),
            finish_reason=str(choice.get("finish_reason") or ""),
            response_id=str(data.get("id") or ""),
            model=str(data.get("model") or ""),
        )
        for call in message.get("tool_calls") or ():
            function = call["function"]
            result.tool_calls.append(
                ToolCallOut(
                    id=str(call.get("id") or ""),
                    name=str(function["name"]),
                    arguments=str(function.get("arguments") or ""),
                )
            )
        _usage(result, data.get("usage"))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise UpstreamInvalidResponse(
            f"provider {upstream} sent a malformed completion ({type(exc).__name__})", upstream=upstream
        ) from None
    return result


def map_client_error(exc: BaseException, upstream: str, kind: str, timeout: float) -> UpstreamError:
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(
            f"{kind} {upstream} did not answer within {timeout:.3g}s", upstream=upstream, kind=kind
        )
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamInvalidResponse(f"{kind} {upstream} sent a broken body", upstream=upstream, kind=kind)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(f"cannot connect to {kind} {upstream}", upstream=upstream, kind=kind)
    if isinstance(exc, aiohttp.ClientConnectionError):
        return UpstreamConnectError(f"connection to {kind} {upstream} failed", upstream=upstream, kind=kind)
    return UpstreamConnectError(
        f"{kind} {upstream} call failed ({type(exc).__name__})", upstream=upstream, kind=kind
    )


async def _raise_for_status(resp: aiohttp.ClientResponse, upstream: str, kind: str) -> None:
    if resp.status >= 400:
        resp.release()
        # the body may echo request details (even part of a key): keep it out of the message
        raise UpstreamStatusError(
            f"{kind} {upstream} returned HTTP {resp.status}",
            upstream=upstream,
            kind=kind,
            status=resp.status,
            headers={k: v for k, v in resp.headers.items() if k.lower() in RETRY_HEADERS},
        )


class ProviderClient:
    """Calls a version's provider over one shared aiohttp session (pooled connections)."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self._http = http

    async def chat(
        self,
        version: Version,
        messages: Sequence[common_pb2.ChatMessage],
        time_limit_s: float,
        *,
        trace_headers: Mapping[str, str] | None = None,
    ) -> ChatResult:
        """One completion; `trace_headers` (traceparent) go along with the version's headers."""
        upstream = version.provider
        payload = {
            **version.base_payload,
            "messages": to_openai_messages(version.config.system_prompt, messages),
        }
        try:
            async with self._http.post(
                version.chat_url,
                json=payload,
                headers={**version.headers, **trace_headers} if trace_headers else version.headers,
                timeout=aiohttp.ClientTimeout(total=time_limit_s),
            ) as resp:
                await _raise_for_status(resp, upstream, "provider")
                body = await resp.read()
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_client_error(exc, upstream, "provider", time_limit_s) from exc
        return parse_completion(body, upstream)

    async def chat_stream(
        self,
        version: Version,
        messages: Sequence[common_pb2.ChatMessage],
        time_limit_s: float,
        *,
        idle_timeout_s: float | None = None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[str | ChatResult, None]:
        """Content deltas (str) as they arrive, then exactly one ChatResult.

        ``idle_timeout_s`` bounds the wait for each body chunk: a longer gap is a
        `UpstreamStreamStall` (a timeout), whatever time the call has left."""
        upstream = version.provider
        payload = {
            **version.base_payload,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": to_openai_messages(version.config.system_prompt, messages),
        }
        decoder = SSEDecoder()
        assembler = StreamAssembler()
        try:
            async with self._http.post(
                version.chat_url,
                json=payload,
                headers={**version.headers, "Accept": "text/event-stream", **(trace_headers or {})},
                timeout=aiohttp.ClientTimeout(total=time_limit_s),
            ) as resp:
                await _raise_for_status(resp, upstream, "provider")
                while True:
                    try:
                        async with asyncio.timeout(idle_timeout_s):
                            chunk = await resp.content.readany()
                    except TimeoutError:
                        raise UpstreamStreamStall(
                            f"provider {upstream} stream stalled for more than {idle_timeout_s:.3g}s",
                            upstream=upstream,
                        ) from None
                    if not chunk:
                        break
                    for data in decoder.feed(chunk):
                        delta = assembler.feed(data)
                        if delta:
                            yield delta
                for data in decoder.finish():
                    delta = assembler.feed(data)
                    if delta:
                        yield delta
            result = assembler.result()
        except UpstreamError:
            raise
        except (StreamError, SSEError) as exc:
            raise UpstreamInvalidResponse(f"provider {upstream} stream: {exc}", upstream=upstream) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_client_error(exc, upstream, "provider", time_limit_s) from exc
        yield result
