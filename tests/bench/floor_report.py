"""Figures and table of `scripts/bench sidecar-floor` from its load runs (see sidecar_floor.py)."""

from __future__ import annotations

import statistics
from typing import Any

ROLES = ("server", "broker", "upstream", "loadgen")


def _percentile(values: list[int], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def _per_call_ms(runs: list[dict[str, Any]], role: str) -> float | None:
    calls = sum(run["ok"] for run in runs)
    if not calls or not any(role in run["cpu_s"] for run in runs):
        return None
    return sum(run["cpu_s"].get(role, 0.0) for run in runs) * 1000.0 / calls


def _busy(runs: list[dict[str, Any]]) -> float | None:
    seconds = sum(run["seconds"] for run in runs)
    return sum(run["cpu_s"]["server"] for run in runs) / seconds if seconds else None


def _path(runs: list[dict[str, Any]], codes: dict[str, float] | None) -> dict[str, Any]:
    load = [run for run in runs if run["concurrency"] > 1]
    single = [run for run in runs if run["concurrency"] == 1]
    latencies = [value for run in single for value in run["latencies_us"]]
    rates: dict[str, float] = {}
    for c in sorted({run["concurrency"] for run in load}):
        per_round = [run["ok"] / run["seconds"] for run in load if run["concurrency"] == c and run["seconds"]]
        rates[str(c)] = statistics.median(per_round) if per_round else 0.0
    out: dict[str, Any] = {
        "calls": sum(run["ok"] for run in runs),
        "non_2xx": sum(run["failed"] for run in runs),
        "cpu_ms_per_call": _per_call_ms(load or single, "server"),
        "cpu_ms_per_call_c1": _per_call_ms(single, "server"),
        # the server's CPU over the wall time of its c>1 runs: ~1.0 = one core saturated; well
        # under it at max calls/s = it waited (or, on a loaded machine, did not get the core)
        "server_cpu_busy": _busy(load),
        "calls_per_s": rates,
        "max_calls_per_s": max(rates.values()) if rates else None,
        "p50_ms_c1": _percentile(latencies, 0.5),
        "p99_ms_c1": _percentile(latencies, 0.99),
    }
    for role in ROLES[1:]:
        out[f"{role}_cpu_ms_per_call"] = _per_call_ms(load or single, role)
    if codes is not None:
        out["grpc_codes"] = codes
        # h2load resets the streams in flight when a timed run ends: CANCELLED, not errors
        out["grpc_cancelled_at_run_end"] = codes.get("CANCELLED", 0.0)
        out["grpc_errors"] = sum(value for code, value in codes.items() if code not in ("OK", "CANCELLED"))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def summarize(
    runs: list[dict[str, Any]], codes: dict[str, dict[str, float]], paths: tuple[str, ...]
) -> dict[str, Any]:
    """Per-path figures, added latency against the direct call, and the headline ratios."""
    direct = _path([run for run in runs if run["path"] == "direct"], None)
    per_path = {name: _path([run for run in runs if run["path"] == name], codes.get(name)) for name in paths}
    for figures in per_path.values():
        figures["added_p50_ms_c1"] = _minus(figures["p50_ms_c1"], direct["p50_ms_c1"])
        figures["added_p99_ms_c1"] = _minus(figures["p99_ms_c1"], direct["p99_ms_c1"])
    floor = per_path.get("floor", {})
    for name, figures in per_path.items():
        if name != "floor":
            figures["vs_floor"] = {
                "cpu": _ratio(figures["cpu_ms_per_call"], floor.get("cpu_ms_per_call")),
                "max_calls_per_s": _ratio(figures["max_calls_per_s"], floor.get("max_calls_per_s")),
                "added_p50_c1": _ratio(figures["added_p50_ms_c1"], floor.get("added_p50_ms_c1")),
                "added_p99_c1": _ratio(figures["added_p99_ms_c1"], floor.get("added_p99_ms_c1")),
            }
    on = per_path.get("sidecar_on", {})
    on_vs = on.get("vs_floor", {})
    return {
        "sidecar_cpu_ms_per_call": on.get("cpu_ms_per_call"),
        "floor_cpu_ms_per_call": floor.get("cpu_ms_per_call"),
        "sidecar_max_calls_per_s": on.get("max_calls_per_s"),
        "floor_max_calls_per_s": floor.get("max_calls_per_s"),
        "cpu_ratio": on_vs.get("cpu"),
        "max_calls_ratio": on_vs.get("max_calls_per_s"),
        "added_p50_ratio": on_vs.get("added_p50_c1"),
        "added_p99_ratio": on_vs.get("added_p99_c1"),
        "sidecar_added_p50_ms": on.get("added_p50_ms_c1"),
        "sidecar_added_p99_ms": on.get("added_p99_ms_c1"),
        "floor_added_p50_ms": floor.get("added_p50_ms_c1"),
        "floor_added_p99_ms": floor.get("added_p99_ms_c1"),
        "broker_cpu_ms_per_call": on.get("broker_cpu_ms_per_call"),
        "upstream_cpu_ms_per_call": direct["upstream_cpu_ms_per_call"],
        "loadgen_cpu_ms_per_call": on.get("loadgen_cpu_ms_per_call"),
        "grpc_errors": sum(p.get("grpc_errors", 0.0) for p in per_path.values()),
        "non_2xx": sum(p["non_2xx"] for p in per_path.values()) + direct["non_2xx"],
        "direct": direct,
        "paths": per_path,
    }


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    """The human table: one column per path, the direct call last."""
    paths: dict[str, dict[str, Any]] = result["paths"]
    direct = result["direct"]
    names = list(paths)
    concurrencies = sorted({c for p in paths.values() for c in p["calls_per_s"]}, key=int)
    rows: list[tuple[str, list[str]]] = [
        ("CPU ms/call (server, c>1)", [_fmt(p["cpu_ms_per_call"], ".3f") for p in paths.values()]),
        ("  vs floor", [_fmt(p.get("vs_floor", {}).get("cpu"), ".2f") + "x" for p in paths.values()]),
        ("CPU ms/call at c=1", [_fmt(p["cpu_ms_per_call_c1"], ".3f") for p in paths.values()]),
    ]
    rows.append(("server CPU busy (c>1)", [_fmt(p["server_cpu_busy"]) for p in paths.values()]))
    for c in concurrencies:
        rows.append((f"calls/s at c={c}", [_fmt(p["calls_per_s"].get(c), ".0f") for p in paths.values()]))
    rows += [
        ("max calls/s vs floor", [_fmt(p.get("vs_floor", {}).get("max_calls_per_s")) + "x"
                                  for p in paths.values()]),
        ("p50 / p99 ms at c=1", [f"{_fmt(p['p50_ms_c1'])} / {_fmt(p['p99_ms_c1'])}" for p in paths.values()]),
        ("added p50 / p99 ms", [f"{_fmt(p['added_p50_ms_c1'], '+.2f')} / {_fmt(p['added_p99_ms_c1'], '+.2f')}"
                                for p in paths.values()]),
        ("broker CPU ms/call", [_fmt(p["broker_cpu_ms_per_call"], ".3f") for p in paths.values()]),
        ("nginx CPU ms/call", [_fmt(p["upstream_cpu_ms_per_call"], ".3f") for p in paths.values()]),
        ("loadgen CPU ms/call", [_fmt(p["loadgen_cpu_ms_per_call"], ".3f") for p in paths.values()]),
        ("calls / gRPC errors", [f"{p['calls']} / {p.get('grpc_errors', 0):.0f}" for p in paths.values()]),
    ]  # fmt: skip
    width = max(len(label) for label, _ in rows)
    cols = [max(len(name), *(len(cells[i]) for _, cells in rows)) for i, name in enumerate(names)]
    lines = [" " * width + "  " + "  ".join(name.rjust(cols[i]) for i, name in enumerate(names))]
    lines += [label.ljust(width) + "  " + "  ".join(cell.rjust(cols[i]) for i, cell in enumerate(cells))
              for label, cells in rows]  # fmt: skip
    lines.append(
        f"direct (h2load --h1 to the upstream, c=1): p50 {_fmt(direct['p50_ms_c1'])} ms,"
        f" p99 {_fmt(direct['p99_ms_c1'])} ms,"
        f" nginx {_fmt(direct['upstream_cpu_ms_per_call'], '.3f')} ms CPU/call"
    )
    lines.append(
        f"load generator: {result['loadgen']}; upstream: {result['upstream']}; {result['rounds']} rounds of"
        f" {result['seconds_per_run']} s per run; measured in {result['measure_s']:.0f} s"
        + (f", {result['total_s']:.0f} s in all" if "total_s" in result else "")
    )
    if "loadavg" in result:
        lines.append(
            f"machine load average (1 min) at start / end: {' / '.join(map(str, result['loadavg']))}"
        )
    return "\n".join(lines)
