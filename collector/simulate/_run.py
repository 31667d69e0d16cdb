"""The decisions simulator: the collector's own evidence and controller on a virtual clock.

Each run starts the rollout, then every `look_interval` draws that tick's synthetic traffic
(`_traffic`), adds it to a `RolloutEvidence` through the same batch path the collector's
ingest uses, and lets the `RolloutController` decide. A run ends when the rollout ends, holds,
or reaches `max_virtual_time`. Beside it, on the same draws, two baselines: an oracle (a Wald
SPRT of "no difference" against the true effect, knowing both) and a fixed-horizon two-sample
test at the same per-gate alpha with 97.5 % planned power.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from collector._book import EvidenceBook
from collector._evidence import Rows
from collector._rollout import HOLD, NO_DATA, PROMOTED, ROLLED_BACK, RolloutController
from collector._spec import RolloutSpec, load_spec_text
from collector.simulate._traffic import Drawn, Traffic, draw_tick, due_rows
from collector.stats import fixed_horizon_n_means, fixed_horizon_n_proportions, two_proportion_ztest
from outrider.v1 import control_pb2

DEFAULT_MAX_VIRTUAL_TIME_S = 7 * 86400.0
PLANNED_POWER = 0.975
# which traffic key moves which oracle metric
ORACLE_KEYS = (
    "error_rate",
    "task_success",
    "latency_p50_ms",
    "cost_per_call_usd",
    "judge_score",
    "safety_rate",
)


@dataclass(frozen=True)
class Scenario:
    spec_yaml: str
    baseline: Traffic
    candidate: Traffic
    calls_per_second: float
    max_virtual_time_s: float = DEFAULT_MAX_VIRTUAL_TIME_S

    @property
    def spec(self) -> RolloutSpec:
        """The spec's canary stages: a shadow phase has no synthetic pairs here, so it is left
        out (its gates' share of alpha goes to the canary gates: conservative for false rollbacks)."""
        spec = load_spec_text(self.spec_yaml, "<simulated spec>")
        if spec.shadow is None:
            return spec
        if not spec.steps:
            raise ValueError("a pure shadow run has no canary stages to simulate (see `rollout plan`)")
        return spec.model_copy(update={"shadow": None})

    @property
    def effect_key(self) -> str | None:
        for key in ORACLE_KEYS:
            if getattr(self.baseline, key) != getattr(self.candidate, key):
                return key
        return None


@dataclass
class RunResult:
    outcome: str  # rolled_back, promoted, held, undecided
    decided_s: float | None
    candidate_calls: int
    gate: str | None = None
    metric: str | None = None
    oracle_calls: int | None = None
    fixed_rejected: bool | None = None
    fixed_candidate_calls: int | None = None
    fixed_s: float | None = None


@dataclass
class _Side:
    """Per-arm running sums for the fixed-horizon baseline's metric."""

    n: list[float] = field(default_factory=lambda: [0.0, 0.0])
    s: list[float] = field(default_factory=lambda: [0.0, 0.0])
    ss: list[float] = field(default_factory=lambda: [0.0, 0.0])


def _observations(key: str | None, drawn: Drawn) -> np.ndarray:
    if key == "error_rate" or key is None:
        return drawn.errors
    if key == "task_success":
        return drawn.tasks
    if key == "latency_p50_ms":
        return drawn.log_latency
    if key == "cost_per_call_usd":
        return drawn.log_cost
    if key == "judge_score":
        return drawn.scores
    return np.concatenate([np.ones(drawn.safety), np.zeros(max(drawn.calls - drawn.safety, 0))])


def _oracle_increments(key: str, base: Traffic, cand: Traffic, x: np.ndarray) -> np.ndarray:
    """Wald SPRT log-likelihood-ratio increments of candidate observations, H1 (true) vs H0."""
    if key in ("error_rate", "safety_rate", "task_success"):
        if key == "task_success":
            p0, p1 = 1 - base.task_success, 1 - cand.task_success
        else:
            p0, p1 = getattr(base, key), getattr(cand, key)
        p0, p1 = max(p0, 1e-9), max(p1, 1e-9)
        return np.where(x > 0, math.log(p1 / p0), math.log((1 - p1) / (1 - p0)))
    if key == "judge_score":
        m0, m1, sd = base.judge_score, cand.judge_score, base.judge_sd
    elif key == "latency_p50_ms":
        m0, m1, sd = math.log(base.latency_p50_ms), math.log(cand.latency_p50_ms), base.latency_sigma
    else:
        m0, m1, sd = math.log(base.cost_per_call_usd), math.log(cand.cost_per_call_usd), base.latency_sigma
    return ((x - m0) ** 2 - (x - m1) ** 2) / (2 * sd * sd)


def _fixed_n(key: str | None, base: Traffic, cand: Traffic, alpha: float) -> int:
    if key is None:  # identical: the task test sized for a 5-point drop
        return fixed_horizon_n_proportions(1 - base.task_success, 0.05, alpha, PLANNED_POWER)
    if key in ("error_rate", "safety_rate", "task_success"):
        if key == "task_success":
            p0, p1 = 1 - base.task_success, 1 - cand.task_success
        else:
            p0, p1 = getattr(base, key), getattr(cand, key)
        p0 = max(p0, 1e-4)
        return fixed_horizon_n_proportions(p0, p1 - p0, alpha, PLANNED_POWER)
    if key == "judge_score":
        return fixed_horizon_n_means(base.judge_sd, cand.judge_score - base.judge_score, alpha, PLANNED_POWER)
    m = "latency_p50_ms" if key == "latency_p50_ms" else "cost_per_call_usd"
    delta = math.log(getattr(cand, m) / getattr(base, m))
    return fixed_horizon_n_means(base.latency_sigma, delta, alpha, PLANNED_POWER)


def _fixed_test(key: str | None, side: _Side, alpha: float) -> bool:
    """The one look of the fixed-horizon test: harm at two-sided `alpha`."""
    n0, n1 = side.n
    if key in (None, "error_rate", "safety_rate", "task_success"):
        z, p = two_proportion_ztest(round(side.s[0]), round(n0), round(side.s[1]), round(n1))
        return p < alpha and z > 0
    m0, m1 = side.s[0] / n0, side.s[1] / n1
    v0 = max(side.ss[0] / n0 - m0 * m0, 1e-12) / n0
    v1 = max(side.ss[1] / n1 - m1 * m1, 1e-12) / n1
    z = (m1 - m0) / math.sqrt(v0 + v1)
    if key == "judge_score":
        z = -z
    return z > statistics.NormalDist().inv_cdf(1 - alpha / 2)


def run_once(scenario: Scenario, seed: int | np.random.SeedSequence) -> RunResult:
    """One simulated rollout."""
    rng = np.random.default_rng(seed)
    spec = scenario.spec
    ctl = RolloutController(spec.agent)
    book = EvidenceBook()
    state = ctl.start(spec, scenario.spec_yaml, 0.0)
    evidence = book.sync(state, spec)
    assert evidence is not None
    gate_alpha, _ = spec.test_alphas()
    key = scenario.effect_key
    traffic = (scenario.baseline, scenario.candidate)
    fixed_n = _fixed_n(key, scenario.baseline, scenario.candidate, gate_alpha)
    side, llr = _Side(), 0.0
    result: RunResult | None = None
    fixed: tuple[bool, int, float] | None = None
    oracle_calls: int | None = None
    pending: list[tuple[float, Rows]] = []
    t, tick, unit, candidate_calls = 0.0, spec.look_interval, 0, 0
    weight = state.candidate_weight
    while t < scenario.max_virtual_time_s:
        rows = Rows()
        unit, drawn = draw_tick(rng, traffic, weight, t, tick, scenario.calls_per_second, unit, rows, pending)
        if pending:
            pending = due_rows(pending, t + tick, rows)
        t += tick
        candidate_calls += drawn[1].calls
        if key is not None and oracle_calls is None:
            llr += float(_oracle_increments(key, *traffic, _observations(key, drawn[1])).sum())
            if llr >= math.log(1 / gate_alpha):
                oracle_calls = candidate_calls
        _track(side, key, drawn)
        if fixed is None and min(side.n) >= fixed_n:
            fixed = (_fixed_test(key, side, gate_alpha), candidate_calls, t)
        if result is None:
            evidence.add(rows, t)
            new = ctl.decide(evidence, t)
            if new is not None:
                ctl.apply(new)
                book.sync(new, spec)
                result = _ended(new, ctl, t, candidate_calls)
                if result is None:  # after the end, traffic goes on at the last split for the baselines
                    weight = new.candidate_weight
        if result is not None and (fixed is not None or result.outcome == "held"):
            break
    if result is None:
        phase = ctl.state.phase if ctl.state is not None else None
        result = RunResult("held" if phase in (HOLD, NO_DATA) else "undecided", None, candidate_calls)
    if fixed is not None:
        result.fixed_rejected, result.fixed_candidate_calls, result.fixed_s = fixed
    if result.outcome == "rolled_back" and oracle_calls is not None:
        result.oracle_calls = oracle_calls
    return result


def _track(side: _Side, key: str | None, drawn: tuple[Drawn, Drawn]) -> None:
    for arm in (0, 1):
        x = _observations(key, drawn[arm])
        side.n[arm] += len(x)
        side.s[arm] += float(x.sum())
        side.ss[arm] += float((x * x).sum())


def _ended(state: control_pb2.RolloutState, ctl: RolloutController, t: float, calls: int) -> RunResult | None:
    if state.phase == ROLLED_BACK:
        harmed = [r for r in ctl.evaluation if r.verdict == "harm" and r.action == "rollback"]
        first = harmed[0] if harmed else None
        return RunResult(
            "rolled_back", t, calls, first.name if first else None, first.metric if first else None
        )
    if state.phase == PROMOTED:
        return RunResult("promoted", t, calls)
    if state.phase == HOLD:
        return RunResult("held", None, calls)
    return None


def _chunk(args: tuple[Scenario, list[np.random.SeedSequence]]) -> list[RunResult]:
    scenario, seeds = args
    return [run_once(scenario, s) for s in seeds]


def simulate(scenario: Scenario, runs: int, seed: int, workers: int | None = None) -> list[RunResult]:
    """`runs` independent rollouts; the same seed gives the same results, whatever `workers`."""
    seeds = np.random.SeedSequence(seed).spawn(runs)
    workers = max(1, min(workers or os.cpu_count() or 1, runs))
    if workers == 1:
        return [run_once(scenario, s) for s in seeds]
    chunks = [seeds[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_chunk, [(scenario, c) for c in chunks]))
    ordered: list[RunResult] = [None] * runs  # type: ignore[list-item]
    for i, part in enumerate(parts):
        for j, res in enumerate(part):
            ordered[i + j * workers] = res
    return ordered


def summarize(results: list[RunResult]) -> dict[str, Any]:
    """The `--json` object."""
    outcomes = Counter(r.outcome for r in results)
    decided = [r for r in results if r.decided_s is not None]
    rollbacks = [r for r in results if r.outcome == "rolled_back"]
    oracle = [r.oracle_calls for r in rollbacks if r.oracle_calls is not None]
    fixed = [r for r in results if r.fixed_rejected is not None]
    return {
        "runs": len(results),
        "rolled_back": outcomes["rolled_back"],
        "promoted": outcomes["promoted"],
        "held": outcomes["held"],
        "undecided": outcomes["undecided"],
        "rolled_back_by_gate": dict(Counter(r.gate or "?" for r in rollbacks)),
        "rolled_back_by_metric": dict(Counter(r.metric or "?" for r in rollbacks)),
        "median_decision_s": _median([r.decided_s for r in decided if r.decided_s is not None]),
        "median_candidate_calls": _median([float(r.candidate_calls) for r in decided]),
        "median_rollback_s": _median([r.decided_s for r in rollbacks if r.decided_s is not None]),
        "median_rollback_candidate_calls": _median([float(r.candidate_calls) for r in rollbacks]),
        "oracle_median_candidate_calls": _median([float(c) for c in oracle]),
        "fixed_horizon": {
            "runs": len(fixed),
            "rejected": sum(1 for r in fixed if r.fixed_rejected),
            "median_s": _median([r.fixed_s for r in fixed if r.fixed_s is not None]),
            "median_candidate_calls": _median([float(r.fixed_candidate_calls or 0) for r in fixed]),
        },
    }


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None
