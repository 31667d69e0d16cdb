"""Gates: anytime-valid tests of the candidate against stable on the rollout's evidence.

Every gate is one confidence sequence (the normal-mixture mSPRT mixed over scales from the
margin up, `collector.stats._scales`) on the harm
d = candidate - stable (stable - candidate for a score), stratified by stage and clustered by
randomization unit. With h its half-width at the gate's alpha:

    harm      d - h > 0        evidence the candidate is worse: the gate's `on_failure`
    no_harm   d + h < margin   evidence any harm is below the margin: the last stage may promote
    undecided otherwise        (waiting, before `min_samples` per arm)

The coverage holds at every look at once, so looking every tick spends nothing more. Rates are
compared in points, magnitudes (latency, cost) as ratios on the log scale, a score by its drop.
Safety is a count: an e-process over safety events (harm at e >= 1/alpha), plus critical
categories, which roll back on the candidate's first event when stable had none over
`critical_min_calls`. Safety has no margin and never blocks a promotion.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist

from collector._evidence import CALL, COST, LAT, REQ, SCORE, SPEND, TASK, THUMB, TOOL, TTFT, RolloutEvidence
from collector._spec import NO_MARGIN, Gate
from collector.stats import proportion_difference_variance, ratio_mean_variance, scale_mixture_half_width
from outrider.v1 import control_pb2

HARM, NO_HARM, UNDECIDED, WAITING = "harm", "no_harm", "undecided", "waiting"
DEFF_MAX = 20.0  # the design effect of clustering, capped: a few huge sessions must not stall a gate
VARIANCE_FLOOR = 1e-12
NORMAL_MIN_EVENTS = 10.0  # the textbook np >= 10 for a normal approximation of a proportion


@dataclass(frozen=True)
class _Kind:
    test: str  # "prop", "log", "unit_mean", "drop", "count"
    family: int
    unit: str


METRICS: dict[str, _Kind] = {
    "error_rate": _Kind("prop", REQ, "pts"),
    "tool_failure_rate": _Kind("prop", TOOL, "pts"),
    "fallback_rate": _Kind("prop", CALL, "pts"),
    "task_failure_rate": _Kind("prop", TASK, "pts"),
    "thumbs_down_rate": _Kind("prop", THUMB, "pts"),
    "latency_p95_ms": _Kind("log", LAT, "ratio"),
    "latency_p99_ms": _Kind("log", LAT, "ratio"),
    "ttft_p95_ms": _Kind("log", TTFT, "ratio"),
    "cost_per_call": _Kind("log", COST, "ratio"),
    "cost_per_session": _Kind("unit_mean", SPEND, "ratio"),
    "judge_score": _Kind("drop", SCORE, "score"),
    "safety_event_rate": _Kind("count", REQ, "events"),
}


@dataclass(frozen=True)
class Estimate:
    """The stratified harm and its variance; observations n and units k per arm."""

    d: float
    variance: float
    n0: float
    n1: float
    k0: float = 0.0
    k1: float = 0.0


def margin_scale(gate: Gate) -> float:
    """The gate's margin on the scale the test runs on (log for ratios)."""
    if METRICS[gate.metric].unit == "ratio":
        return math.log(gate.limit)
    return gate.limit


