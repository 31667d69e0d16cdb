"""What telemetry (events and spans to Kafka, with the spill ready) adds to a unary Chat.

Two sidecar processes serve the same version from the same simulated provider (zero
latency): one with telemetry on (events and spans to the embedded broker, spill directory
open), one with `telemetry.enabled: false`. One client process alternates blocks of calls:
direct to the provider, through the telemetry-on sidecar, through the telemetry-off one, so
all three paths see the same machine noise. Figures are medians and p99 over every call of
each path; the added latency of a sidecar is its figure minus the direct one.

    scripts/bench sidecar-telemetry [--calls 2000] [--block 100]
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
import yaml

from devstack.broker import EmbeddedBroker, free_port
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.bench.sidecar_latency import PARAMETERS, SYSTEM_PROMPT, USER_TEXT, summarize
from tests.support import Proc, wait_serving


def _sidecar_yaml(path: Path, port: int, base_url: str, kafka: str, telemetry: dict[str, Any]) -> None:
    path.write_text(
        yaml.safe_dump(
            {
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
        )
    )


async def run(calls: int, block: int, workdir: Path) -> dict[str, object]:
    sim_port, on_port, off_port = free_port(), free_port(), free_port()
    sim_yaml = workdir / "sim.yaml"
    sim_yaml.write_text(yaml.safe_dump({"models": {"sim-fast": {"latency_ms": 0}}}))
    base_url = f"http://127.0.0.1:{sim_port}/v1"
    async with EmbeddedBroker() as broker:
        on_yaml, off_yaml = workdir / "on.yaml", workdir / "off.yaml"
        _sidecar_yaml(
            on_yaml, on_port, base_url, broker.bootstrap_servers, {"spill_dir": str(workdir / "spill")}
        )
        _sidecar_yaml(off_yaml, off_port, base_url, broker.bootstrap_servers, {"enabled": False})
        procs = [
            Proc(
                "--log-level",
                "WARNING",
                "simprovider",
                "--listen",
                f"127.0.0.1:{sim_port}",
                "--config",
                str(sim_yaml),
                log_path=workdir / "sim.log",
            ),
            Proc("--log-level", "WARNING", "sidecar", "--config", str(on_yaml), log_path=workdir / "on.log"),
            Proc(
                "--log-level", "WARNING", "sidecar", "--config", str(off_yaml), log_path=workdir / "off.log"
            ),
        ]
        try:
            await wait_serving(f"127.0.0.1:{on_port}", procs[1])
            await wait_serving(f"127.0.0.1:{off_port}", procs[2])
            return await _measure(calls, block, base_url, f"127.0.0.1:{on_port}", f"127.0.0.1:{off_port}")
        finally:
            for proc in reversed(procs):
                proc.stop()


async def _measure(calls: int, block: int, base_url: str, on_addr: str, off_addr: str) -> dict[str, object]:
    body = {
        "model": "sim-fast",
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": USER_TEXT}],
        **PARAMETERS,
    }
    samples: dict[str, list[float]] = {"direct": [], "telemetry_on": [], "telemetry_off": []}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http,
        grpc.aio.insecure_channel(on_addr) as on_channel,
        grpc.aio.insecure_channel(off_addr) as off_channel,
    ):

        async def chat_call(channel: grpc.aio.Channel) -> Any:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            session = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="bench"))
            request = sidecar_pb2.ChatRequest(
                session_id=session.session_id,
                messages=[common_pb2.ChatMessage(role="user", content=USER_TEXT)],
            )

            async def one() -> float:
                start = time.perf_counter()
                await stub.Chat(request, timeout=10)
                return (time.perf_counter() - start) * 1000

            return one

        async def one_direct() -> float:
            start = time.perf_counter()
            async with http.post(f"{base_url}/chat/completions", json=body) as response:
                response.raise_for_status()
                await response.json()
            return (time.perf_counter() - start) * 1000

        paths = {
            "direct": one_direct,
            "telemetry_on": await chat_call(on_channel),
            "telemetry_off": await chat_call(off_channel),
        }
        for _ in range(200):  # warm every path: connections, caches
            for one in paths.values():
                await one()
        while len(samples["direct"]) < calls:
            for name, one in paths.items():
                for _ in range(block):
                    samples[name].append(await one())
    d, on, off = (summarize(name, values) for name, values in samples.items())
    return {
        "direct": d,
        "telemetry_on": on,
        "telemetry_off": off,
        "added_median_ms": {
            "telemetry_on": on["median_ms"] - d["median_ms"],
            "telemetry_off": off["median_ms"] - d["median_ms"],
        },
        "added_p99_ms": {
            "telemetry_on": on["p99_ms"] - d["p99_ms"],
            "telemetry_off": off["p99_ms"] - d["p99_ms"],
        },
        "telemetry_cost_median_ms": on["median_ms"] - off["median_ms"],
        "telemetry_cost_p99_ms": on["p99_ms"] - off["p99_ms"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench sidecar-telemetry", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per path (default 2000)")
    parser.add_argument("--block", type=int, default=100, help="calls per alternating block")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args.calls, args.block, Path(tmp)))
    print(json.dumps(result, indent=2))
