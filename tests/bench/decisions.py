"""Decisions benchmark: the rollout tests' error rates and speed, on the simulator.

`scripts/bench decisions [--runs N] [--json]` runs N simulated rollouts (default 1,000) per
scenario, with the collector's own evidence, gates and controller on a virtual clock
(`collector.simulate`): `examples/rollout.yaml`, and `tests/bench/decisions_quality.yaml` (the
same plan with a quality gate, whose baseline gives a fifth of calls a judge score) for the
judge scenario. For each it prints the share rolled back and by which gate, with Clopper-Pearson
95 % bounds; the median time and candidate calls to a decision; the oracle (a Wald SPRT of "no
difference" against the true effect at the per-gate alpha, on the same draws) and the ratio of
the median rollback's candidate calls to it; a fixed-horizon test at the same alpha sized for
97.5 % power; and PASS/FAIL against the targets of issue 8:

- identical: rolled back <= 2 %, judged with the upper bound;
- each regression: rolled back by its own gate >= 95 %, judged with the lower bound;
- a regression's median rollback needs <= 2x the oracle's candidate calls.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy.stats import beta  # type: ignore[import-untyped]

from collector.simulate import Scenario, apply_effect, baseline_from, format_duration, simulate, summarize

ROOT = Path(__file__).resolve().parents[2]
ROLLOUT = ROOT / "examples" / "rollout.yaml"
QUALITY = Path(__file__).resolve().with_name("decisions_quality.yaml")
CALLS_PER_SECOND = 10.0
MAX_FALSE_ROLLBACK = 0.02
MIN_DETECTION = 0.95
MAX_ORACLE_RATIO = 2.0


@dataclass(frozen=True)
class Case:
    name: str
    spec: Path
    baseline: str
    effect: str
    metric: str | None  # the gate's metric that should roll it back; None: identical


CASES = (
    Case("identical", ROLLOUT, "", "", None),
    Case("task -5 pts", ROLLOUT, "", "task_success=-0.05", "task_failure_rate"),
    Case("errors +2 pts", ROLLOUT, "", "error_rate=0.02", "error_rate"),
    Case("p50/p95 x1.2", ROLLOUT, "", "latency_p50_ms=x1.2", "latency_p95_ms"),
    Case("cost x1.25", ROLLOUT, "", "cost_per_call_usd=x1.25", "cost_per_call"),
    Case("judge -0.1 (quality plan)", QUALITY, "judge_share=0.2", "judge_score=-0.1", "judge_score"),
    Case("safety 0 -> 0.5 %", ROLLOUT, "", "safety_rate=0.005", "safety_event_rate"),
    Case("identical (quality plan)", QUALITY, "judge_share=0.2", "", None),
)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact two-sided binomial interval for k successes in n."""
    tail = (1 - level) / 2
    lower = float(beta.ppf(tail, k, n - k + 1)) if k > 0 else 0.0
    upper = float(beta.ppf(1 - tail, k + 1, n - k)) if k < n else 1.0
    return lower, upper


def run_case(case: Case, runs: int, seed: int, workers: int | None) -> dict[str, Any]:
    base = baseline_from(case.baseline)
    scenario = Scenario(
        case.spec.read_text(encoding="utf-8"), base, apply_effect(base, case.effect), CALLS_PER_SECOND
    )
    began = time.perf_counter()
    summary = summarize(simulate(scenario, runs, seed, workers))
    elapsed = time.perf_counter() - began
    rolled = summary["rolled_back"]
    own = summary["rolled_back_by_metric"].get(case.metric, 0) if case.metric else rolled
    oracle = summary["oracle_median_candidate_calls"]
    rollback_calls = summary["median_rollback_candidate_calls"]
    ratio = rollback_calls / oracle if oracle and rollback_calls is not None else None
    checks: dict[str, bool] = {}
    if case.metric is None:
        checks["false rollbacks <= 2 %"] = clopper_pearson(rolled, runs)[1] <= MAX_FALSE_ROLLBACK
    else:
        checks["own gate >= 95 %"] = clopper_pearson(own, runs)[0] >= MIN_DETECTION
        checks["calls <= 2x oracle"] = ratio is not None and ratio <= MAX_ORACLE_RATIO
    return {
        "scenario": case.name,
        "spec": str(case.spec.relative_to(ROOT)),
        "baseline": case.baseline,
        "effect": case.effect,
        "metric": case.metric,
        "summary": summary,
        "rolled_back_ci": clopper_pearson(rolled, runs),
        "own_gate": own,
        "own_gate_ci": clopper_pearson(own, runs),
        "oracle_ratio": ratio,
        "checks": checks,
        "passed": all(checks.values()),
        "elapsed_s": elapsed,
    }


