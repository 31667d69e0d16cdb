"""`outrider dev`: the whole system on one machine, on the embedded default.

Each component runs as its own process, as in production, started by `outrider` itself
and stopped by PID (SIGTERM, then SIGKILL after a grace period) in reverse start order.

Secrets are made fresh on every run, in `.outrider/dev/` (mode 0600 where secret): the
control-signing key pair (the collector signs with the .key, the sidecar trusts the .pub),
an operator bearer token for the admin API (`admin-token`, which the `outrider rollout`
commands read without flags; its hash in `admin-tokens.yaml`), and a session key passed to
the sidecar (`session-key`, through `OUTRIDER_SESSION_KEY_FILE`); see devstack/_secrets.py.
The admin API stays plaintext gRPC on loopback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from devstack._admin_client import DEV_DIR, DEV_TOKEN_FILE
from devstack._secrets import make_secrets
from devstack.broker import EmbeddedBroker, free_port

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 15.0
SIM_ADDR = ("127.0.0.1", 8000)  # the example sidecar config points its provider here
ADMIN_PORT = 50061


class StackError(RuntimeError):
    """A component of the dev stack failed to start or died."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    where: str


def _port_accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def outrider_command(*args: str) -> list[str]:
    """The command line that runs `outrider ARGS` with this interpreter."""
    return [sys.executable, "-m", "devstack", *args]


@dataclass
class DevStack:
    sidecar_config: Path
    sim_config: Path
    collector_config: Path
    sidecar_listen: str = "127.0.0.1:50051"
    sidecar_metrics_port: int = 9464
    collector_metrics_port: int = 9465
    dev_dir: Path = DEV_DIR
    token_file: Path = DEV_TOKEN_FILE
    _broker: EmbeddedBroker | None = None
    _env: dict[str, str] = field(default_factory=dict)
    _signing_key: Path | None = None
    _tokens_file: Path | None = None
    _children: list[_Child] = field(default_factory=list)
    _stopping: bool = False

    def start(self) -> None:
        for host, port, what in (
            (*SIM_ADDR, "simulated provider"),
            ("127.0.0.1", ADMIN_PORT, "collector"),
            ("127.0.0.1", self.sidecar_metrics_port, "sidecar metrics"),
        ):
            if _port_accepts(host, port):
                raise StackError(
                    f"{host}:{port} is already in use; the {what} needs it (another `outrider dev`?)"
                )
        self._make_secrets()
        assert self._signing_key is not None and self._tokens_file is not None
        self._broker = EmbeddedBroker(port=free_port())
        self._broker.start()
        kafka = self._broker.bootstrap_servers
        self._spawn(
            "simprovider",
            f"http://{SIM_ADDR[0]}:{SIM_ADDR[1]}/v1",
            "simprovider",
            "--listen",
            f"{SIM_ADDR[0]}:{SIM_ADDR[1]}",
            "--config",
            str(self.sim_config),
        )
        self._wait_port("simprovider", *SIM_ADDR)
        self._spawn(
            "collector",
            f"admin gRPC 127.0.0.1:{ADMIN_PORT}, metrics "
            f"http://127.0.0.1:{self.collector_metrics_port}/metrics",
            "collector",
            "--config",
            str(self.collector_config),
            "--kafka",
            kafka,
            "--admin-listen",
            f"127.0.0.1:{ADMIN_PORT}",
            "--metrics-port",
            str(self.collector_metrics_port),
            "--signing-key-file",
            str(self._signing_key),
            "--admin-tokens-file",
            str(self._tokens_file),
        )
        self._wait_port("collector", "127.0.0.1", ADMIN_PORT)
        self._spawn(
            "sidecar",
            f"gRPC {self.sidecar_listen}, metrics http://127.0.0.1:{self.sidecar_metrics_port}/metrics",
            "sidecar",
            "--config",
            str(self.sidecar_config),
            "--kafka",
            kafka,
            "--listen",
            self.sidecar_listen,
            "--metrics-port",
            str(self.sidecar_metrics_port),
        )
        host, _, sidecar_port = self.sidecar_listen.rpartition(":")
        self._wait_port("sidecar", host, int(sidecar_port))

    def _make_secrets(self) -> None:
        """A fresh signing key pair, operator token and session key for this run."""
        files = make_secrets(self.dev_dir, overwrite=True, token_name="dev")
        self.token_file = files.admin_token
        self._signing_key, self._tokens_file = files.signing_key, files.admin_tokens
        self._env = {
            "OUTRIDER_CONTROL_PUBLIC_KEYS": str(files.public_key),
            "OUTRIDER_SESSION_KEY_FILE": str(files.session_key),
        }

    def describe(self) -> str:
        assert self._broker is not None
        lines = [f"  {'kafka (embedded)':<18} {self._broker.bootstrap_servers}  pid {self._broker.pid}"]
        lines += [f"  {c.name:<18} {c.where}  pid {c.proc.pid}" for c in self._children]
        lines.append(f"  {'admin token':<18} {self.token_file} (operator; the CLI reads it without flags)")
        lines.append(f"  {'signing keys':<18} {self.dev_dir}/control.key, control.pub (new each run)")
        return "\n".join(lines)

    def stop(self) -> None:
        """Stop every child by PID in reverse order, then the broker. Idempotent."""
        self._stopping = True
        for child in reversed(self._children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "%s did not stop within %ss; killing pid %d", child.name, STOP_GRACE_S, child.proc.pid
                    )
                    child.proc.kill()
                    child.proc.wait()
        self._children.clear()
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def run_until_interrupted(self) -> int:
        """Start, print where everything listens, wait for Ctrl-C or SIGTERM, stop. Exit code."""
        interrupted = False

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal interrupted
            interrupted = True

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            print(
                f"outrider dev is up:\n{self.describe()}\n\n"
                f"Try: outrider rollout start examples/rollout.yaml  (Ctrl-C stops everything)",
                flush=True,
            )
            while not interrupted:
                dead = [c for c in self._children if c.proc.poll() is not None]
                if dead:
                    raise StackError(f"{dead[0].name} exited with code {dead[0].proc.returncode}")
                time.sleep(0.2)
            return 0
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
            print("outrider dev stopped.", flush=True)

    def _spawn(self, name: str, where: str, *args: str) -> None:
        # A new session: the terminal's Ctrl-C reaches only us, and we stop children in order.
        proc = subprocess.Popen(
            outrider_command(*args),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **self._env},
        )
        self._children.append(_Child(name, proc, where))

    def _wait_port(self, name: str, host: str, port: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        child = next(c for c in self._children if c.name == name)
        while not _port_accepts(host, port):
            if child.proc.poll() is not None:
                raise StackError(f"{name} exited with code {child.proc.returncode} during start-up")
            if time.monotonic() > deadline:
                raise StackError(f"{name} did not listen on {host}:{port} within {READY_TIMEOUT_S}s")
            time.sleep(0.05)
