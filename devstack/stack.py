"""`outrider dev`: the whole system on one machine, on the embedded default.

Each component runs as its own process, as in production, started by `outrider` itself
and stopped by PID (SIGTERM, then SIGKILL after a grace period) in reverse start order.

Everything a run writes lives in its state directory (`--state-dir`, default `.outrider/dev/`),
made fresh on every run unless `--keep-state`: the collector state and the spill, the configs
moved onto the run's ports, a session key (passed as `OUTRIDER_SESSION_KEY`), the
control-signing key pair (the collector signs with the .key, the sidecar trusts the .pub) and
an operator bearer token for the admin API (`admin-token`, which the `outrider rollout`
commands read without flags from `.outrider/dev/`; its hash in `admin-tokens.yaml`).
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

import yaml

from devstack._admin_client import DEV_TOKEN_FILE
from devstack._dev_state import DEFAULT_RUN_DIR, HOST, DevPorts, prepare_run_dir, write_configs
from devstack._secrets import make_secrets
from devstack.broker import EmbeddedBroker, free_port

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 15.0
ENV_SESSION_KEY = "OUTRIDER_SESSION_KEY"


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
    ports: DevPorts = field(default_factory=lambda: DevPorts.from_base(None))
    run_dir: Path = DEFAULT_RUN_DIR
    keep_state: bool = False
    token_file: Path = DEV_TOKEN_FILE
    _broker: EmbeddedBroker | None = None
    _env: dict[str, str] = field(default_factory=dict)
    _signing_key: Path | None = None
    _tokens_file: Path | None = None
    _children: list[_Child] = field(default_factory=list)
    _stopping: bool = False

    def start(self) -> None:
        ports = self.ports
        for port, what in (
            (ports.simprovider, "simulated provider"),
            (ports.admin, "collector"),
            (ports.collector_metrics, "collector metrics"),
            (ports.sidecar, "sidecar"),
            (ports.sidecar_metrics, "sidecar metrics"),
            (ports.openai, "sidecar's OpenAI endpoint"),
        ):
            if _port_accepts(HOST, port):
                raise StackError(
                    f"{HOST}:{port} is already in use; the {what} needs it (another `outrider dev`? "
                    f"move every port with --port-base or OUTRIDER_DEV_PORT_BASE)"
                )
        try:
            session_key = prepare_run_dir(self.run_dir, self.keep_state)
            sidecar_config, collector_config = write_configs(
                self.run_dir, ports, self.sidecar_config, self.collector_config
            )
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise StackError(f"could not prepare {self.run_dir}: {exc}") from exc
        self._make_secrets()
        assert self._signing_key is not None and self._tokens_file is not None
        self._broker = EmbeddedBroker(port=free_port())
        self._broker.start()
        kafka = self._broker.bootstrap_servers
        self._spawn(
            "simprovider",
            f"{ports.sim_url}/v1",
            "simprovider",
            "--listen",
            f"{HOST}:{ports.simprovider}",
            "--config",
            str(self.sim_config),
        )
        self._wait_port("simprovider", HOST, ports.simprovider)
        self._spawn(
            "collector",
            f"admin gRPC {HOST}:{ports.admin}, metrics http://{HOST}:{ports.collector_metrics}/metrics",
            "collector",
            "--config",
            str(collector_config),
            "--kafka",
            kafka,
            "--signing-key-file",
            str(self._signing_key),
            "--admin-tokens-file",
            str(self._tokens_file),
        )
        self._wait_port("collector", HOST, ports.admin)
        # one key per run (kept with --keep-state) unless the caller brings its own
        env = {ENV_SESSION_KEY: session_key} if not os.environ.get(ENV_SESSION_KEY) else {}
        from sidecar.telemetry._semconv import CAPTURE_CONTENT_ENV

        # the dev stack's data is simulated: content capture on, so the shadow judge runs
        env.setdefault(CAPTURE_CONTENT_ENV, os.environ.get(CAPTURE_CONTENT_ENV, "true"))
        self._spawn(
            "sidecar",
            f"gRPC {HOST}:{ports.sidecar}, openai http://{HOST}:{ports.openai}/v1, "
            f"metrics http://{HOST}:{ports.sidecar_metrics}/metrics",
            "sidecar",
            "--config",
            str(sidecar_config),
            "--kafka",
            kafka,
            env=env,
        )
        self._wait_port("sidecar", HOST, ports.sidecar)
        self._wait_port("sidecar", HOST, ports.openai)
        self._wait_reported(sidecar_config)

    def _wait_reported(self, sidecar_config: Path) -> None:
        """Up once the collector has the sidecar's report of its versions: `rollout start` refuses
        versions that are neither pushed nor reported."""
        import sidecar as sidecar_pkg
        from devstack._admin_client import AdminTarget
        from devstack._version_cli import wait_reported

        config = sidecar_pkg.load_config(sidecar_config, resolve_secrets=False)
        target = AdminTarget(f"{HOST}:{self.ports.admin}", self.token_file.read_text().strip())
        if not wait_reported(target, config.agent, config.version_ids().values(), READY_TIMEOUT_S):
            log.warning("the collector has no report of the sidecar's versions after %ss", READY_TIMEOUT_S)

    def _make_secrets(self) -> None:
        """A signing key pair and an operator token, fresh each run unless --keep-state (a kept
        collector state was signed with the kept key). The session key comes with the run dir."""
        files = make_secrets(self.run_dir, overwrite=not self.keep_state, token_name="dev")
        self.token_file = files.admin_token
        self._signing_key, self._tokens_file = files.signing_key, files.admin_tokens
        self._env = {"OUTRIDER_CONTROL_PUBLIC_KEYS": str(files.public_key)}

    def describe(self) -> str:
        assert self._broker is not None
        lines = [f"  {'kafka (embedded)':<18} {self._broker.bootstrap_servers}  pid {self._broker.pid}"]
        lines += [f"  {c.name:<18} {c.where}  pid {c.proc.pid}" for c in self._children]
        lines.append(f"  {'admin token':<18} {self.token_file} (operator; the CLI reads it without flags)")
        lines.append(f"  {'signing keys':<18} {self.run_dir}/control.key, control.pub")
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
                f"outrider dev is up (state in {self.run_dir}{', kept' if self.keep_state else ', fresh'}):\n"
                f"{self.describe()}\n\n"
                f"Clients: export OUTRIDER_ADMIN_ADDR={HOST}:{self.ports.admin} "
                f"OUTRIDER_SIDECAR_ADDR={HOST}:{self.ports.sidecar} "
                f"OUTRIDER_OPENAI_BASE_URL=http://{HOST}:{self.ports.openai}/v1 "  # examples/*_agent.py
                f"OUTRIDER_ADMIN_TOKEN_FILE={self.token_file}\n"
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

    def _spawn(self, name: str, where: str, *args: str, env: dict[str, str] | None = None) -> None:
        # A new session: the terminal's Ctrl-C reaches only us, and we stop children in order.
        proc = subprocess.Popen(
            outrider_command(*args),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **self._env, **(env or {})},
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
