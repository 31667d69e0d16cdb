"""`scripts/bench sidecar-floor` in small, so it does not rot: the telemetry-on sidecar and the
floor server (`tests/bench/floor_server.py`) as real processes, one tiny round at c=1 and c=8
through the bench's own machinery, with the broker's, upstream's and load generator's CPU.

It uses nginx and h2load when they are installed (the bench installs them; this test does not),
else the Python stand-ins (SimProvider, the Python load generator), so CI needs neither."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack.broker import free_port
from outrider.v1 import common_pb2, sidecar_pb2
from tests.bench.floor_report import table
from tests.bench.floor_servers import CHAT_PATH
from tests.bench.floor_tools import accepts, cpu_seconds, find_binary, grpc_frame, run_python_load
from tests.bench.sidecar_floor import run_bench

pytestmark = pytest.mark.broker
CALLS = 100


def test_bench_floor_runs_every_measurement(tmp_path: Path) -> None:
    upstream = "nginx" if find_binary("nginx") else "sim"
    result = run_bench(
        tmp_path, paths=("sidecar_on", "floor"), concurrency=(1, 8), rounds=1, seconds=None,
        requests=CALLS, install=False, upstream=upstream, log=lambda line: None,
    )  # fmt: skip
    for name in ("sidecar_on", "floor"):
        path = result["paths"][name]
        # c=1 and c=8, counted runs: every call answered OK, as the server counted them too
        assert path["calls"] == 2 * CALLS and path["non_2xx"] == 0, path
        assert path["grpc_codes"] == {"OK": 2.0 * CALLS}, path
        assert path["cpu_ms_per_call"] > 0 and path["upstream_cpu_ms_per_call"] is not None, path
        assert path["p50_ms_c1"] <= path["p99_ms_c1"], path
        assert set(path["calls_per_s"]) == {"8"}, path
    assert result["paths"]["sidecar_on"]["broker_cpu_ms_per_call"] is not None
    for key in ("sidecar_cpu_ms_per_call", "floor_cpu_ms_per_call", "sidecar_max_calls_per_s",
                "floor_max_calls_per_s", "cpu_ratio", "max_calls_ratio"):  # fmt: skip
        assert result[key] is not None and result[key] > 0, key
    assert result["direct"]["calls"] == CALLS
    json.dumps(result)  # what --json prints
    assert "sidecar_on" in table({**result, "loadgen": "x", "upstream": upstream, "rounds": 1,
                                  "seconds_per_run": None, "measure_s": 1.0})  # fmt: skip


def test_floor_server_with_the_python_load_generator(tmp_path: Path) -> None:
    """The fallback load generator (when h2load cannot be had) against the floor: no upstream
    listens, so every call fails UNAVAILABLE and is counted as failed, not as a latency."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tests.bench.floor_server", "--listen", address,
           "--upstream", f"http://127.0.0.1:{free_port()}/v1"]  # fmt: skip
    with open(tmp_path / "floor.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        while not accepts(port):
            assert proc.poll() is None, (tmp_path / "floor.log").read_text()
            time.sleep(0.02)
        request = sidecar_pb2.ChatRequest(
            session_id="s", messages=[common_pb2.ChatMessage(role="user", content="hi")]
        )
        body = request.SerializeToString()
        assert grpc_frame(body) == b"\x00" + len(body).to_bytes(4, "big") + body
        before = cpu_seconds(proc.pid)
        result = run_python_load(f"http://{address}", body, concurrency=4, requests=40, grpc_path=CHAT_PATH)
        assert result.ok == 0 and result.failed == 40 and result.latencies_us == []
        assert cpu_seconds(proc.pid) >= before and result.cpu_s >= 0
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode in (0, -15), (tmp_path / "floor.log").read_text()
