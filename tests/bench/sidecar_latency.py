"""Added latency of the sidecar per unary Chat, against calling the provider directly.

The simulated provider (zero latency) and the sidecar run as their own processes, with
telemetry flowing to the embedded broker, as in production. The same client process
alternates blocks of direct HTTP calls and sidecar gRPC calls, so every path sees the same
machine noise; the figures are medians and p99 over every call of each path.

    scripts/bench sidecar-latency [--calls 2000] [--block 100]

`run_paths` is shared with `sidecar_telemetry`, which compares two sidecar variants.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml

from devstack.broker import EmbeddedBroker, free_port
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.support import Proc, wait_serving

SYSTEM_PROMPT = "You are a support agent."
PARAMETERS = {"temperature": 0.2, "max_tokens": 64}
USER_TEXT = "Where is my order 1234?"
WARMUP_CALLS = 200

Call = Callable[[], Awaitable[float]]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(name: str, samples_ms: list[float]) -> dict[str, Any]:
    return {
        "path": name,
        "calls": len(samples_ms),
        "median_ms": statistics.median(samples_ms),
        "p99_ms": _percentile(samples_ms, 0.99),
    }


def _sidecar_yaml(path: Path, port: int, base_url: str, kafka: str, telemetry: dict[str, Any]) -> None:
    config = {
        "agent": "bench-bot",
        "stable": "v1",
        "listen": f"127.0.0.1:{port}",
        "metrics_port": None,
        "kafka": {"bootstrap_servers": kafka},
        "telemetry": telemetry,
        "versions": {
            "v1": {
                "provider": {"name": "openai", "base_url": base_url},
                "model": "sim-fast",
                "system_prompt": SYSTEM_PROMPT,
                "parameters": PARAMETERS,
            }
        },
    }
    path.write_text(yaml.safe_dump(config))


async def run_paths(
    calls: int, block: int, workdir: Path, sidecars: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Start the simulated provider and one sidecar process per entry of `sidecars` (name ->
    its `telemetry` settings), then time `calls` Chats on each path: "direct" and every
    sidecar, in alternating blocks. Returns each path's summary."""
    sim_port = free_port()
    sim_yaml = workdir / "sim.yaml"
    sim_yaml.write_text(yaml.safe_dump({"models": {"sim-fast": {"latency_ms": 0}}}))
    base_url = f"http://127.0.0.1:{sim_port}/v1"
    log = ("--log-level", "WARNING")
    async with EmbeddedBroker() as broker:
        procs = [
            Proc(*log, "simprovider", "--listen", f"127.0.0.1:{sim_port}", "--config", str(sim_yaml),
                 log_path=workdir / "sim.log"),
        ]  # fmt: skip
        addresses: dict[str, str] = {}
        try:
            for name, telemetry in sidecars.items():
                port = free_port()
                config = workdir / f"{name}.yaml"
                _sidecar_yaml(config, port, base_url, broker.bootstrap_servers, telemetry)
                procs.append(Proc(*log, "sidecar", "--config", str(config), log_path=workdir / f"{name}.log"))
                addresses[name] = f"127.0.0.1:{port}"
                await wait_serving(addresses[name], procs[-1])
            return await _measure(calls, block, base_url, addresses)
        finally:
            for proc in reversed(procs):
                proc.stop()


async def _measure(
    calls: int, block: int, base_url: str, sidecars: dict[str, str]
) -> dict[str, dict[str, Any]]:
    body = {
        "model": "sim-fast",
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": USER_TEXT}],
        **PARAMETERS,
    }
    channels = [grpc.aio.insecure_channel(address) for address in sidecars.values()]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:

            async def one_direct() -> float:
                start = time.perf_counter()
                async with http.post(f"{base_url}/chat/completions", json=body) as response:
                    response.raise_for_status()
                    await response.json()
                return (time.perf_counter() - start) * 1000

            paths: dict[str, Call] = {"direct": one_direct}
            for name, channel in zip(sidecars, channels, strict=True):
                paths[name] = await _chat_call(channel)
            for _ in range(WARMUP_CALLS):  # warm every path: connections, caches
                for one in paths.values():
                    await one()
            samples: dict[str, list[float]] = {name: [] for name in paths}
            while len(samples["direct"]) < calls:
                for name, one in paths.items():
                    for _ in range(block):
                        samples[name].append(await one())
    finally:
        for channel in channels:
            await channel.close(None)
    return {name: summarize(name, values) for name, values in samples.items()}


async def _chat_call(channel: grpc.aio.Channel) -> Call:
    stub = sidecar_pb2_grpc.SidecarStub(channel)
    session = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="bench"))
    request = sidecar_pb2.ChatRequest(
        session_id=session.session_id, messages=[common_pb2.ChatMessage(role="user", content=USER_TEXT)]
    )

    async def one() -> float:
        start = time.perf_counter()
        await stub.Chat(request, timeout=10)
        return (time.perf_counter() - start) * 1000

    return one


async def run(calls: int, block: int, workdir: Path) -> dict[str, object]:
    paths = await run_paths(calls, block, workdir, {"sidecar": {"spill_dir": str(workdir / "spill")}})
    d, s = paths["direct"], paths["sidecar"]
    return {
        "direct": d,
        "sidecar": s,
        "added_median_ms": s["median_ms"] - d["median_ms"],
        "added_p99_ms": s["p99_ms"] - d["p99_ms"],
        "ratio_median": s["median_ms"] / d["median_ms"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench sidecar-latency", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per path (default 2000)")
    parser.add_argument("--block", type=int, default=100, help="calls per alternating block")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args.calls, args.block, Path(tmp)))
    print(json.dumps(result, indent=2))