def estimate(gate: Gate, evidence: RolloutEvidence, alpha: float) -> Estimate:
    """The harm over every stage with both arms, weighted by n0·n1/(n0+n1) per stage."""
    kind = METRICS[gate.metric]
    by_stratum = evidence.family(kind.family)  # [stratum][arm] -> [K, N, S, NN, SS, NS]
    deff = design_effect(by_stratum) if kind.test == "prop" else 1.0
    total_w = total_d = total_v = n0 = n1 = units0 = units1 = 0.0
    for a0, a1 in by_stratum:
        k0, nn0, s0, sq0 = a0[0], a0[1], a0[2], a0[4]
        k1, nn1, s1, sq1 = a1[0], a1[1], a1[2], a1[4]
        size0, size1 = (k0, k1) if kind.test == "unit_mean" else (nn0, nn1)
        if size0 <= 0 or size1 <= 0:
            continue
        if kind.test == "prop":
            d = s1 / nn1 - s0 / nn0
            v = proportion_difference_variance(s0, nn0, s1, nn1, deff)
            if min(nn0, nn1) * (s0 + s1 + 0.5) / (nn0 + nn1 + 1) < NORMAL_MIN_EVENTS:
                # too few expected events on an arm for the normal approximation (np >= 10)
                v = max(v, _unpooled_variance(s0, nn0, s1, nn1) * deff)
        elif kind.test == "unit_mean":
            m0, m1 = s0 / k0, s1 / k1
            if m0 <= 0 or m1 <= 0:
                continue
            d = math.log(m1 / m0)
            v = _unit_mean_variance(k0, s0, sq0) / m0**2 * _small_sample(k0, alpha) + _unit_mean_variance(
                k1, s1, sq1
            ) / m1**2 * _small_sample(k1, alpha)
        else:
            m0, m1 = s0 / nn0, s1 / nn1
            d = m0 - m1 if kind.test == "drop" else m1 - m0
            v = ratio_mean_variance(int(k0), *a0[1:]) * _small_sample(k0, alpha) + ratio_mean_variance(
                int(k1), *a1[1:]
            ) * _small_sample(k1, alpha)
        if not math.isfinite(v):
            continue
        # a metric that never varies (a flat price) is known exactly, not unknowable
        v = max(v, VARIANCE_FLOOR * (1 / size0 + 1 / size1))
        w = size0 * size1 / (size0 + size1)
        total_w += w
        total_d += w * d
        total_v += w * w * v
        n0 += size0
        n1 += size1
        units0 += k0
        units1 += k1
    if total_w <= 0:
        return Estimate(0.0, math.inf, n0, n1, units0, units1)
    return Estimate(total_d / total_w, total_v / total_w**2, n0, n1, units0, units1)


@functools.lru_cache(maxsize=4096)
def _t_widening(units: int, alpha: float) -> float:
    from scipy.stats import t  # type: ignore[import-untyped]  # slow to import: only when needed

    z = NormalDist().inv_cdf(1 - alpha / 2)
    return float((t.ppf(1 - alpha / 2, units - 1) / z) ** 2)


def _small_sample(k: float, alpha: float) -> float:
    """A variance estimated from k units is itself uncertain: a t tail with k - 1 degrees of
    freedom, not a normal one. Widen it by (t / z)^2 at the gate's alpha (1.19 at k = 30), with k
    rounded down to a quarter-octave grid (conservative, and the quantile is computed once)."""
    if k < 2:
        return math.inf
    if k >= 100_000:
        return 1.0
    grid_k = max(2, int(2 ** (math.floor(4 * math.log2(k)) / 4)))
    return _t_widening(grid_k, alpha)


def _unpooled_variance(y0: float, n0: float, y1: float, n1: float) -> float:
    """Each arm's own variance, Agresti-Caffo shrunk: with few events (a rare error), two on a
    small arm must not look like certainty, which the pooled rate alone would let them."""
    p0, p1 = (y0 + 1) / (n0 + 2), (y1 + 1) / (n1 + 2)
    return p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1


def _unit_mean_variance(k: float, s: float, ss: float) -> float:
    if k < 2:
        return math.inf
    return max(ss - s * s / k, 0.0) / (k - 1) / k


def design_effect(by_stratum: list[list[list[float]]]) -> float:
    """How much clustering by unit inflates a proportion's variance over the binomial one."""
    robust = naive = 0.0
    for arm in (0, 1):
        k, n, s, nn, ss, ns = (sum(stratum[arm][i] for stratum in by_stratum) for i in range(6))
        if k < 2 or n <= 0:
            return 1.0
        p = s / n
        robust += ratio_mean_variance(int(k), n, s, nn, ss, ns)
        naive += p * (1 - p) / n
    if naive <= 0 or not math.isfinite(robust):
        return 1.0
    return min(max(robust / naive, 1.0), DEFF_MAX)


