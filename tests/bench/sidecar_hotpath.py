"""The sidecar's hot path: CPU per call, p50/p99 at c=1 and calls/s at c=8/32, telemetry on
and off, this checkout against another one (e.g. main's worktree) in the same run.

One simulated provider (zero latency) and the embedded broker; one sidecar process per
variant: this checkout with telemetry on (events and spans to the broker, spill open) and
off, the same with the default asyncio loop and stdlib JSON (`OUTRIDER_UVLOOP=0`,
`OUTRIDER_ORJSON=0`), and with `--baseline DIR` that checkout's sidecar on and off (run by
DIR/.venv/bin/python when it has one). The client alternates blocks of unary Chats across
the variants at c=1 (latency), then runs closed-loop load at c=8 and c=32 on each in turn,
`--rounds` times interleaved. CPU per call is the sidecar process's utime+stime over its
load runs divided by the calls it served.

    scripts/bench sidecar-hotpath [--baseline /work/main] [--calls 1500] [--seconds 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from devstack.broker import EmbeddedBroker, free_port
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.bench.sidecar_latency import USER_TEXT, WARMUP_CALLS, _percentile, _sidecar_yaml
from tests.support import Proc, wait_serving

HERE = Path(__file__).resolve().parents[2]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT_S = 15


class TreeSidecar:
    """A sidecar process run from checkout `tree` (its own venv when it has one)."""

    def __init__(self, tree: Path, config: Path, log_path: Path, env: dict[str, str]) -> None:
        python = tree / ".venv" / "bin" / "python"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        # `-m` puts the cwd first on sys.path: the checkout's own packages are the ones run
        self.proc = subprocess.Popen(
            [
                str(python if python.exists() else sys.executable),
                "-m",
                "devstack",
                "--log-level",
                "WARNING",
                "sidecar",
                "--config",
                str(config),
            ],
            cwd=tree,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.args = ("sidecar",)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _variants(baseline: Path | None) -> dict[str, tuple[Path, dict[str, Any], dict[str, str]]]:
    """name -> (checkout, telemetry settings, environment)."""
    slow_libs = {"OUTRIDER_UVLOOP": "0", "OUTRIDER_ORJSON": "0"}
    out: dict[str, tuple[Path, dict[str, Any], dict[str, str]]] = {
        "on": (HERE, {}, {}),
        "off": (HERE, {"enabled": False}, {}),
        "on_asyncio_stdlib_json": (HERE, {}, slow_libs),
    }
    if baseline is not None:
        out["baseline_on"] = (baseline, {}, {})
        out["baseline_off"] = (baseline, {"enabled": False}, {})
    return out


async def _chat(address: str) -> tuple[grpc.aio.Channel, Any, sidecar_pb2.ChatRequest]:
    channel = grpc.aio.insecure_channel(address)
    stub = sidecar_pb2_grpc.SidecarStub(channel)
    session = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="bench"))
    request = sidecar_pb2.ChatRequest(
        session_id=session.session_id, messages=[common_pb2.ChatMessage(role="user", content=USER_TEXT)]
    )
    return channel, stub, request


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, float]]:
    sim_port = free_port()
    sim_yaml = workdir / "sim.yaml"
    sim_yaml.write_text(yaml.safe_dump({"models": {"sim-fast": {"latency_ms": 0}}}))
    base_url = f"http://127.0.0.1:{sim_port}/v1"
    async with EmbeddedBroker() as broker:
        sim = Proc("--log-level", "WARNING", "simprovider", "--listen", f"127.0.0.1:{sim_port}",
                   "--config", str(sim_yaml), log_path=workdir / "sim.log")  # fmt: skip
        sidecars: dict[str, TreeSidecar] = {}
        calls: dict[str, tuple[grpc.aio.Channel, Any, sidecar_pb2.ChatRequest]] = {}
        try:
            for name, (tree, telemetry, env) in _variants(args.baseline).items():
                if telemetry.get("enabled", True):
                    telemetry = {**telemetry, "spill_dir": str(workdir / f"spill-{name}")}
                port = free_port()
                config = workdir / f"{name}.yaml"
                _sidecar_yaml(config, port, base_url, broker.bootstrap_servers, telemetry)
                sidecars[name] = TreeSidecar(tree, config, workdir / f"{name}.log", env)
                await wait_serving(f"127.0.0.1:{port}", sidecars[name])  # type: ignore[arg-type]
                calls[name] = await _chat(f"127.0.0.1:{port}")
            try:
                return await _measure(args, sidecars, calls)
            finally:
                for channel, _, _ in calls.values():
                    await channel.close(None)
        finally:
            for sidecar in sidecars.values():
                sidecar.stop()
            sim.stop()


async def _measure(
    args: argparse.Namespace,
    sidecars: dict[str, TreeSidecar],
    calls: dict[str, tuple[grpc.aio.Channel, Any, sidecar_pb2.ChatRequest]],
) -> dict[str, dict[str, float]]:
    async def one(name: str) -> float:
        _, stub, request = calls[name]
        start = time.perf_counter()
        await stub.Chat(request, timeout=10)
        return (time.perf_counter() - start) * 1000

    for _ in range(WARMUP_CALLS):
        for name in calls:
            await one(name)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    while min(len(v) for v in samples.values()) < args.calls:
        for name in calls:
            for _ in range(args.block):
                samples[name].append(await one(name))
    out = {
        name: {"p50_ms": statistics.median(v), "p99_ms": _percentile(v, 0.99)} for name, v in samples.items()
    }
    for concurrency in (8, 32):
        served = dict.fromkeys(calls, 0)
        elapsed = dict.fromkeys(calls, 0.0)
        cpu = dict.fromkeys(calls, 0.0)
        for _ in range(args.rounds):
            for name in calls:
                _, stub, request = calls[name]
                cpu0, t0 = sidecars[name].cpu_s(), time.monotonic()
                served[name] += await _load(stub, request, concurrency, args.seconds)
                elapsed[name] += time.monotonic() - t0
                cpu[name] += sidecars[name].cpu_s() - cpu0
        for name in calls:
            out[name][f"calls_per_s_c{concurrency}"] = served[name] / elapsed[name]
            out[name][f"cpu_ms_per_call_c{concurrency}"] = cpu[name] / served[name] * 1000
    return out


async def _load(stub: Any, request: sidecar_pb2.ChatRequest, concurrency: int, seconds: float) -> int:
    """Closed-loop Chats from `concurrency` callers for `seconds`; the calls served."""
    stop_at = time.monotonic() + seconds
    done = 0

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            await stub.Chat(request, timeout=10)
            done += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench sidecar-hotpath", description=__doc__)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare (e.g. /work/main)")
    parser.add_argument("--calls", type=int, default=1500, help="c=1 calls per variant (default 1500)")
    parser.add_argument("--block", type=int, default=100, help="c=1 calls per alternating block")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per load run (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved load rounds (default 2)")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    if args.json:
        print(json.dumps(result))
        return
    columns = [
        "p50_ms",
        "p99_ms",
        "cpu_ms_per_call_c8",
        "cpu_ms_per_call_c32",
        "calls_per_s_c8",
        "calls_per_s_c32",
    ]
    print(f"{'variant':26s}" + "".join(f"{c:>21s}" for c in columns))
    for name, figures in result.items():
        print(f"{name:26s}" + "".join(f"{figures[c]:21.3f}" for c in columns))
