"""The floor of `scripts/bench sidecar-floor`: the least any Python gRPC hop on outrider.v1 does.

A bare `grpc.aio` server implementing `Sidecar.OpenSession` and `Sidecar.Chat` on the same
proto as the sidecar: Chat forwards the messages (after a fixed system prompt) to the upstream's
`/chat/completions` with one shared aiohttp session, and maps the answer into a ChatResponse.
No sessions, guards, quotas, retries, prices or telemetry: what is left is the cost of gRPC,
protobuf, aiohttp and JSON, i.e. what the sidecar cannot go below in Python.

`GetVersion` answers the server's call counters (`name` = "ok=N errors=M"), so the bench can
count failed calls that h2load cannot see (gRPC statuses travel in trailers, which it ignores).

    python -m tests.bench.floor_server --listen 127.0.0.1:PORT --upstream http://127.0.0.1:P/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import uuid
from typing import Any

import aiohttp
import grpc

from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc

SYSTEM_PROMPT = "You are a support agent."
MODEL = "sim-fast"
PARAMETERS = {"temperature": 0.2, "max_tokens": 64}


class FloorServicer(sidecar_pb2_grpc.SidecarServicer):  # type: ignore[misc]
    """OpenSession and Chat only; every other method is grpc's UNIMPLEMENTED."""

    def __init__(self, upstream: str) -> None:
        self._url = upstream.rstrip("/") + "/chat/completions"
        self._http: aiohttp.ClientSession | None = None
        self.ok = 0
        self.errors = 0

    async def start(self) -> None:
        # one pooled session for every call, unlimited connections, as a proxy would hold
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def OpenSession(
        self, request: sidecar_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> sidecar_pb2.OpenSessionResponse:
        return sidecar_pb2.OpenSessionResponse(session_id=uuid.uuid4().hex, version_id="floor")

    async def Chat(
        self, request: sidecar_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> sidecar_pb2.ChatResponse:
        assert self._http is not None
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        messages += [{"role": m.role, "content": m.content} for m in request.messages]
        body = {"model": MODEL, "messages": messages, **PARAMETERS}
        try:
            async with self._http.post(self._url, json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"upstream answered HTTP {response.status}")
                data: dict[str, Any] = json.loads(await response.read())
        except (aiohttp.ClientError, RuntimeError, ValueError) as exc:
            self.errors += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"upstream failed: {exc}")
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        self.ok += 1
        return sidecar_pb2.ChatResponse(
            message=common_pb2.ChatMessage(role="assistant", content=choice["message"].get("content") or ""),
            finish_reason=choice.get("finish_reason") or "",
            usage=common_pb2.Usage(
                input_tokens=usage.get("prompt_tokens", 0), output_tokens=usage.get("completion_tokens", 0)
            ),
            version_id="floor",
            response_id=data.get("id", ""),
            model=data.get("model", ""),
        )

    async def GetVersion(
        self, request: sidecar_pb2.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> sidecar_pb2.VersionInfo:
        return sidecar_pb2.VersionInfo(version_id="floor", name=f"ok={self.ok} errors={self.errors}")


async def serve(listen: str, upstream: str) -> None:
    servicer = FloorServicer(upstream)
    await servicer.start()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])  # a taken port fails, as the sidecar's
    sidecar_pb2_grpc.add_SidecarServicer_to_server(servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"floor server: cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"floor server listening on {listen}", flush=True)
    await stop.wait()
    await server.stop(1.0)
    await servicer.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.floor_server", description=__doc__)
    parser.add_argument("--listen", required=True, help="host:port to serve gRPC on")
    parser.add_argument("--upstream", required=True, help="OpenAI-compatible base URL (…/v1)")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.upstream))


if __name__ == "__main__":
    main()
