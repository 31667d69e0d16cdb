"""The measured servers of `scripts/bench sidecar-floor`: each path's sidecar configuration,
and starting the sidecars and the floor server as processes, each checked with one real call."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import yaml

from devstack.broker import free_port
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.bench import floor_server
from tests.bench.floor_tools import grpc_frame
from tests.support import Proc

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
    name: str, port: int, metrics_port: int, base_url: str, kafka: str, workdir: Path, http_port: int = 0
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
    if name == "sidecar_flags":  # the example's flag kinds, each on for every session
        on = {"share": "100%", "sticky_by": "user"}
        config["flags"] = [
            {"name": "concise", "kind": "prompt", "prompt": "Keep it short.", "default": on},
            {"name": "cooler", "kind": "parameters", "parameters": {"temperature": 0.1}, "default": on},
        ]
    if name == "sidecar_no_metrics":  # no /metrics: the GenAI client metrics and request counters off
        config["metrics_port"] = None
    if name == "sidecar_http":
        config["openai_http"] = {"listen": f"127.0.0.1:{http_port}"}
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
    """One measured server process: a sidecar (its metrics port, the OpenAI endpoint's port when
    it is called there) or the floor."""

    def __init__(
        self, name: str, address: str, popen: subprocess.Popen[bytes], metrics_port: int | None
    ) -> None:
        self.name, self.address, self.popen, self.pid = name, address, popen, popen.pid
        self.metrics_port = metrics_port
        self.http_port = 0
        self.frame = b""  # the framed ChatRequest h2load sends, once a session is open
        self.session = ""
        self.answer: str | None = ANSWER  # what the upstream answers (None: any text, the sim's)

    def calls_by_code(self) -> dict[str, float] | None:
        """gRPC code -> Chat calls answered so far (the sidecar's metrics, the floor's counters;
        None: the sidecar has no /metrics)."""
        if self.name == "floor":
            with grpc.insecure_channel(self.address) as channel:
                info = sidecar_pb2_grpc.SidecarStub(channel).GetVersion(
                    sidecar_pb2.GetVersionRequest(), timeout=5
                )
            counts = dict(part.split("=") for part in info.name.split())
            return {"OK": float(counts["ok"]), "ERROR": float(counts["errors"])}
        if self.metrics_port is None:
            return None
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
        self.session = session.session_id


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
            server = Server(name, address, popen, None)
        else:
            metrics_port, http_port = free_port(), free_port()
            data = sidecar_config(name, port, metrics_port, base_url, kafka, workdir, http_port)
            config = workdir / f"{name}.yaml"
            config.write_text(yaml.safe_dump(data))
            proc = Proc("--log-level", "WARNING", "sidecar", "--config", str(config), log_path=log)
            stack.callback(proc.stop)
            server = Server(name, address, proc.proc, data["metrics_port"])
            server.http_port = http_port if "openai_http" in data else 0
        server.answer = answer
        servers[name] = server
    for server in servers.values():  # started together, waited for together: imports overlap
        _wait_up(server.name, server.address, server.popen, workdir / f"{server.name}.log")
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
