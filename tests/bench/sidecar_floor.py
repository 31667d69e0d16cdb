"""The sidecar against the floor: CPU per call, max calls/s and added latency, in one run.

    scripts/bench sidecar-floor [--json] [--rounds 4] [--seconds 3]

Four gRPC servers on outrider.v1, each its own process, answer unary Chat from ONE upstream,
nginx (Debian's `nginx-light`, installed when missing) returning a fixed chat completion:

- `sidecar_on`: `outrider sidecar`, a minimal version, default protections, telemetry on
  (events and spans produced to the embedded broker; no collector consumes them);
- `sidecar_off`: the same with `telemetry.enabled: false`;
- `sidecar_protected`: telemetry on and every protection: guards (prompt injection, PII,
  secrets), breaker, retries, deadline, two fallback tiers, prices, user, tenant and global
  quotas (limits far above the load: they are checked on every call, never hit);
- `floor`: `tests/bench/floor_server.py`, a bare grpc.aio + aiohttp pass-through.

The load generator is h2load (Debian's `nghttp2-client`, installed when missing) speaking
gRPC with a pre-serialized ChatRequest; each round runs every concurrency (1, 8, 32, 64 calls
in flight) on every path, the order of the paths rotating per round, so noise hits them alike.
The direct baseline for added latency is h2load `--h1` POSTing the same JSON to nginx at c=1.

- CPU per call: utime+stime of the server's own process (/proc/PID/stat; children excluded)
  over the c>=8 runs, divided by their calls; the broker, nginx and h2load are measured apart.
- Max calls/s: per concurrency, the median over rounds; max over concurrencies.
- Added p50/p99 at c=1: the path's percentile minus the direct one, over every call of every
  round (h2load's per-request log).
- Errors: h2load counts non-2xx; gRPC statuses (trailers, which h2load does not read) are
  counted from each sidecar's `outrider_sidecar_requests_total{code}` before/after and the
  floor's own counters, and one Python call per path checks the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import yaml

from devstack.broker import EmbeddedBroker, free_port
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.bench import floor_server
from tests.bench.floor_report import summarize, table
from tests.bench.floor_tools import (
    LoadResult,
    Nginx,
    accepts,
    cpu_seconds,
    ensure_binaries,
    grpc_frame,
    run_h2load,
    run_python_load,
)
from tests.support import Proc

PATHS = ("sidecar_on", "sidecar_off", "sidecar_protected", "floor")
CONCURRENCY = (1, 8, 32, 64)
ANSWER = "Your order 1234 shipped yesterday and arrives on Friday."
USER_TEXT = "Where is my order 1234?"
CHAT_PATH = "/outrider.v1.Sidecar/Chat"
COMPLETION = {
    "id": "chatcmpl-floor",
    "object": "chat.completion",
    "created": 1700000000,
    "model": floor_server.MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 21, "completion_tokens": 12, "total_tokens": 33},
}
HUGE = 1e12  # quota limits checked on every call and never reached


def sidecar_config(
    name: str, port: int, metrics_port: int, base_url: str, kafka: str, workdir: Path
) -> dict[str, Any]:
    """The configuration of sidecar path `name` (see the module docstring)."""
    version: dict[str, Any] = {
        "provider": {"name": "openai", "base_url": base_url},
        "model": floor_server.MODEL,
        "system_prompt": floor_server.SYSTEM_PROMPT,
        "parameters": floor_server.PARAMETERS,
    }
    config: dict[str, Any] = {
        "agent": "floor-bot",
        "stable": "v1",
        "listen": f"127.0.0.1:{port}",
        "metrics_port": metrics_port,
        "metrics_host": "127.0.0.1",
        "kafka": {"bootstrap_servers": kafka},
        "telemetry": {"spill_dir": str(workdir / f"spill-{name}")},
        "versions": {"v1": version},
    }
    if name == "sidecar_off":
        config["telemetry"] = {"enabled": False}
    if name == "sidecar_protected":
        version["request_timeout"] = "10s"
        version["resilience"] = {
            "breaker": {"consecutive_failures": 5, "failure_rate": 0.5, "window": "30s", "min_requests": 20},
            "retry": {"max_attempts": 3, "base": "5ms", "cap": "50ms"},
            "deadline": "10s",
        }
        version["fallback"] = [
            {"provider": {"name": "openai", "base_url": base_url}, "model": "sim-fallback"},
            {"static_response": "Sorry, try again in a minute."},
        ]
        version["guards"] = [
            {"guard": "prompt_injection", "action": "block"},
            {"guard": "pii", "action": "redact"},
            {"guard": "secret", "action": "redact"},
        ]
        config["prices"] = {floor_server.MODEL: {"input_per_mtok": 0.15, "output_per_mtok": 0.60}}
        config["user_quotas"] = {"tokens_per_minute": HUGE, "requests_per_minute": HUGE}
        config["tenant_quotas"] = {"tokens_per_minute": HUGE, "requests_per_minute": HUGE}
        config["global_quotas"] = {f"openai/{floor_server.MODEL}": {"safe_share_tpm": HUGE}}
    return config


class Server:
    """One measured gRPC server process: a sidecar (with its metrics port) or the floor."""

    def __init__(self, name: str, address: str, pid: int, stop: Any, metrics_port: int | None) -> None:
        self.name, self.address, self.pid, self.stop = name, address, pid, stop
        self.metrics_port = metrics_port
        self.frame = b""  # the framed ChatRequest h2load sends, once a session is open
        self.answer: str | None = ANSWER  # what the upstream answers (None: any text, the sim's)

    def calls_by_code(self) -> dict[str, float]:
        """gRPC code -> Chat calls answered so far (the sidecar's metrics, the floor's counters)."""
        if self.metrics_port is None:
            with grpc.insecure_channel(self.address) as channel:
                info = sidecar_pb2_grpc.SidecarStub(channel).GetVersion(
                    sidecar_pb2.GetVersionRequest(), timeout=5
                )
            counts = dict(part.split("=") for part in info.name.split())
            return {"OK": float(counts["ok"]), "ERROR": float(counts["errors"])}
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        codes: dict[str, float] = {}
        for line in text.splitlines():
            if (
                line.startswith("outrider_sidecar_requests_total{")
                and "Chat" in line
                and "ChatStream" not in line
            ):
                code = re.search(r'code="([^"]*)"', line)
                if code:
                    codes[code[1]] = codes.get(code[1], 0.0) + float(line.rsplit(" ", 1)[1])
        return codes

    def open_and_check(self) -> None:
        """Open the session the load uses and check one call answers the upstream's text."""
        with grpc.insecure_channel(self.address) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            session = stub.OpenSession(
                sidecar_pb2.OpenSessionRequest(user_id="bench", tenant_id="bench-tenant"), timeout=10
            )
            request = sidecar_pb2.ChatRequest(
                session_id=session.session_id,
                messages=[common_pb2.ChatMessage(role="user", content=USER_TEXT)],
            )
            reply = stub.Chat(request, timeout=10)
        if reply.message.content != self.answer and not (self.answer is None and reply.message.content):
            raise RuntimeError(
                f"{self.name}: the check call answered {reply.message.content!r}, not the upstream's"
            )
        self.frame = grpc_frame(request.SerializeToString())


