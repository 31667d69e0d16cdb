"""Helpers for tests that run Outrider components as real processes."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import outrider
from outrider.v1 import control_pb2

STOP_TIMEOUT_S = 20.0

# the control-signing key of the tests: collectors in tests sign with it (`write_signing_key`),
# sidecars trust its public half (`TEST_SIGNER.public_text()`)
TEST_SIGNER = outrider.SigningKey.generate()


def write_signing_key(directory: Path, signer: outrider.SigningKey = TEST_SIGNER) -> tuple[Path, Path]:
    """`<key id>.key` and `<key id>.pub` in `directory` (what `outrider keygen` writes)."""
    return signer.write(directory)


def signed_control(
    message: control_pb2.ControlMessage,
    signer: outrider.SigningKey | None = TEST_SIGNER,
    *,
    key: bytes | None = None,
    issued_at_ns: int | None = None,
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a control record, signed by `signer` (None: unsigned)."""
    value, headers = outrider.encode_control(message)
    body = message.WhichOneof("body")
    if key is None:
        if body == "rollout":
            key = outrider.rollout_key(message.rollout.agent)
        elif body == "flag":
            key = outrider.flag_key(message.flag.agent, message.flag.name)
        else:
            key = outrider.quota_key(message.quota.resource)
    if signer is not None:
        headers = [*headers, *signer.sign(key, value, issued_at_ns)]
    return key, value, headers


ADMIN_TOKEN = "test-operator-token-0123456789abcdef"
VIEWER_TOKEN = "test-viewer-token-0123456789abcdef"


def write_admin_tokens(directory: Path) -> Path:
    """A tokens file with an operator (`ADMIN_TOKEN`, "ci") and a viewer (`VIEWER_TOKEN`, "watcher")."""
    import yaml

    from collector._auth import token_entry

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "admin-tokens.yaml"

    path.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    token_entry("ci", "operator", ADMIN_TOKEN),
                    token_entry("watcher", "viewer", VIEWER_TOKEN),
                ]
            }
        )
    )
    return path


def bearer(token: str = ADMIN_TOKEN) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token}"),)


class BearerInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds `authorization: Bearer <token>` to every unary call of a channel."""

    def __init__(self, token: str = ADMIN_TOKEN) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        metadata = list(details.metadata or ()) + list(bearer(self._token))
        details = details._replace(metadata=metadata)
        return await continuation(details, request)


def admin_channel(address: str, token: str | None = ADMIN_TOKEN) -> grpc.aio.Channel:
    """A plaintext channel to a collector's admin API, authenticated with `token` (None: none)."""
    interceptors = [BearerInterceptor(token)] if token is not None else None
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


# one key pair and tokens file for every test in the run (tests that need others make them)
_KEYS_DIR = Path(tempfile.mkdtemp(prefix="outrider-test-keys-"))
atexit.register(shutil.rmtree, _KEYS_DIR, True)
TEST_SIGNING_KEY_FILE, TEST_PUBLIC_KEY_FILE = write_signing_key(_KEYS_DIR)
TEST_TOKENS_FILE = write_admin_tokens(_KEYS_DIR)
# what a collector in a test needs to sign and to let the tests' tokens in
SECURE_COLLECTOR = {
    "signing_key_file": str(TEST_SIGNING_KEY_FILE),
    "admin_tokens_file": str(TEST_TOKENS_FILE),
}


class Proc:
    """An `outrider ...` subprocess. The test that starts one stops it, by its PID."""

    def __init__(self, *args: str, log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devstack", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the process and wait; return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def outrider_process(*args: str, log_path: Path) -> Iterator[Proc]:
    proc = Proc(*args, log_path=log_path)
    try:
        yield proc
    finally:
        proc.stop()


async def wait_serving(address: str, proc: Proc, timeout_s: float = 30.0) -> None:
    """Wait until a gRPC server reports SERVING on the standard health service."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.proc.poll() is not None:
                raise AssertionError(f"{proc.args[0]} exited with {proc.proc.returncode}:\n{proc.output()}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{address} not SERVING after {timeout_s}s:\n{proc.output()}")
            await asyncio.sleep(0.05)


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")


async def scrape(session: aiohttp.ClientSession, url: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value)."""
    async with session.get(url) as response:
        response.raise_for_status()
        text = await response.text()
    samples = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = _SAMPLE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def _ephemeral_low(default: int = 32_768) -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def free_port_base(span: int, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A base port with ``span`` consecutive ports free a moment ago (for `outrider dev`).

    Below the kernel's ephemeral range: there, any outgoing connection or `free_port()` of a
    test running beside this one (xdist) may take one of the ports before `outrider dev` binds
    it; below, only another `free_port_base` can, and it checks."""
    rng = random.Random()
    top = max(10_000 + span + 1, min(60_000, _ephemeral_low()) - span)
    for _ in range(attempts):
        base = rng.randrange(10_000, top)
        socks = []
        try:
            for port in range(base, base + span):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((host, port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise RuntimeError(f"no {span} consecutive free ports found")


class DevStackProc:
    """`outrider dev` on a port base and a run directory, from the checkout root; stopped by PID."""

    UP_TIMEOUT_S = 60.0

    def __init__(self, root: Path, port_base: int, state_dir: Path, log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devstack", "dev", "--state-dir", str(state_dir), *extra],
            cwd=root,
            env={**os.environ, "OUTRIDER_DEV_PORT_BASE": str(port_base)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self) -> None:
        deadline = time.monotonic() + self.UP_TIMEOUT_S
        while "outrider dev is up" not in self.output():
            assert self.proc.poll() is None, f"outrider dev exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"outrider dev not up:\n{self.output()}"
            time.sleep(0.1)

    def child_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"pid (\d+)", self.output())]

    def stop(self) -> int:
        """Ctrl-C, as a developer stops it; SIGKILL only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                for pid in self.child_pids():  # its children run in sessions of their own
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode


async def report_versions(
    bootstrap: str,
    agent: str,
    *version_ids: str,
    admin: str | None = None,
    token: str = ADMIN_TOKEN,
    sidecar_id: str = "test-sidecar",
    timeout_s: float = 20.0,
    send: bool = True,
) -> None:
    """Send what a sidecar serving `version_ids` sends at start (a `VersionsReport` on
    `outrider.events`); with `admin`, wait until that collector lists them as reported (by this
    report or by call events: `send=False` only waits), since `rollout start` refuses versions
    that are neither pushed nor reported."""
    from aiokafka import AIOKafkaProducer

    from outrider.v1 import admin_pb2_grpc, events_pb2, registry_pb2

    event = events_pb2.Event(
        event_id=os.urandom(8).hex(), time_unix_nano=time.time_ns(), agent=agent, sidecar_id=sidecar_id
    )
    for version_id in version_ids:
        event.versions_report.versions.add(version_id=version_id, source="config")
    value, headers = outrider.encode_event(event)
    if send:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            await producer.send_and_wait(
                outrider.EVENTS_TOPIC, value, key=outrider.agent_key(agent), headers=headers
            )
        finally:
            await producer.stop()
    if admin is None:
        return
    deadline = time.monotonic() + timeout_s
    async with admin_channel(admin, token) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        while True:
            listing = await stub.ListVersions(registry_pb2.ListVersionsRequest(agent=agent), timeout=5)
            reported = {v.version_id for v in listing.versions if v.sidecars or v.last_seen_unix_nano}
            if set(version_ids) <= reported:
                return
            assert time.monotonic() < deadline, (
                f"the collector has no report of {version_ids} after {timeout_s}s"
            )
            await asyncio.sleep(0.05)
