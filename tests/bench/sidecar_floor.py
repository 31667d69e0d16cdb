"""The sidecar against the floor: CPU per call, max calls/s and added latency, in one run.

    scripts/bench sidecar-floor [--json] [--rounds 4] [--seconds 3] [--variants all] [--concurrency 1,8]

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
- `--variants`: extra paths, each telemetry on plus (or minus) one feature, to say what it
  adds per call: `sidecar_flags` (a prompt and a parameters flag on for every session),
  `sidecar_no_metrics` (no /metrics: the request counters and GenAI client metrics off),
  `sidecar_http` (Chat through the OpenAI-compatible endpoint: h2load --h1, JSON).
- Errors: h2load counts non-2xx; gRPC statuses (trailers, which h2load does not read) are
  counted from each sidecar's `outrider_sidecar_requests_total{code}` before/after and the
  floor's own counters, and one Python call per path checks the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from devstack.broker import EmbeddedBroker, free_port
from tests.bench import floor_server
from tests.bench.floor_report import summarize, table
from tests.bench.floor_servers import ANSWER, CHAT_PATH, COMPLETION, USER_TEXT, Server, start_servers
from tests.bench.floor_tools import (
    LoadResult,
    Nginx,
    accepts,
    cpu_seconds,
    ensure_binaries,
    run_h2load,
    run_python_load,
)
from tests.support import Proc

PATHS = ("sidecar_on", "sidecar_off", "sidecar_protected", "floor")
# what single features add, as extra paths (`--variants`): telemetry on plus (or minus) one thing;
# `sidecar_http` is called through the OpenAI-compatible endpoint (h2load --h1, JSON) instead
VARIANTS = ("sidecar_flags", "sidecar_no_metrics", "sidecar_http")
CONCURRENCY = (1, 8, 32, 64)


class Loader:
    """Runs one load (h2load, or the Python fallback) and measures every process's CPU around it."""

    def __init__(
        self, h2load: str | None, workdir: Path, seconds: float | None, requests: int | None
    ) -> None:
        self.h2load, self.workdir, self.seconds, self.requests = h2load, workdir, seconds, requests
        self.tool = "h2load" if h2load else "python (h2load unavailable: figures capped by the client)"

    def grpc(self, server: Server, concurrency: int, watch: dict[str, int]) -> dict[str, Any]:
        if server.http_port:
            return self.http(server, concurrency, watch)
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

    def http(self, server: Server, concurrency: int, watch: dict[str, int]) -> dict[str, Any]:
        """Chat through the sidecar's OpenAI-compatible endpoint, in the load's session."""
        data = self.workdir / f"{server.name}.json"
        body = json.dumps({"model": floor_server.MODEL, "messages": [{"role": "user", "content": USER_TEXT}]})
        data.write_text(body)
        url = f"http://127.0.0.1:{server.http_port}/v1/chat/completions"
        headers = ("content-type: application/json", f"x-outrider-session: {server.session}")
        if not self.h2load:
            raise RuntimeError("the sidecar_http variant needs h2load")
        return self._measured(
            watch | {"server": server.pid},
            lambda: run_h2load(self.h2load, url, data, self.workdir, concurrency=concurrency,
                               seconds=self.seconds, requests=self.requests, h1=True, headers=headers),
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
    load_start = os.getloadavg()[0]  # other work on the machine skews every figure: say how much
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
        if any(name.startswith("sidecar_") and name != "sidecar_off" for name in paths):
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
        codes = {name: value for name, value in codes.items() if value is not None}
    result = summarize(runs, codes, paths)
    result["loadgen"] = loader.tool
    result["upstream"] = upstream
    result["rounds"], result["seconds_per_run"], result["measure_s"] = rounds, seconds, elapsed
    result["notes"] = notes
    result["loadavg"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    return result


def _progress(run: dict[str, Any]) -> str:
    rate = run["ok"] / run["seconds"] if run["seconds"] else 0.0
    cpu = run["cpu_s"]["server"] * 1000 / max(1, run["ok"])
    return f"  {run['path']:<18} c={run['concurrency']:<3} {rate:8.0f} calls/s  {cpu:.3f} ms CPU/call"


def _delta(after: dict[str, float] | None, before: dict[str, float] | None) -> dict[str, float] | None:
    if after is None or before is None:
        return None
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
    parser.add_argument(
        "--variants",
        default="",
        metavar="LIST",
        help=f"extra paths, comma-separated or 'all': {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCY)),
        metavar="LIST",
        help="calls in flight per run, comma-separated (1,8,32,64; 1 gives the latency)",
    )
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install nginx / h2load")
    args = parser.parse_args(argv)
    variants = VARIANTS if args.variants == "all" else tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    try:
        concurrency = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        parser.error(f"--concurrency: expected integers separated by commas, got {args.concurrency!r}")
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a background job inherits it ignored
        signal.signal(sig, _interrupt)
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="outrider-floor-") as tmp:
            result = run_bench(
                Path(tmp), paths=PATHS + variants, concurrency=concurrency, rounds=args.rounds,
                seconds=args.seconds, install=not args.no_install,
                log=lambda line: print(line, file=sys.stderr, flush=True),
            )  # fmt: skip
    except KeyboardInterrupt:  # every process it started is stopped by now
        print("sidecar-floor: interrupted, every process it started is stopped", file=sys.stderr)
        sys.exit(130)
    result["total_s"] = time.monotonic() - start
    if args.json:  # the table for whoever watches, the object on the last line of stdout
        print(table(result), file=sys.stderr)
        print(json.dumps(result, separators=(",", ":")))
    else:
        print(table(result))
