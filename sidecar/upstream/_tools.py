"""The tool client: `POST` the call's JSON arguments to the tool's HTTP endpoint.

A 2xx answer's body (which must be JSON) is the result, returned as text; anything else is
mapped into the `sidecar.upstream._exceptions` tree with kind "tool".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from sidecar._version_config import ToolConfig
from sidecar.upstream._exceptions import UpstreamError, UpstreamInvalidResponse, UpstreamStatusError
from sidecar.upstream._provider import RETRY_HEADERS, map_client_error

_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_MAX_REASON_CHARS = 60


def _reason(phrase: str | None) -> str:
    """The status line's reason phrase ("Not Found"), short and printable; never the body, which
    may carry the tool's data."""
    text = "".join(c for c in (phrase or "") if c.isprintable())[:_MAX_REASON_CHARS].strip()
    return f" {text}" if text else ""


@dataclass(frozen=True, slots=True)
class ToolResult:
    result_json: str
    status: int


class ToolClient:
    def __init__(self, http: aiohttp.ClientSession) -> None:
        self._http = http

    async def call(
        self,
        tool: ToolConfig,
        arguments_json: str,
        time_limit_s: float,
        *,
        trace_headers: Mapping[str, str] | None = None,
    ) -> ToolResult:
        """Run `tool` with already-validated JSON arguments within `time_limit_s` seconds."""
        name = tool.name
        try:
            async with self._http.post(
                tool.endpoint,
                data=arguments_json.encode(),
                headers={**_HEADERS, **trace_headers} if trace_headers else _HEADERS,
                timeout=aiohttp.ClientTimeout(total=time_limit_s),
            ) as resp:
                if not 200 <= resp.status < 300:
                    resp.release()
                    raise UpstreamStatusError(
                        f"tool {name} returned HTTP {resp.status}{_reason(resp.reason)}",
                        upstream=name,
                        kind="tool",
                        status=resp.status,
                        headers={k: v for k, v in resp.headers.items() if k.lower() in RETRY_HEADERS},
                    )
                body = await resp.read()
                status = resp.status
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_client_error(exc, name, "tool", time_limit_s) from exc
        try:
            text = body.decode("utf-8") if body else "null"
            json.loads(text)
        except ValueError:
            raise UpstreamInvalidResponse(
                f"tool {name} answered with a body that is not JSON", upstream=name, kind="tool"
            ) from None
        return ToolResult(text, status)
