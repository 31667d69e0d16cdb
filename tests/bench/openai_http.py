"""Added latency of the sidecar's OpenAI-compatible endpoint against its gRPC Chat, in one run.

The simulated provider (zero latency) and one sidecar with `openai_http:` on run as their own
processes, telemetry to the embedded broker. One client process alternates blocks of gRPC
Chat, raw HTTP chat completions (aiohttp, one kept-alive connection) and the openai SDK
(AsyncOpenAI), all on one session, so every path sees the same machine noise.

    scripts/bench openai-http [--calls 1000] [--block 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import yaml

from devstack.broker import EmbeddedBroker, free_port
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.bench.sidecar_latency import USER_TEXT, WARMUP_CALLS, Call, _sidecar_yaml, summarize
from tests.support import Proc, wait_serving

PORT_WAIT_S = 20.0


async def _wait_port(port: int) -> None:
    deadline = time.monotonic() + PORT_WAIT_S
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"openai_http did not listen on {port}") from None
            await asyncio.sleep(0.1)
        else:
            writer.close()
            await writer.wait_closed()
            return


async def _measure(calls: int, block: int, address: str, http_base: str) -> dict[str, dict[str, Any]]:
    messages = [{"role": "user", "content": USER_TEXT}]
    async with (
        grpc.aio.insecure_channel(address) as channel,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), trust_env=False) as http,
        openai.AsyncOpenAI(
            base_url=http_base,
            api_key="unused",
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
        ) as sdk,
    ):
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        token = (await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="bench"))).session_id
        request = sidecar_pb2.ChatRequest(
            session_id=token, messages=[common_pb2.ChatMessage(role="user", content=USER_TEXT)]
        )
        headers = {"x-outrider-session": token}

        async def one_grpc() -> float:
            start = time.perf_counter()
            await stub.Chat(request, timeout=10)
            return (time.perf_counter() - start) * 1000

        async def one_http() -> float:
            start = time.perf_counter()
            body = {"model": "m", "messages": messages}
            async with http.post(f"{http_base}/chat/completions", json=body, headers=headers) as response:
                response.raise_for_status()
                await response.json()
            return (time.perf_counter() - start) * 1000

        async def one_sdk() -> float:
            start = time.perf_counter()
            await sdk.chat.completions.create(model="m", messages=messages, extra_headers=headers)  # type: ignore[arg-type]
            return (time.perf_counter() - start) * 1000

        paths: dict[str, Call] = {"grpc": one_grpc, "http": one_http, "openai_sdk": one_sdk}
        for _ in range(WARMUP_CALLS):
            for one in paths.values():
                await one()
        samples: dict[str, list[float]] = {name: [] for name in paths}
        while len(samples["grpc"]) < calls:
            for name, one in paths.items():
                for _ in range(block):
                    samples[name].append(await one())
    return {name: summarize(name, values) for name, values in samples.items()}


async def run(calls: int, block: int, workdir: Path) -> dict[str, object]:
    sim_port, grpc_port, http_port = free_port(), free_port(), free_port()
    sim_yaml = workdir / "sim.yaml"
    sim_yaml.write_text(yaml.safe_dump({"models": {"sim-fast": {"latency_ms": 0}}}))
    base_url = f"http://127.0.0.1:{sim_port}/v1"
    log = ("--log-level", "WARNING")
    async with EmbeddedBroker() as broker:
        config = workdir / "sidecar.yaml"
        _sidecar_yaml(
            config, grpc_port, base_url, broker.bootstrap_servers, {"spill_dir": str(workdir / "spill")}
        )
        data = yaml.safe_load(config.read_text())
        data["openai_http"] = {"listen": f"127.0.0.1:{http_port}"}
        config.write_text(yaml.safe_dump(data))
        procs = [
            Proc(*log, "simprovider", "--listen", f"127.0.0.1:{sim_port}", "--config", str(sim_yaml),
                 log_path=workdir / "sim.log"),
        ]  # fmt: skip
        try:
            procs.append(Proc(*log, "sidecar", "--config", str(config), log_path=workdir / "sidecar.log"))
            address = f"127.0.0.1:{grpc_port}"
            await wait_serving(address, procs[-1])
            await _wait_port(http_port)
            paths = await _measure(calls, block, address, f"http://127.0.0.1:{http_port}/v1")
        finally:
            for proc in reversed(procs):
                proc.stop()
    g, h, s = paths["grpc"], paths["http"], paths["openai_sdk"]
    return {
        **paths,
        "http_added_median_ms": h["median_ms"] - g["median_ms"],
        "http_added_p99_ms": h["p99_ms"] - g["p99_ms"],
        "openai_sdk_added_median_ms": s["median_ms"] - g["median_ms"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench openai-http", description=__doc__)
    parser.add_argument("--calls", type=int, default=1000, help="calls per path (default 1000)")
    parser.add_argument("--block", type=int, default=100, help="calls per alternating block")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args.calls, args.block, Path(tmp)))
    print(json.dumps(result, indent=2))
