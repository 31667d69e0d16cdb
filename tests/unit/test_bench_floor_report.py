"""`scripts/bench sidecar-floor`'s figures from synthetic load runs (no processes): CPU per call,
max calls/s, added latency against the direct call, ratios to the floor, errors by gRPC code."""

from __future__ import annotations

from typing import Any

from tests.bench.floor_report import summarize, table


def _run(path: str, c: int, ok: int, seconds: float, server_cpu: float, latency_us: int) -> dict[str, Any]:
    cpu = {"server": server_cpu, "upstream": ok * 0.00005, "loadgen": ok * 0.0001}
    if path != "direct":
        cpu["broker"] = ok * 0.0001
    return {"path": path, "concurrency": c, "ok": ok, "failed": 0, "seconds": seconds,
            "latencies_us": [latency_us] * ok, "cpu_s": cpu}  # fmt: skip


def test_figures_and_ratios() -> None:
    runs = [
        _run("direct", 1, 1000, 1.0, 0.0, 100),
        _run("sidecar_on", 1, 400, 1.0, 0.8, 2100),
        _run("floor", 1, 1000, 1.0, 0.5, 1100),
        # two rounds at c=8: the median rate; CPU per call over both
        _run("sidecar_on", 8, 1000, 2.0, 2.0, 5000),
        _run("sidecar_on", 8, 1200, 2.0, 2.4, 5000),
        _run("floor", 8, 2000, 1.0, 1.0, 3000),
        _run("floor", 8, 3000, 1.0, 1.5, 3000),
    ]
    codes = {"sidecar_on": {"OK": 3600.0, "CANCELLED": 2.0, "UNAVAILABLE": 1.0}, "floor": {"OK": 6000.0}}
    result = summarize(runs, codes, ("sidecar_on", "floor"))

    assert result["sidecar_cpu_ms_per_call"] == 2.0  # 4.4 s / 2200 calls
    assert result["floor_cpu_ms_per_call"] == 0.5
    assert result["cpu_ratio"] == 4.0
    assert result["sidecar_max_calls_per_s"] == 550.0 and result["floor_max_calls_per_s"] == 2500.0
    assert result["sidecar_added_p50_ms"] == 2.0 and result["floor_added_p50_ms"] == 1.0
    assert result["added_p50_ratio"] == 2.0
    on = result["paths"]["sidecar_on"]
    assert on["cpu_ms_per_call_c1"] == 2.0 and on["server_cpu_busy"] == 1.1
    # streams reset at the end of timed runs are not errors; UNAVAILABLE is
    assert on["grpc_cancelled_at_run_end"] == 2.0 and on["grpc_errors"] == 1.0
    assert result["grpc_errors"] == 1.0 and result["non_2xx"] == 0
    assert result["paths"]["floor"]["broker_cpu_ms_per_call"] is not None
    rendered = table({**result, "loadgen": "h2load", "upstream": "nginx", "rounds": 2,
                      "seconds_per_run": 1.0, "measure_s": 9.0, "loadavg": [0.5, 0.7]})  # fmt: skip
    assert "4.00x" in rendered and "calls/s at c=8" in rendered and "+2.00 / +2.00" in rendered


def test_missing_paths_give_none() -> None:
    result = summarize([_run("floor", 8, 100, 1.0, 0.1, 1000)], {}, ("floor",))
    assert result["sidecar_cpu_ms_per_call"] is None and result["cpu_ratio"] is None
    assert result["floor_cpu_ms_per_call"] == 1.0
    assert result["paths"]["floor"]["p50_ms_c1"] is None
