"""The native peers of `scripts/bench sidecar-floor`: nginx upstream, h2load load, CPU of a PID.

- `ensure_binaries` installs Debian's `nginx-light` and `nghttp2-client` when `nginx` or `h2load`
  is missing (as root, with apt-get), without letting the package start a daemon on :80.
- `Nginx` serves one fixed OpenAI chat completion for POST /v1/chat/completions on a free
  loopback port, as ONE process (`master_process off`), so its CPU is one /proc/PID/stat.
- `run_h2load` drives a gRPC (or, with `h1`, plain HTTP/1.1) endpoint for a duration or a count
  and returns the calls, per-call latencies (its `--log-file`) and its own CPU (wait4 rusage).
- `run_python_load` is the fallback when h2load cannot be had (the figures are then capped by
  the Python client, and the report says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

from devstack.broker import free_port

PACKAGES = {"nginx": "nginx-light", "h2load": "nghttp2-client"}
INSTALL_TIMEOUT_S = 240.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


def find_binary(name: str) -> str | None:
    """`name` on PATH or in /usr/sbin (nginx lives there, root's PATH is not everyone's)."""
    found = shutil.which(name)
    if found is None and Path(f"/usr/sbin/{name}").exists():
        found = f"/usr/sbin/{name}"
    return found


def ensure_binaries(install: bool) -> tuple[dict[str, str | None], list[str]]:
    """Paths of nginx and h2load (None: not to be had), installing the missing ones when
    `install`; and notes on what was done, for the report."""
    found = {name: find_binary(name) for name in PACKAGES}
    missing = [PACKAGES[name] for name, path in found.items() if path is None]
    notes: list[str] = []
    if not missing or not install:
        return found, notes
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        notes.append(f"cannot install {' '.join(missing)}: needs root and apt-get")
        return found, notes
    start = time.monotonic()
    daemon_before = Path("/run/nginx.pid").exists()
    # policy-rc.d answering 101 keeps dpkg from starting the packaged nginx on :80
    made_policy = not POLICY_RC.exists()
    if made_policy:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        if not _apt_install(missing):
            _apt(["update", "-q"])  # a fresh machine may have no package lists yet
            if not _apt_install(missing):
                notes.append(f"apt-get install {' '.join(missing)} failed")
    finally:
        if made_policy:
            POLICY_RC.unlink(missing_ok=True)
    if not daemon_before:
        _stop_packaged_nginx()
    found = {name: find_binary(name) for name in PACKAGES}
    notes.append(f"installed {' '.join(missing)} in {time.monotonic() - start:.1f} s")
    return found, notes


def _apt(args: list[str]) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            ["apt-get", *args], env=env, capture_output=True, timeout=INSTALL_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _apt_install(packages: list[str]) -> bool:
    return _apt(["install", "-y", "-q", "--no-install-recommends", *packages])


def _stop_packaged_nginx() -> None:
    """If the package started its daemon anyway (a policy that allows it), stop it by its PID."""
    pid_file = Path("/run/nginx.pid")
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads, not its children), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


class Nginx:
    """nginx answering `body` (JSON) to every POST /v1/chat/completions, keepalive, no logs."""

    def __init__(self, binary: str, workdir: Path, body: str) -> None:
        if "'" in body or "\\" in body:
            raise ValueError("the fixed response body must not hold ' or \\ (nginx string quoting)")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._dir = workdir / "nginx"
        self._dir.mkdir(parents=True, exist_ok=True)
        temp = " ".join(
            f"{kind}_temp_path {self._dir}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self._conf = self._dir / "nginx.conf"
        self._conf.write_text(
            f"""daemon off;
