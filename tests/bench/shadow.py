"""Shadow mode's cost on the user's path, and how much mirrored work the sidecar sustains.

The simulated provider (zero latency), the embedded broker and the sidecar run as their own
processes on 127.0.0.1. The sidecar serves two versions on the provider: stable `v1`
(sim-fast) and candidate `v2` (sim-divergent). It is put into the shadow phase the way
production does it: a signed RolloutState (phase SHADOW, `shadow_sample`) on the control
topic. Mirroring "off" is the same rollout with `shadow_sample` 0, "on" is 1.0 (every stable
session mirrored); each switch is a new generation, and a block starts only once the
sidecar's `outrider_sidecar_rollout_generation` shows it and its shadow queue is empty.

1. latency: unary Chat at c=1, calls at least `--gap-ms` apart, the two settings in
   alternating blocks of `--block` calls: median and p95 of each, the median delta and ratio
   (the issue's target: on - off within +0.2 ms);
2. saturation: `--concurrency` clients without pause, alternating blocks of `--seconds`
   (the default `shadow:` settings shed mirrored work while the loop is busy, `max_busy`):
   calls/s at each setting and the shadow counters of the "on" blocks (mirrored by outcome,
   dropped by reason) with the default `shadow:` settings (queue 64, 4 workers); and again
   (`saturation_slow_candidate`) with the candidate taking 50 ms, where 4 workers mirror at
   most 80 calls/s and the rest must be dropped (and counted), not slow the user;
3. capacity: a second sidecar with `shadow.queue_size` 100000, `shadow.concurrency` 64 and
   no shedding for a busy loop (`shadow.max_busy` 1) at 100% under the same load: mirrored ok
   calls per second during the window (and with the queue left at its end drained).

    scripts/bench shadow [--calls 1000] [--block 100] [--seconds 5] [--concurrency 16]
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
from aiokafka import AIOKafkaProducer

import outrider
from devstack.broker import EmbeddedBroker, free_port
from outrider.v1 import common_pb2, control_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import load_config
from tests.support import TEST_SIGNER, Proc, scrape, signed_control, wait_serving

AGENT = "bench-shadow"
ROLLOUT_ID = "bench-shadow-rollout"
STABLE, CANDIDATE = "v1", "v2"
SYSTEM_PROMPT = "You are a support agent."
PARAMETERS = {"temperature": 0.2, "max_tokens": 64}
USER_TEXT = "Where is my order 1234?"
WARMUP_CALLS = 200
SATURATION_ROUNDS = 3  # blocks of each setting at saturation
SLOW_CANDIDATE_MS, SLOW_ROUNDS = 50, 2  # the saturation run again, with a slow candidate
CAPACITY_QUEUE, CAPACITY_CONCURRENCY = 100_000, 64
# the capacity sidecar: room for every mirror, and no shedding for a busy loop (`max_busy` 1),
# so what it measures is how many mirrored calls the sidecar can run, not how many it chose to
WIDE = {"queue_size": CAPACITY_QUEUE, "concurrency": CAPACITY_CONCURRENCY, "max_busy": 1.0}
APPLY_TIMEOUT_S = 20.0
DRAIN_TIMEOUT_S = 30.0
DEPTH_EVERY_S = 0.5  # how often the shadow queue depth is sampled at saturation
TARGET_DELTA_MS = 0.2  # the issue: mirroring adds at most this to the median user call at c=1
OFF, ON = "off", "on"
SAMPLES = {OFF: 0.0, ON: 1.0}

Samples = list[tuple[str, dict[str, str], float]]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _sidecar_yaml(
    path: Path, ports: tuple[int, int], base_url: str, kafka: str, workdir: Path, shadow: dict[str, Any]
) -> None:
    port, metrics_port = ports
    version = {
        "provider": {"name": "openai", "base_url": base_url},
        "system_prompt": SYSTEM_PROMPT,
        "parameters": PARAMETERS,
    }
    config = {
        "agent": AGENT,
        "stable": STABLE,
        "listen": f"127.0.0.1:{port}",
        "metrics_host": "127.0.0.1",
        "metrics_port": metrics_port,
        "kafka": {"bootstrap_servers": kafka},
        "telemetry": {"spill_dir": str(workdir / f"spill-{port}")},
        "control": {"public_keys": [TEST_SIGNER.public_text()], "state_file": None},
        "shadow": shadow,
        "versions": {
            STABLE: {**version, "model": "sim-fast"},
            CANDIDATE: {**version, "model": "sim-divergent"},
        },
    }
    path.write_text(yaml.safe_dump(config))


class Control:
    """Publishes this bench's shadow RolloutState, one generation per change."""

    def __init__(self, producer: AIOKafkaProducer, version_ids: dict[str, str]) -> None:
        self._producer = producer
        self._stable, self._candidate = version_ids[STABLE], version_ids[CANDIDATE]  # content ids
        self.generation = 0

    async def publish(self, sample: float) -> int:
        self.generation += 1
        state = control_pb2.RolloutState(
            agent=AGENT,
            generation=self.generation,
            rollout_id=ROLLOUT_ID,
            stable_version_id=self._stable,
            candidate_version_id=self._candidate,
            phase=control_pb2.ROLLOUT_PHASE_SHADOW,
            shadow_sample=sample,
            decided_by="bench",
            decided_at_unix_nano=time.time_ns(),
        )
        key, value, headers = signed_control(control_pb2.ControlMessage(rollout=state))
        await self._producer.send_and_wait(outrider.CONTROL_TOPIC, value, key=key, headers=headers)
        return self.generation