def _wait_up(
    name: str, address: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
                )
            try:
                stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="probe"), timeout=1.0)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not serving on {address} after {timeout_s:.0f} s") from None
                time.sleep(0.05)


def start_servers(
    stack: contextlib.ExitStack,
    paths: tuple[str, ...],
    base_url: str,
    kafka: str,
    workdir: Path,
    answer: str | None = ANSWER,
) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    for name in paths:
        port = free_port()
        address = f"127.0.0.1:{port}"
        log = workdir / f"{name}.log"
        if name == "floor":
            sink = stack.enter_context(open(log, "wb"))  # noqa: SIM115
            cmd = [
                sys.executable,
                "-m",
                "tests.bench.floor_server",
                "--listen",
                address,
                "--upstream",
                base_url,
            ]
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
            stack.callback(_stop_popen, popen)
            server = Server(name, address, popen.pid, popen, None)
        else:
            metrics_port = free_port()
            config = workdir / f"{name}.yaml"
            config.write_text(
                yaml.safe_dump(sidecar_config(name, port, metrics_port, base_url, kafka, workdir))
            )
            proc = Proc("--log-level", "WARNING", "sidecar", "--config", str(config), log_path=log)
            stack.callback(proc.stop)
            popen = proc.proc
            server = Server(name, address, proc.pid, proc, metrics_port)
        server.answer = answer
        servers[name] = server
    for server in servers.values():  # started together, waited for together: imports overlap
        popen = server.stop if isinstance(server.stop, subprocess.Popen) else server.stop.proc
        _wait_up(server.name, server.address, popen, workdir / f"{server.name}.log")
        server.open_and_check()
    return servers