master_process off;
worker_processes 1;
pid {self._dir}/nginx.pid;
error_log {self._dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  {temp}
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location = /v1/chat/completions {{
      default_type application/json;
      return 200 '{body}';
    }}
    location / {{ return 404; }}
  }}
}}
"""
        )
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout_s: float = 10.0) -> None:
        self._proc = subprocess.Popen(
            [self._binary, "-e", str(self._dir / "error.log"), "-p", str(self._dir), "-c", str(self._conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while not accepts(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = (
                    (self._dir / "error.log").read_text(errors="replace")
                    if (self._dir / "error.log").exists()
                    else ""
                )
                self.stop()
                raise RuntimeError(f"nginx did not start on 127.0.0.1:{self.port}:\n{log}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


@dataclass
class LoadResult:
    """One load run: calls completed (HTTP 2xx), failed, the seconds it ran, per-call latencies
    in microseconds and the load generator's own CPU seconds."""

    tool: str
    ok: int
    failed: int
    seconds: float
    latencies_us: list[int] = field(default_factory=list)
    cpu_s: float = 0.0

    @property
    def calls_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _split(concurrency: int, h1: bool) -> tuple[int, int]:
    """(connections, streams per connection) for `concurrency` calls in flight. HTTP/1.1 has no
    streams; over h2, up to 4 connections, like a few agent processes sharing a sidecar."""
    if h1 or concurrency <= 4:
        return concurrency, 1
    clients = 4
    return clients, -(-concurrency // clients)


_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def run_h2load(
    binary: str,
    url: str,
    data_file: Path,
    workdir: Path,
    *,
    concurrency: int,
    seconds: float | None = None,
    requests: int | None = None,
    h1: bool = False,
    headers: tuple[str, ...] = GRPC_HEADERS,
) -> LoadResult:
    """One h2load run against `url` (127.0.0.1 only), POSTing `data_file` on every call."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"load targets 127.0.0.1 only, not {url}")
    clients, streams = _split(concurrency, h1)
    log = workdir / "h2load.tsv"
    out = workdir / "h2load.out"
    log.unlink(missing_ok=True)  # h2load appends to its log file
    args = [binary, "-t1", f"-c{clients}", f"-m{streams}", "-d", str(data_file), "--log-file", str(log)]
    args += [arg for header in headers for arg in ("-H", header)]
    args += ["--h1"] if h1 else []
    args += ["-D", f"{round(seconds * 1000)}ms"] if seconds is not None else ["-n", str(requests or 100)]
    with open(out, "wb") as sink:
        proc = subprocess.Popen([*args, url], stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
    limit = time.monotonic() + (seconds or 60.0) + 30.0
    try:
        while True:  # wait4 keeps the child's own rusage (Popen.wait would drop it)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > limit:
                raise RuntimeError(f"h2load did not finish in time: {' '.join(args)}")
            time.sleep(0.02)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    text = out.read_text(errors="replace")
    requests_m, status_m, finished_m = _REQUESTS.search(text), _STATUS.search(text), _FINISHED.search(text)
    if proc.returncode != 0 or not (requests_m and status_m and finished_m):
        raise RuntimeError(f"h2load failed (exit {proc.returncode}): {' '.join(args)} {url}\n{text}")
    elapsed = float(finished_m[1]) * _UNIT[finished_m[2]]
    two_xx = int(status_m[1])
    latencies = []
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].startswith("2"):
            latencies.append(int(parts[2]))
    done = int(requests_m[3])
    return LoadResult("h2load", two_xx, done - two_xx, elapsed, latencies, usage.ru_utime + usage.ru_stime)


def run_python_load(
    url: str,
    body: bytes,
    *,
    concurrency: int,
    seconds: float | None = None,
    requests: int | None = None,
    grpc_path: str | None = None,
) -> LoadResult:
    """The fallback load generator, in this process: `concurrency` callers, gRPC unary calls of
    `grpc_path` with the serialized `body` (no frame) or, without it, HTTP POSTs of `body`."""
    return asyncio.run(_python_load(url, body, concurrency, seconds, requests, grpc_path))


async def _python_load(
    url: str,
    body: bytes,
    concurrency: int,
    seconds: float | None,
    requests: int | None,
    grpc_path: str | None,
) -> LoadResult:
    latencies: list[int] = []
    failed = 0
    budget = [requests if seconds is None else 1 << 62]
    stop_at = time.monotonic() + (seconds or 3600.0)
    cpu_start = cpu_seconds(os.getpid())
    start = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        if grpc_path is not None:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(url.removeprefix("http://")))
            call = channel.unary_unary(grpc_path)  # bytes in, bytes out

            async def one() -> None:
                await call(body, timeout=10)

        else:
            http = await stack.enter_async_context(
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
            )

            async def one() -> None:
                async with http.post(url, data=body, headers={"content-type": "application/json"}) as r:
                    r.raise_for_status()
                    await r.read()

        async def caller() -> None:
            nonlocal failed
            while budget[0] > 0 and time.monotonic() < stop_at:
                budget[0] -= 1
                t0 = time.perf_counter()
                try:
                    await one()
                except (grpc.aio.AioRpcError, aiohttp.ClientError):
                    failed += 1
                    continue
                latencies.append(int((time.perf_counter() - t0) * 1e6))

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return LoadResult(
        "python", len(latencies), failed, elapsed, latencies, cpu_seconds(os.getpid()) - cpu_start
    )
