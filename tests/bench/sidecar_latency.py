"""Added latency of the sidecar per unary Chat, against calling the provider directly.

The simulated provider (zero latency) and the sidecar run as their own processes, with
telemetry flowing to the embedded broker, as in production. The same client process
alternates blocks of direct HTTP calls and sidecar gRPC calls, so both paths see the same
machine noise; the figures are medians and p99 over every call of each path.

    scripts/bench sidecar-latency [--calls 2000] [--block 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
import yaml

from devstack.broker import EmbeddedBroker, free_port
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.support import Proc, wait_serving

SYSTEM_PROMPT = "You are a support agent."
PARAMETERS = {"temperature": 0.2, "max_tokens": 64}
USER_TEXT = "Where is my order 1234?"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(name: str, samples_ms: list[float]) -> dict[str, float]:
    return {
        "path": name,
        "calls": len(samples_ms),
        "median_ms": statistics.median(samples_ms),  # type: ignore[dict-item]
        "p99_ms": _percentile(samples_ms, 0.99),
    }


async def run(calls: int, block: int, workdir: Path) -> dict[str, object]:
    sim_port, sidecar_port = free_port(), free_port()
    sim_yaml = workdir / "sim.yaml"
    sim_yaml.write_text(yaml.safe_dump({"models": {"sim-fast": {"latency_ms": 0}}}))
    base_url = f"http://127.0.0.1:{sim_port}/v1"
    async with EmbeddedBroker() as broker:
        sidecar_yaml = workdir / "sidecar.yaml"
        sidecar_yaml.write_text(
            yaml.safe_dump(
                {
                    "agent": "bench-bot",
                    "stable": "v1",
                    "listen": f"127.0.0.1:{sidecar_port}",
                    "metrics_port": None,
                    "kafka": {"bootstrap_servers": broker.bootstrap_servers},
                    "versions": {
                        "v1": {
                            "provider": {"name": "openai", "base_url": base_url},
                            "model": "sim-fast",
                            "system_prompt": SYSTEM_PROMPT,
                            "parameters": PARAMETERS,
                        }
                    },
                }
            )
        )
        sim = Proc(
            "--log-level",
            "WARNING",
            "simprovider",
            "--listen",
            f"127.0.0.1:{sim_port}",
            "--config",
            str(sim_yaml),
            log_path=workdir / "sim.log",
        )
        sidecar = Proc(
            "--log-level",
            "WARNING",
            "sidecar",
            "--config",
            str(sidecar_yaml),
            log_path=workdir / "sidecar.log",
        )
        try:
            await wait_serving(f"127.0.0.1:{sidecar_port}", sidecar)
            return await _measure(calls, block, base_url, f"127.0.0.1:{sidecar_port}")
        finally:
            sidecar.stop()
            sim.stop()


async def _measure(calls: int, block: int, base_url: str, sidecar_addr: str) -> dict[str, object]:
    body = {
        "model": "sim-fast",
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": USER_TEXT}],
        **PARAMETERS,
    }
    direct: list[float] = []
    via_sidecar: list[float] = []
    connector = aiohttp.TCPConnector(limit=1)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        grpc.aio.insecure_channel(sidecar_addr) as channel,
    ):
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        session = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="bench"))
        request = sidecar_pb2.ChatRequest(
            session_id=session.session_id, messages=[common_pb2.ChatMessage(role="user", content=USER_TEXT)]
        )

        async def one_direct() -> float:
            start = time.perf_counter()
            async with http.post(f"{base_url}/chat/completions", json=body) as response:
                response.raise_for_status()
                await response.json()
            return (time.perf_counter() - start) * 1000

        async def one_sidecar() -> float:
            start = time.perf_counter()
            await stub.Chat(request, timeout=10)
            return (time.perf_counter() - start) * 1000

        for _ in range(200):  # warm both paths: connections, caches
            await one_direct()
            await one_sidecar()
        while len(direct) < calls:
            for _ in range(block):
                direct.append(await one_direct())
            for _ in range(block):
                via_sidecar.append(await one_sidecar())
    d, s = summarize("direct", direct), summarize("sidecar", via_sidecar)
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