def _stop_popen(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


class Loader:
    """Runs one load (h2load, or the Python fallback) and measures every process's CPU around it."""

    def __init__(
        self, h2load: str | None, workdir: Path, seconds: float | None, requests: int | None
    ) -> None:
        self.h2load, self.workdir, self.seconds, self.requests = h2load, workdir, seconds, requests
        self.tool = "h2load" if h2load else "python (h2load unavailable: figures capped by the client)"

    def grpc(self, server: Server, concurrency: int, watch: dict[str, int]) -> dict[str, Any]:
        data = self.workdir / f"{server.name}.grpc"
        data.write_bytes(server.frame)
        url = f"http://{server.address}{CHAT_PATH}"
        return self._measured(
            watch | {"server": server.pid},
            lambda: (
                run_h2load(self.h2load, url, data, self.workdir, concurrency=concurrency,
                           seconds=self.seconds, requests=self.requests)
                if self.h2load
                else run_python_load(f"http://{server.address}", server.frame[5:], concurrency=concurrency,
                                     seconds=self.seconds, requests=self.requests, grpc_path=CHAT_PATH)
            ),
        )  # fmt: skip

    def direct(self, base_url: str, body: bytes, watch: dict[str, int]) -> dict[str, Any]:
        data = self.workdir / "direct.json"
        data.write_bytes(body)
        url = f"{base_url}/chat/completions"
        return self._measured(
            watch,
            lambda: (
                run_h2load(self.h2load, url, data, self.workdir, concurrency=1, seconds=self.seconds,
                           requests=self.requests, h1=True, headers=("content-type: application/json",))
                if self.h2load
                else run_python_load(url, body, concurrency=1, seconds=self.seconds, requests=self.requests)
            ),
        )  # fmt: skip

    @staticmethod
    def _measured(watch: dict[str, int], load: Any) -> dict[str, Any]:
        before = {role: cpu_seconds(pid) for role, pid in watch.items()}
        result: LoadResult = load()
        after = {role: cpu_seconds(pid) for role, pid in watch.items()}
        return {
            "ok": result.ok,
            "failed": result.failed,
            "seconds": result.seconds,
            "latencies_us": result.latencies_us,
            "cpu_s": {**{role: after[role] - before[role] for role in watch}, "loadgen": result.cpu_s},
        }


def run_bench(
    workdir: Path,
    *,
    paths: tuple[str, ...] = PATHS,
    concurrency: tuple[int, ...] = CONCURRENCY,
    rounds: int = 4,
    seconds: float | None = 3.0,
    requests: int | None = None,
    install: bool = True,
    upstream: str = "nginx",
    log: Any = print,
) -> dict[str, Any]:
    """The whole bench: start the peers, warm up, run `rounds` rounds, stop everything.
    `upstream="sim"` (tests only, where nginx is missing) uses the Python SimProvider instead."""
    binaries, notes = ensure_binaries(install)
    for note in notes:
        log(note)
    body = _direct_body()
    with contextlib.ExitStack() as stack:
        watch: dict[str, int] = {}
        if upstream == "nginx":
            if binaries["nginx"] is None:
                raise RuntimeError("nginx is not installed and could not be (apt-get install nginx-light)")
            nginx = Nginx(binaries["nginx"], workdir, json.dumps(COMPLETION, separators=(",", ":")))
            nginx.start()
            stack.callback(nginx.stop)
            base_url, watch["upstream"] = nginx.base_url, nginx.pid
        else:
            base_url, sim = _start_sim(workdir)
            stack.callback(sim.stop)
            watch["upstream"] = sim.pid
        kafka = "127.0.0.1:1"
        if any(name in ("sidecar_on", "sidecar_protected") for name in paths):
            broker = stack.enter_context(EmbeddedBroker(log_path=workdir / "broker.log"))
            kafka = broker.bootstrap_servers
            assert broker.pid is not None
            watch["broker"] = broker.pid
        servers = start_servers(
            stack, paths, base_url, kafka, workdir, ANSWER if upstream == "nginx" else None
        )
        loader = Loader(binaries["h2load"], workdir, seconds, requests)
        log(f"load generator: {loader.tool}; upstream: {upstream} at {base_url}")
        warm = Loader(binaries["h2load"], workdir, None, 200 if requests is None else requests)
        for server in servers.values():  # connections, caches, the first broker batches
            warm.grpc(server, 8, {})
        codes_before = {name: server.calls_by_code() for name, server in servers.items()}
        runs: list[dict[str, Any]] = []
        started = time.monotonic()
        for round_no in range(rounds):
            order = list(paths[round_no % len(paths) :] + paths[: round_no % len(paths)])
            for c in concurrency:
                if c == 1:
                    runs.append({"path": "direct", "concurrency": 1, **loader.direct(base_url, body, watch)})
                for name in order:
                    runs.append({"path": name, "concurrency": c, **loader.grpc(servers[name], c, watch)})
                    log(_progress(runs[-1]))
        elapsed = time.monotonic() - started
        codes = {name: _delta(server.calls_by_code(), codes_before[name]) for name, server in servers.items()}
    result = summarize(runs, codes, paths)
    result["loadgen"] = loader.tool
    result["upstream"] = upstream
    result["rounds"], result["seconds_per_run"], result["measure_s"] = rounds, seconds, elapsed
    result["notes"] = notes
    return result


def _progress(run: dict[str, Any]) -> str:
    rate = run["ok"] / run["seconds"] if run["seconds"] else 0.0
    cpu = run["cpu_s"]["server"] * 1000 / max(1, run["ok"])
    return f"  {run['path']:<18} c={run['concurrency']:<3} {rate:8.0f} calls/s  {cpu:.3f} ms CPU/call"


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {
        code: after[code] - before.get(code, 0.0) for code in after if after[code] != before.get(code, 0.0)
    }


def _direct_body() -> bytes:
    messages = [
        {"role": "system", "content": floor_server.SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEXT},
    ]
    return json.dumps({"model": floor_server.MODEL, "messages": messages, **floor_server.PARAMETERS}).encode()


def _start_sim(workdir: Path) -> tuple[str, Proc]:
    port = free_port()
    sim_yaml = workdir / "sim.yaml"
    sim_yaml.write_text(yaml.safe_dump({"models": {floor_server.MODEL: {"latency_ms": 0}}}))
    proc = Proc("--log-level", "WARNING", "simprovider", "--listen", f"127.0.0.1:{port}", "--config",
                str(sim_yaml), log_path=workdir / "sim.log")  # fmt: skip
    deadline = time.monotonic() + 30
    while not accepts(port):
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"simprovider did not start:\n{proc.output()}")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", proc


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: every process started is stopped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench sidecar-floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over every path and concurrency (4)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per load run (3)")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install nginx / h2load")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="outrider-floor-") as tmp:
        result = run_bench(
            Path(tmp), rounds=args.rounds, seconds=args.seconds, install=not args.no_install,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )  # fmt: skip
    result["total_s"] = time.monotonic() - start
    if args.json:  # the table for whoever watches, the object on the last line of stdout
        print(table(result), file=sys.stderr)
        print(json.dumps(result, separators=(",", ":")))
    else:
        print(table(result))