class BenchSidecar:
    """One sidecar process: its gRPC stub, its metrics, and switching its shadow sample."""

    def __init__(
        self, proc: Proc, address: str, metrics_url: str, control: Control, http: aiohttp.ClientSession
    ) -> None:
        self.proc, self.address, self.metrics_url = proc, address, metrics_url
        self._control, self._http = control, http
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = sidecar_pb2_grpc.SidecarStub(self.channel)

    async def metrics(self) -> Samples:
        return await scrape(self._http, self.metrics_url)

    async def shadow_counters(self) -> dict[str, float]:
        """outrider_sidecar_shadow_calls_total by outcome and _dropped_total by reason, as
        "calls.<outcome>" and "dropped.<reason>"."""
        out: dict[str, float] = {}
        for name, labels, value in await self.metrics():
            if name == "outrider_sidecar_shadow_calls_total":
                out["calls." + labels["outcome"]] = value
            elif name == "outrider_sidecar_shadow_dropped_total":
                out["dropped." + labels["reason"]] = value
        return out

    async def _gauge(self, name: str, **labels: str) -> float | None:
        for sample_name, sample_labels, value in await self.metrics():
            if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
                return value
        return None

    async def queue_depth(self) -> float:
        return await self._gauge("outrider_sidecar_shadow_queue_depth") or 0.0

    async def set_sample(self, sample: float, *, drain: bool = True) -> None:
        """Publish a new generation with `sample`; return once the sidecar applied it and (with
        `drain`) its shadow queue is empty."""
        generation = await self._control.publish(sample)
        deadline = time.monotonic() + APPLY_TIMEOUT_S
        while (await self._gauge("outrider_sidecar_rollout_generation", agent=AGENT) or 0) < generation:
            if time.monotonic() > deadline:
                raise AssertionError(f"generation {generation} not applied after {APPLY_TIMEOUT_S}s")
            await asyncio.sleep(0.02)
        if drain:
            await self.drain(APPLY_TIMEOUT_S)

    async def drain(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while await self.queue_depth() > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def chat_call(self) -> Callable[[], Awaitable[float]]:
        """A new session's unary Chat, timed in ms."""
        session = await self.stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="bench"))
        request = sidecar_pb2.ChatRequest(
            session_id=session.session_id,
            messages=[common_pb2.ChatMessage(role="user", content=USER_TEXT)],
        )

        async def one() -> float:
            start = time.perf_counter()
            await self.stub.Chat(request, timeout=10)
            return (time.perf_counter() - start) * 1000

        return one


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def _add(total: dict[str, float], more: dict[str, float]) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0.0) + v