def _share(k: int, n: int, ci: tuple[float, float]) -> str:
    return f"{k / n:6.1%} [{ci[0]:5.1%}, {ci[1]:5.1%}]"


def _by_gate(summary: dict[str, Any]) -> str:
    items = sorted(summary["rolled_back_by_gate"].items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {v}" for k, v in items[:3]) + (", ..." if len(items) > 3 else "") or "-"


def _num(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def print_table(results: list[dict[str, Any]], runs: int) -> None:
    print(
        f"\ndecisions: {runs} simulated rollouts per scenario at {CALLS_PER_SECOND:g} calls/s "
        f"(shares with Clopper-Pearson 95 % bounds)\n"
    )
    head = (
        f"{'scenario':<26} {'rolled back':<23} {'by its own gate':<23} {'by gate':<24} "
        f"{'median to decision':>18} {'cand. calls':>11} {'oracle':>7} {'ratio':>6} {'elapsed':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        s, n = r["summary"], r["summary"]["runs"]
        own = _share(r["own_gate"], n, r["own_gate_ci"]) if r["metric"] else "-"
        print(
            f"{r['scenario']:<26} {_share(s['rolled_back'], n, r['rolled_back_ci']):<23} {own:<23} "
            f"{_by_gate(s):<24.24} {format_duration(s['median_decision_s']):>18} "
            f"{_num(s['median_candidate_calls']):>11} {_num(s['oracle_median_candidate_calls']):>7} "
            f"{_num(r['oracle_ratio'], '.2f'):>6} {r['elapsed_s']:>7.1f}s"
        )
    print("\nfixed-horizon baseline (one two-sided test at the per-gate alpha, sized for 97.5 % power)\n")
    head = f"{'scenario':<26} {'rejected':<23} {'median time':>11} {'cand. calls':>11}"
    print(head)
    print("-" * len(head))
    for r in results:
        f = r["summary"]["fixed_horizon"]
        k, n = f["rejected"], f["runs"]
        rejected = _share(k, n, clopper_pearson(k, n)) if n else "-"
        print(
            f"{r['scenario']:<26} {rejected:<23} {format_duration(f['median_s']):>11} "
            f"{_num(f['median_candidate_calls']):>11}"
        )
    print("\ntargets\n")
    for r in results:
        n = r["summary"]["runs"]
        parts = []
        for name, ok in r["checks"].items():
            if name.startswith("false"):
                detail = f"upper bound {r['rolled_back_ci'][1]:.1%}"
            elif name.startswith("own"):
                detail = f"lower bound {r['own_gate_ci'][0]:.1%}"
            else:
                detail = f"ratio {_num(r['oracle_ratio'], '.2f')}"
            parts.append(f"{name} ({detail}): {'PASS' if ok else 'FAIL'}")
        print(f"{r['scenario']:<26} " + "; ".join(parts) + ("" if n >= 1000 else f"  [N={n} < 1000]"))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench decisions", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="simulated rollouts per scenario")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        help="run only scenarios whose name contains this (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="also print the results as JSON (last line)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs: must be at least 1")
    cases = [c for c in CASES if not args.scenario or any(s in c.name for s in args.scenario)]
    if not cases:
        parser.error(f"--scenario: none of {', '.join(c.name for c in CASES)} matches")
    results = []
    for case in cases:
        result = run_case(case, args.runs, args.seed, args.workers)
        print(f"{case.name}: {args.runs} runs in {result['elapsed_s']:.1f}s", flush=True)
        results.append(result)
    print_table(results, args.runs)
    if args.json:
        print(
            json.dumps(
                {"runs": args.runs, "calls_per_second": CALLS_PER_SECOND, "scenarios": results},
                sort_keys=True,
            )
        )
