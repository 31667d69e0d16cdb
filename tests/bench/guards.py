"""Guardrail scan cost: microseconds per scan of a 4 KB reply and a 4 KB prompt, with the
built-in PII, secret and prompt-injection guards, against a baseline measured in the same run
(one regex pass over the same text that matches nothing: the machine's speed at a C scan).

    scripts/bench guards [--runs 7] [--scans 200]

Prints medians over `--runs` runs of `--scans` scans each, and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable

from sidecar.guards import build_policy

REPLY = (
    "Sure! The order 20240115-0001 shipped on 2024-01-15 at 10:30 (v1.2.3); contact john@example.com "
    "or (415) 555-2671. Total: $87.50 for 3 items. "
) * 30
TEXT = REPLY[:4096]


def _per_scan_us(scan: Callable[[], object], scans: int) -> float:
    scan()  # compiled patterns, caches
    started = time.perf_counter()
    for _ in range(scans):
        scan()
    return (time.perf_counter() - started) / scans * 1e6


def run(runs: int, scans: int) -> dict[str, float]:
    policy = build_policy({"pii": "redact", "secret": "redact", "prompt_injection": "flag"})
    baseline_pattern = re.compile(r"\x00")
    cases: dict[str, Callable[[], object]] = {
        "baseline_regex_pass": lambda: baseline_pattern.search(TEXT),
        "scan_output_4kb": lambda: policy.scan_output(TEXT),
        "scan_input_4kb": lambda: policy.scan_input(TEXT),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):  # interleaved, so noise hits every case alike
        for name, scan in cases.items():
            samples[name].append(_per_scan_us(scan, scans))
    out = {f"{name}_us": statistics.median(values) for name, values in samples.items()}
    base = out["baseline_regex_pass_us"]
    out["output_vs_baseline"] = out["scan_output_4kb_us"] / base
    out["input_vs_baseline"] = out["scan_input_4kb_us"] / base
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench guards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--runs", type=int, default=7, help="runs, each of --scans scans (7)")
    parser.add_argument("--scans", type=int, default=200, help="scans per run (200)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.scans < 1:
        parser.error("--runs and --scans must be at least 1")
    print(json.dumps(run(args.runs, args.scans), indent=2))