async def latency(sidecar: BenchSidecar, calls: int, block: int, gap_s: float) -> dict[str, Any]:
    """c=1, calls `gap_s` apart, OFF and ON in alternating blocks."""
    one = await sidecar.chat_call()
    for setting in (ON, OFF):  # warm both paths (the candidate's connection too)
        await sidecar.set_sample(SAMPLES[setting])
        for _ in range(WARMUP_CALLS // 2):
            await one()
            await asyncio.sleep(gap_s)
    samples: dict[str, list[float]] = {OFF: [], ON: []}
    counters: dict[str, dict[str, float]] = {OFF: {}, ON: {}}
    while len(samples[ON]) < calls:
        for setting in (OFF, ON):
            await sidecar.set_sample(SAMPLES[setting])
            before = await sidecar.shadow_counters()
            for _ in range(min(block, calls - len(samples[setting]))):
                samples[setting].append(await one())
                await asyncio.sleep(gap_s)
            await sidecar.drain(APPLY_TIMEOUT_S)
            await asyncio.sleep(0.05)  # the last mirrored call may still be running
            _add(counters[setting], _delta(await sidecar.shadow_counters(), before))
    summary: dict[str, dict[str, Any]] = {
        setting: {
            "calls": len(values),
            "median_ms": statistics.median(values),
            "p95_ms": _percentile(values, 0.95),
            "p99_ms": _percentile(values, 0.99),
            "shadow": counters[setting],
        }
        for setting, values in samples.items()
    }
    off, on = summary[OFF], summary[ON]
    return {
        "concurrency": 1,
        "gap_ms": gap_s * 1000,
        OFF: off,
        ON: on,
        "delta_median_ms": on["median_ms"] - off["median_ms"],
        "delta_p95_ms": on["p95_ms"] - off["p95_ms"],
        "ratio_median": on["median_ms"] / off["median_ms"],
        "target_delta_median_ms": TARGET_DELTA_MS,
        "within_target": on["median_ms"] - off["median_ms"] <= TARGET_DELTA_MS,
    }


async def _load(calls: list[Callable[[], Awaitable[float]]], seconds: float) -> tuple[list[float], float]:
    """Every client calls without pause for `seconds`; (latencies, elapsed)."""
    latencies: list[float] = []
    start = time.perf_counter()
    stop_at = start + seconds

    async def client(one: Callable[[], Awaitable[float]]) -> None:
        while time.perf_counter() < stop_at:
            latencies.append(await one())

    await asyncio.gather(*(client(one) for one in calls))
    return latencies, time.perf_counter() - start


async def _depths(sidecar: BenchSidecar, seconds: float) -> float:
    """The deepest shadow queue seen, sampled every DEPTH_EVERY_S during `seconds`."""
    deepest = 0.0
    stop_at = time.monotonic() + seconds - DEPTH_EVERY_S
    while time.monotonic() < stop_at:
        await asyncio.sleep(DEPTH_EVERY_S)
        deepest = max(deepest, await sidecar.queue_depth())
    return deepest


def _throughput(latencies: list[float], elapsed: float) -> dict[str, Any]:
    return {
        "calls": len(latencies),
        "seconds": round(elapsed, 3),
        "calls_per_s": len(latencies) / elapsed,
        "median_ms": statistics.median(latencies),
        "p95_ms": _percentile(latencies, 0.95),
    }


async def saturation(sidecar: BenchSidecar, concurrency: int, seconds: float, rounds: int) -> dict[str, Any]:
    """`concurrency` clients without pause, OFF and ON in alternating blocks of `seconds`."""
    calls = [await sidecar.chat_call() for _ in range(concurrency)]
    await sidecar.set_sample(SAMPLES[OFF])
    await _load(calls, min(1.0, seconds))  # warm-up
    latencies: dict[str, list[float]] = {OFF: [], ON: []}
    elapsed: dict[str, float] = {OFF: 0.0, ON: 0.0}
    rates: dict[str, list[float]] = {OFF: [], ON: []}
    counters: dict[str, dict[str, float]] = {OFF: {}, ON: {}}
    max_depth = 0.0
    for _ in range(rounds):
        for setting in (OFF, ON):
            await sidecar.set_sample(SAMPLES[setting])
            before = await sidecar.shadow_counters()
            depths = asyncio.create_task(_depths(sidecar, seconds))
            try:
                block, took = await _load(calls, seconds)
                max_depth = max(max_depth, await depths)
            finally:
                if not depths.done():
                    depths.cancel()
                    await asyncio.gather(depths, return_exceptions=True)
            latencies[setting] += block
            elapsed[setting] += took
            rates[setting].append(len(block) / took)
            # what was mirrored and dropped during the block, not the queue drained after it
            _add(counters[setting], _delta(await sidecar.shadow_counters(), before))
    result: dict[str, Any] = {"concurrency": concurrency, "block_s": seconds, "rounds": rounds}
    for setting in (OFF, ON):
        result[setting] = {
            **_throughput(latencies[setting], elapsed[setting]),
            "block_calls_per_s": [round(r, 1) for r in rates[setting]],
            "shadow": counters[setting],
        }
    off, on = result[OFF], result[ON]
    on_shadow = on["shadow"]
    offered = on["calls"]  # every ON call was a mirror offered
    result["throughput_ratio"] = on["calls_per_s"] / off["calls_per_s"]
    # each ON block against the OFF block just before it: the pairs see the same machine
    result["throughput_ratio_median_of_rounds"] = statistics.median(
        b / a for a, b in zip(rates[OFF], rates[ON], strict=True)
    )
    result["median_ratio"] = on["median_ms"] / off["median_ms"]
    result["mirrored_share"] = on_shadow.get("calls.ok", 0.0) / offered if offered else 0.0
    result["dropped_share"] = on_shadow.get("dropped.queue_full", 0.0) / offered if offered else 0.0
    result["queue_depth_max"] = max_depth  # sampled every DEPTH_EVERY_S during the blocks
    return result


async def capacity(sidecar: BenchSidecar, concurrency: int, seconds: float) -> dict[str, Any]:
    """100% mirroring with a queue and worker pool big enough not to drop: mirrored calls/s."""
    calls = [await sidecar.chat_call() for _ in range(concurrency)]
    await sidecar.set_sample(SAMPLES[ON])
    await _load(calls, min(1.0, seconds))  # warm-up
    await sidecar.drain(DRAIN_TIMEOUT_S)
    await asyncio.sleep(0.2)
    before = await sidecar.shadow_counters()
    block, took = await _load(calls, seconds)
    during = _delta(await sidecar.shadow_counters(), before)
    depth = await sidecar.queue_depth()
    start = time.perf_counter()
    drained = await sidecar.drain(DRAIN_TIMEOUT_S)
    await asyncio.sleep(0.2)
    total = _delta(await sidecar.shadow_counters(), before)
    with_drain = took + (time.perf_counter() - start)
    return {
        "concurrency": concurrency,
        "queue_size": CAPACITY_QUEUE,
        "shadow_concurrency": CAPACITY_CONCURRENCY,
        "user": _throughput(block, took),
        "shadow_during": during,
        "mirrored_ok_per_s": during.get("calls.ok", 0.0) / took,
        "queue_depth_at_end": depth,
        "drained": drained,
        "shadow_with_drain": total,
        "mirrored_ok_per_s_with_drain": total.get("calls.ok", 0.0) / with_drain,
        # the workers kept up with every mirror offered (no queue left, nothing dropped): the
        # figure is then bounded by the user rate, a lower bound of what the sidecar sustains
        "lower_bound": depth == 0 and not any(k.startswith("dropped.") for k in during),
    }


async def _set_latency(http: aiohttp.ClientSession, sim_url: str, model: str, latency_ms: float) -> None:
    async with http.patch(f"{sim_url}/_sim/models/{model}", json={"latency_ms": latency_ms}) as response:
        response.raise_for_status()


async def run(
    calls: int, block: int, gap_ms: float, seconds: float, concurrency: int, workdir: Path
) -> dict[str, Any]:
    sim_port = free_port()
    sim_yaml = workdir / "sim.yaml"
    models = {"sim-fast": {"latency_ms": 0}, "sim-divergent": {"latency_ms": 0, "reply_style": "reworded"}}
    sim_yaml.write_text(yaml.safe_dump({"models": models}))
    sim_url = f"http://127.0.0.1:{sim_port}"
    base_url = f"{sim_url}/v1"
    log = ("--log-level", "WARNING")
    result: dict[str, Any] = {}
    async with EmbeddedBroker() as broker, aiohttp.ClientSession() as http:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
        await producer.start()
        sim = Proc(*log, "simprovider", "--listen", f"127.0.0.1:{sim_port}", "--config", str(sim_yaml),
                   log_path=workdir / "sim.log")  # fmt: skip
        try:
            configs: dict[str, tuple[Path, int, int]] = {}
            for name, shadow in (("sidecar", {}), ("wide", WIDE)):
                port, metrics_port = free_port(), free_port()
                configs[name] = (workdir / f"{name}.yaml", port, metrics_port)
                _sidecar_yaml(
                    configs[name][0],
                    (port, metrics_port),
                    base_url,
                    broker.bootstrap_servers,
                    workdir,
                    shadow,
                )
            # a RolloutState names versions by content id, the same in both configs
            version_ids = load_config(configs["sidecar"][0]).version_ids()
            assert load_config(configs["wide"][0]).version_ids() == version_ids
            control = Control(producer, version_ids)
            await control.publish(SAMPLES[OFF])  # a state to replay: the sidecar is ready at once

            async def start(name: str) -> BenchSidecar:
                config, port, metrics_port = configs[name]
                proc = Proc(*log, "sidecar", "--config", str(config), log_path=workdir / f"{name}.log")
                address = f"127.0.0.1:{port}"
                metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
                sidecar = BenchSidecar(proc, address, metrics_url, control, http)
                try:
                    await wait_serving(address, proc)
                except BaseException:
                    proc.stop()
                    raise
                return sidecar

            async def stop(sidecar: BenchSidecar) -> None:
                await sidecar.channel.close(None)
                sidecar.proc.stop()

            default = await start("sidecar")
            try:
                result["latency"] = await latency(default, calls, block, gap_ms / 1000)
                result["saturation"] = await saturation(default, concurrency, seconds, SATURATION_ROUNDS)
                # the same with a candidate that takes SLOW_CANDIDATE_MS: the 4 workers cannot keep
                # up, so the queue fills and mirrors are dropped instead of slowing the user
                await _set_latency(http, sim_url, "sim-divergent", SLOW_CANDIDATE_MS)
                result["saturation_slow_candidate"] = {
                    "candidate_latency_ms": SLOW_CANDIDATE_MS,
                    **await saturation(default, concurrency, seconds, SLOW_ROUNDS),
                }
                await _set_latency(http, sim_url, "sim-divergent", 0)
            finally:
                await stop(default)
            wide = await start("wide")
            try:
                result["capacity"] = await capacity(wide, concurrency, 2 * seconds)
            finally:
                await stop(wide)
        finally:
            sim.stop()
            await producer.stop()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench shadow", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="c=1 calls per setting (default 1000)")
    parser.add_argument("--block", type=int, default=100, help="c=1 calls per alternating block")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="pause between c=1 calls (default 5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="saturation block length (default 5)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at saturation (default 16)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(
            run(args.calls, args.block, args.gap_ms, args.seconds, args.concurrency, Path(tmp))
        )
    print(json.dumps(result, indent=2))