def evaluate_gate(gate: Gate, evidence: RolloutEvidence, alpha: float) -> control_pb2.GateResult:
    """One gate's verdict on the evidence so far, as the GateResult the control topic carries."""
    kind = METRICS[gate.metric]
    result = control_pb2.GateResult(
        name=gate.name,
        metric=gate.metric,
        limit=gate.limit,
        margin=gate.limit,
        unit=kind.unit,
        alpha=alpha,
        kind="gate",
        action=gate.on_failure,
    )
    if kind.test == "count":
        return _safety(gate, evidence, alpha, result)
    est = estimate(gate, evidence, alpha)
    result.candidate_samples, result.baseline_samples = int(est.n1), int(est.n0)
    # the variances are estimated from units (sessions, users or tenants): wait for enough of them
    if min(est.k0, est.k1) < gate.min_samples or not math.isfinite(est.variance):
        result.verdict = WAITING
        result.waiting_for = (
            f"{gate.min_samples} units per arm (stable {int(est.k0)}, candidate {int(est.k1)})"
        )
        result.detail = f"waiting for {result.waiting_for}"
        return result
    margin = margin_scale(gate)
    h = scale_mixture_half_width(est.variance, margin, alpha)
    lower, upper = est.d - h, est.d + h
    to_unit = math.exp if kind.unit == "ratio" else float
    result.estimate, result.lower, result.upper = to_unit(est.d), to_unit(lower), to_unit(upper)
    result.candidate_value, result.baseline_value = _sides(gate, evidence)
    result.ready = True
    if lower > 0:
        result.verdict = HARM
        result.detail = f"harm: candidate worse than stable, {_fmt(result)}"
    elif upper < margin:
        result.verdict, result.passed = NO_HARM, True
        result.detail = f"no harm beyond the margin: {_fmt(result)}"
    else:
        result.verdict = UNDECIDED
        result.waiting_for = "more samples: the bounds still straddle 0 or the margin"
        result.detail = f"undecided: {_fmt(result)}"
    return result


def _sides(gate: Gate, evidence: RolloutEvidence) -> tuple[float, float]:
    """(candidate, stable) figures in the metric's own terms, for status."""
    kind = METRICS[gate.metric]
    values = []
    for arm in (1, 0):
        a = evidence.arm_sums(kind.family, arm)
        if kind.test == "unit_mean":
            values.append(a.s / a.k if a.k else 0.0)
        elif kind.test == "log":
            values.append(math.exp(a.s / a.n) if a.n else 0.0)
        else:
            values.append(a.s / a.n if a.n else 0.0)
    return values[0], values[1]


def _fmt(result: control_pb2.GateResult) -> str:
    if result.unit == "pts":
        return (
            f"{result.estimate * 100:+.2f} pts [{result.lower * 100:+.2f}, {result.upper * 100:+.2f}], "
            f"margin {result.margin * 100:.2f} pts"
        )
    if result.unit == "ratio":
        return (
            f"x{result.estimate:.3f} [x{result.lower:.3f}, x{result.upper:.3f}], margin x{result.margin:.3f}"
        )
    return (
        f"drop {result.estimate:+.4f} [{result.lower:+.4f}, {result.upper:+.4f}], margin {result.margin:.4f}"
    )


def _safety(
    gate: Gate, evidence: RolloutEvidence, alpha: float, result: control_pb2.GateResult
) -> control_pb2.GateResult:
    stable_requests = evidence.arm_sums(REQ, 0).n
    result.candidate_samples, result.baseline_samples = evidence.safety_events[1], evidence.safety_events[0]
    result.candidate_value, result.baseline_value = _rate(evidence, 1), _rate(evidence, 0)
    result.e_value = evidence.safety.e_value
    result.ready = True
    if (
        evidence.critical_events[1] > 0
        and evidence.critical_events[0] == 0
        and stable_requests >= gate.critical_min_calls
    ):
        result.verdict = HARM
        result.detail = (
            f"harm: {evidence.critical_events[1]} critical safety event(s) on the candidate, "
            f"none on stable in {int(stable_requests)} requests"
        )
    elif result.e_value >= 1 / alpha:
        result.verdict = HARM
        result.detail = (
            f"harm: safety events candidate {result.candidate_samples}, stable {result.baseline_samples}; "
            f"e-value {result.e_value:.1f} >= {1 / alpha:.0f}"
        )
    else:
        result.verdict = UNDECIDED
        result.detail = (
            f"no supported increase: events candidate {result.candidate_samples}, stable "
            f"{result.baseline_samples}; e-value {result.e_value:.2f} (harm at {1 / alpha:.0f})"
        )
    return result


def _rate(evidence: RolloutEvidence, arm: int) -> float:
    requests = evidence.arm_sums(REQ, arm).n
    return evidence.safety_events[arm] / requests if requests else 0.0


def blocks_promotion(gate: Gate, result: control_pb2.GateResult) -> bool:
    """Whether this gate still stands between the last stage and a promotion."""
    return gate.metric not in NO_MARGIN and result.verdict != NO_HARM
