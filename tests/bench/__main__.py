"""Run a benchmark: `scripts/bench NAME [options]` (`scripts/bench --list` names them)."""

from __future__ import annotations

import sys

from tests.bench import (
    collector_breakdown,
    collector_ingest,
    decisions,
    global_quota,
    guards,
    openai_http,
    resilience,
    shadow,
    sidecar_floor,
    sidecar_hotpath,
    sidecar_latency,
    sidecar_telemetry,
)

BENCHMARKS = {
    "sidecar-latency": sidecar_latency.main,
    "sidecar-telemetry": sidecar_telemetry.main,
    "sidecar-floor": sidecar_floor.main,
    "sidecar-hotpath": sidecar_hotpath.main,
    "collector-ingest": collector_ingest.main,
    "collector-breakdown": collector_breakdown.main,
    "resilience": resilience.main,
    "global-quota": global_quota.main,
    "decisions": decisions.main,
    "shadow": shadow.main,
    "openai-http": openai_http.main,
    "guards": guards.main,
}


def _main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("--list", "-h", "--help") or args[0] not in BENCHMARKS:
        print("usage: scripts/bench NAME [options]\n\nbenchmarks:\n  " + "\n  ".join(BENCHMARKS))
        sys.exit(0 if args and args[0] in ("--list", "-h", "--help") else 2)
    BENCHMARKS[args[0]](args[1:])


_main()
