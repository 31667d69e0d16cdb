"""What telemetry (events and spans to Kafka, with the spill ready) adds to a unary Chat.

Two sidecar processes serve the same version from the same simulated provider (zero
latency): one with telemetry on (events and spans to the embedded broker, spill directory
open), one with `telemetry.enabled: false`. One client process alternates blocks of calls:
direct to the provider, through the telemetry-on sidecar, through the telemetry-off one, so
all three paths see the same machine noise. Figures are medians and p99 over every call of
each path; the added latency of a sidecar is its figure minus the direct one.

    scripts/bench sidecar-telemetry [--calls 2000] [--block 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.sidecar_latency import run_paths


async def run(calls: int, block: int, workdir: Path) -> dict[str, object]:
    variants: dict[str, dict[str, Any]] = {
        "telemetry_on": {"spill_dir": str(workdir / "spill")},
        "telemetry_off": {"enabled": False},
    }
    paths = await run_paths(calls, block, workdir, variants)
    d, on, off = paths["direct"], paths["telemetry_on"], paths["telemetry_off"]
    return {
        "direct": d,
        "telemetry_on": on,
        "telemetry_off": off,
        "added_median_ms": {
            "telemetry_on": on["median_ms"] - d["median_ms"],
            "telemetry_off": off["median_ms"] - d["median_ms"],
        },
        "added_p99_ms": {
            "telemetry_on": on["p99_ms"] - d["p99_ms"],
            "telemetry_off": off["p99_ms"] - d["p99_ms"],
        },
        "telemetry_cost_median_ms": on["median_ms"] - off["median_ms"],
        "telemetry_cost_p99_ms": on["p99_ms"] - off["p99_ms"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench sidecar-telemetry", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per path (default 2000)")
    parser.add_argument("--block", type=int, default=100, help="calls per alternating block")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args.calls, args.block, Path(tmp)))
    print(json.dumps(result, indent=2))
