# ruff: noqa: ASYNC110, SIM117
"""Resilience measurements for the closing note (run: `scripts/bench resilience [--calls N]`).

1. Primary answering 50 % 5xx, a healthy fallback: the success rate the agent sees and the
   retry amplification (upstream attempts per agent call, from the sim's counters).
2. Outage to breaker open: the primary starts refusing every call (permanent 503); time
   until its breaker reports OPEN.
3. Added latency per Chat with every protection on (guards, quotas, prices, fallback,
   breaker, retries) against the plain skeleton config, alternating blocks in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import grpc

from devstack.broker import free_port
from devstack.simprovider import Fault, ModelBehavior, SimProvider
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from sidecar._config import parse_config
from sidecar.resilience._breaker import BreakerState

USER = [common_pb2.ChatMessage(role="user", content="Where is my order?")]


def _config(
    sim: SimProvider, *, protected: bool, primary: str = "primary", breaker: dict[str, Any] | None = None
) -> Any:
    version: dict[str, Any] = {
        "provider": {"name": "openai", "base_url": sim.base_url},
        "model": primary,
        "parameters": {"max_tokens": 64},
    }
    top: dict[str, Any] = {}
    if protected:
        version["resilience"] = {"retry": {"max_attempts": 3, "base": "5ms", "cap": "50ms"}}
        if breaker is not None:
            version["resilience"]["breaker"] = breaker
        version["fallback"] = [
            {"provider": {"name": "openai", "base_url": sim.base_url}, "model": "light"},
            {"static_response": "Sorry, try again later."},
        ]
        version["guards"] = [
            {"guard": "prompt_injection", "action": "block"},
            {"guard": "pii", "action": "redact"},
        ]
        version["prices"] = {primary: {"input_per_mtok": 2.0, "output_per_mtok": 8.0}}
        top = {
            "user_quotas": {"tokens_per_minute": 1e12, "requests_per_minute": 1e12},
            "global_quotas": {f"openai/{primary}": {"safe_share_tpm": 1e12}},
        }
    data = {
        "agent": "bench",
        "stable": "v1",
        "listen": "127.0.0.1:0",
        "metrics_port": None,
        "kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}"},
        # Kafka is unreachable on purpose: no spill, so nothing lands in the working directory
        "telemetry": {"spill_dir": None},
        "versions": {"v1": version},
        **top,
    }
    return parse_config(data, source="bench").load_secrets({})


async def _session(stub: sidecar_pb2_grpc.SidecarStub) -> str:
    return str((await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="u"))).session_id)


# A breaker that tolerates the 50 % failure rate, so retries (not the fallback) do the work.
TOLERANT_BREAKER = {"consecutive_failures": 50, "failure_rate": 0.95, "min_requests": 20}


async def success_and_amplification(calls: int, breaker: dict[str, Any] | None = None) -> dict[str, float]:
    models = {"primary": ModelBehavior(error_rate=0.5, error_status=503), "light": ModelBehavior()}
    async with SimProvider(models, seed=7) as sim:
        cfg = _config(sim, protected=True, breaker=breaker)
        async with Sidecar(cfg) as sidecar, grpc.aio.insecure_channel(sidecar.address) as ch:
            stub = sidecar_pb2_grpc.SidecarStub(ch)
            sid = await _session(stub)
            ok = degraded = 0
            for _ in range(calls):
                try:
                    reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
                except grpc.aio.AioRpcError:
                    continue
                ok += 1
                degraded += reply.degraded
        attempts = sim.requests("primary") + sim.requests("light")
    return {
        "primary_attempts": sim.requests("primary"),
        "agent_calls": calls,
        "success_rate": ok / calls,
        "degraded_rate": degraded / calls,
        "upstream_attempts": attempts,
        "amplification": attempts / calls,
    }


async def outage_to_open(concurrency: int = 4) -> dict[str, float]:
    async with SimProvider({"primary": ModelBehavior(), "light": ModelBehavior()}, seed=7) as sim:
        cfg = _config(sim, protected=True)
        async with Sidecar(cfg) as sidecar, grpc.aio.insecure_channel(sidecar.address) as ch:
            stub = sidecar_pb2_grpc.SidecarStub(ch)
            sid = await _session(stub)
            request = sidecar_pb2.ChatRequest(session_id=sid, messages=USER)
            await stub.Chat(request)
            sim.script("primary", Fault.http_error(503, times=None))
            start = time.perf_counter()
            opened = 0.0

            async def caller() -> None:
                while not opened:
                    await stub.Chat(request)

            tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
            while sidecar.upstreams.state("provider:openai/primary") is not BreakerState.OPEN:
                await asyncio.sleep(0.0005)
            opened = time.perf_counter() - start
            await asyncio.gather(*tasks)
    return {"outage_to_open_ms": opened * 1000.0, "concurrency": concurrency}


async def added_latency(calls: int, block: int) -> dict[str, float]:
    async with SimProvider({"primary": ModelBehavior(), "light": ModelBehavior()}, seed=7) as sim:
        plain = _config(sim, protected=False)
        full = _config(sim, protected=True)
        async with Sidecar(plain) as a, Sidecar(full) as b:
            async with grpc.aio.insecure_channel(a.address) as ca, grpc.aio.insecure_channel(b.address) as cb:
                stubs = {
                    "plain": sidecar_pb2_grpc.SidecarStub(ca),
                    "protected": sidecar_pb2_grpc.SidecarStub(cb),
                }
                sids = {k: await _session(s) for k, s in stubs.items()}
                samples: dict[str, list[float]] = {"plain": [], "protected": []}
                for name in stubs:  # warm-up
                    for _ in range(50):
                        await stubs[name].Chat(sidecar_pb2.ChatRequest(session_id=sids[name], messages=USER))
                done = 0
                while done < calls:
                    for name in ("plain", "protected"):
                        for _ in range(block):
                            t0 = time.perf_counter()
                            await stubs[name].Chat(
                                sidecar_pb2.ChatRequest(session_id=sids[name], messages=USER)
                            )
                            samples[name].append((time.perf_counter() - t0) * 1000.0)
                    done += block

    def p(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    out: dict[str, float] = {}
    for name, values in samples.items():
        out[f"{name}_median_ms"] = statistics.median(values)
        out[f"{name}_p99_ms"] = p(values, 0.99)
    out["added_median_ms"] = out["protected_median_ms"] - out["plain_median_ms"]
    out["added_p99_ms"] = out["protected_p99_ms"] - out["plain_p99_ms"]
    return out


async def run(calls: int, block: int) -> dict[str, object]:
    return {
        "fifty_percent_5xx_default_breaker": await success_and_amplification(calls),
        "fifty_percent_5xx_tolerant_breaker": await success_and_amplification(calls, TOLERANT_BREAKER),
        "outage_to_breaker_open": await outage_to_open(),
        "added_latency_per_chat": await added_latency(calls, block),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench resilience")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--block", type=int, default=50)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.calls, args.block)), indent=2))
