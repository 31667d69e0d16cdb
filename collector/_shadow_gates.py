"""Shadow gates: anytime-valid tests on the mirrored pairs, with the canary gates' verdicts.

Every pair is a paired observation (one stable call and its mirror), so each gate is a
one-sample test on a per-pair mean m (collector._shadow_evidence): the candidate's agreement or
similarity against a fixed `min`, or a paired difference (judge score, preference, error,
log latency or log cost) against 0 and the margin. One confidence sequence per gate, the same
as a canary gate's (`stats.scale_mixture_half_width`, mixed over scales from `tau` up), at the
gate's Bonferroni share of the spec's alpha (`RolloutSpec.test_alphas`). With the harm
d = min - m (fixed bound) or the signed difference d (paired), and h the half-width:

    harm      d - h > 0        evidence of harm: below `min`, or worse than stable
    no_harm   d + h < margin   margin 0 for a fixed bound (evidence m >= min)
    undecided otherwise        (waiting, before `min_samples` stable sessions)

The variance is the cluster-robust one over stable sessions (pairs of one session are
correlated), widened for a variance estimated from few sessions (a t tail), and never below a
lightly shrunk per-pair variance (two pseudo-pairs of the family's prior spread), so a run of
identical pairs is evidence, not certainty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from collector._gates import HARM, NO_HARM, UNDECIDED, WAITING, _small_sample
from collector._shadow_evidence import (
    AGREE,
    COST,
    ERR,
    JDELTA,
    LAT,
    NN,
    NS,
    PREF,
    SIM,
    SS,
    K,
    N,
    Q,
    S,
    ShadowEvidence,
)
from collector._shadow_spec import ShadowGate
from collector.stats import ratio_mean_variance, scale_mixture_half_width
from outrider.v1 import control_pb2

PRIOR_PAIRS = 2.0  # pseudo-pairs of prior spread in the per-pair variance floor
MIN_TAU = 0.01


@dataclass(frozen=True)
class _ShadowKind:
    family: int
    test: str  # "bound" (m against min), "paired" (d = sign · m against 0 and the margin)
    sign: float  # paired: d = sign · m is the harm
    unit: str
    prior_var: float  # a per-pair variance to shrink toward


SHADOW_METRICS: dict[str, _ShadowKind] = {
    "tool_agreement": _ShadowKind(AGREE, "bound", 1.0, "share", 0.25),
    "text_similarity": _ShadowKind(SIM, "bound", 1.0, "share", 0.25),
    "judge_score": _ShadowKind(JDELTA, "paired", -1.0, "score", 0.25),
    "judge_preference": _ShadowKind(PREF, "paired", 1.0, "pts", 1.0),
    "shadow_error_rate": _ShadowKind(ERR, "paired", 1.0, "pts", 0.25),
    "latency_ratio": _ShadowKind(LAT, "paired", 1.0, "ratio", 0.25),
    "cost_ratio": _ShadowKind(COST, "paired", 1.0, "ratio", 0.25),
}


def shadow_margin(gate: ShadowGate) -> float:
    """The no-harm bound on the test's scale: 0 for a fixed bound, log for a ratio."""
    kind = SHADOW_METRICS[gate.metric]
    if kind.test == "bound":
        return 0.0
    return math.log(gate.limit) if kind.unit == "ratio" else gate.limit


def shadow_tau(gate: ShadowGate) -> float:
    """The base of the mixing scales: the margin, or a quarter of the room around `min`."""
    kind = SHADOW_METRICS[gate.metric]
    if kind.test == "bound":
        return max(MIN_TAU, min(gate.limit, 1 - gate.limit) / 4)
    return max(MIN_TAU, shadow_margin(gate))


def pair_variance(sums: tuple[float, ...], alpha: float, prior_var: float) -> float:
    """The variance of a per-pair mean from (K, N, S, NN, SS, NS, Q), clustered by session."""
    k, n, s = sums[K], sums[N], sums[S]
    if k < 2 or n <= 0:
        return math.inf
    robust = ratio_mean_variance(int(k), n, s, sums[NN], sums[SS], sums[NS]) * _small_sample(k, alpha)
    per_pair = (max(sums[Q] - s * s / n, 0.0) + PRIOR_PAIRS * prior_var) / (n - 1 + PRIOR_PAIRS)
    return max(robust, per_pair / n)


def evaluate_shadow_gate(gate: ShadowGate, evidence: ShadowEvidence, alpha: float) -> control_pb2.GateResult:
    """One shadow gate's verdict on the pairs so far, as a GateResult of kind "shadow"."""
    kind = SHADOW_METRICS[gate.metric]
    result = control_pb2.GateResult(
        name=gate.name,
        metric=gate.metric,
        limit=gate.limit,
        margin=gate.limit,
        unit=kind.unit,
        alpha=alpha,
        kind="shadow",
        action=gate.on_failure,
    )
    sums = evidence.family(kind.family)
    result.candidate_samples = result.baseline_samples = int(sums[N])
    if sums[K] < gate.min_samples:
        result.verdict = WAITING
        result.waiting_for = f"pairs from {gate.min_samples} stable sessions (has {int(sums[K])})"
        result.detail = f"waiting for {result.waiting_for}"
        return result
    variance = pair_variance(sums, alpha, kind.prior_var)
    h = scale_mixture_half_width(variance, shadow_tau(gate), alpha)
    mean = sums[S] / sums[N]
    d = gate.limit - mean if kind.test == "bound" else kind.sign * mean
    margin = shadow_margin(gate)
    result.ready = True
    if kind.test == "bound":
        result.estimate, result.lower, result.upper = mean, mean - h, mean + h
    elif kind.unit == "ratio":
        result.estimate, result.lower, result.upper = math.exp(d), math.exp(d - h), math.exp(d + h)
    else:
        result.estimate, result.lower, result.upper = d, d - h, d + h
    result.candidate_value, result.baseline_value = _sides(gate, evidence, mean)
    if d - h > 0:
        result.verdict = HARM
        result.detail = f"harm: {_fmt(result)}"
    elif d + h < margin:
        result.verdict, result.passed = NO_HARM, True
        result.detail = f"passed: {_fmt(result)}"
    else:
        result.verdict = UNDECIDED
        result.waiting_for = "more pairs: the bounds still straddle the limit"
        result.detail = f"undecided: {_fmt(result)}"
    return result


def evaluate_shadow_gates(
    gates: list[ShadowGate], evidence: ShadowEvidence, alpha: float
) -> list[control_pb2.GateResult]:
    return [evaluate_shadow_gate(g, evidence, alpha) for g in gates]


def _sides(gate: ShadowGate, evidence: ShadowEvidence, mean: float) -> tuple[float, float]:
    """(candidate, stable) figures in the metric's own terms, for status."""
    if gate.metric == "judge_score" and evidence.judged:
        return evidence.judge_scores[1] / evidence.judged, evidence.judge_scores[0] / evidence.judged
    if gate.metric == "shadow_error_rate":
        compared = max(evidence.pairs - evidence.excluded, 1)
        return evidence.errors[1] / compared, evidence.errors[0] / compared
    if gate.metric == "judge_preference" and evidence.judged:
        prefs, judged = evidence.preferences, evidence.judged
        return prefs["candidate"] / judged, prefs["stable"] / judged
    return mean, 0.0


def _fmt(result: control_pb2.GateResult) -> str:
    if result.unit == "share":
        return (
            f"{result.metric.replace('_', ' ')} {result.estimate:.3f} "
            f"[{result.lower:.3f}, {result.upper:.3f}], "
            f"min {result.limit:.3f} over {result.candidate_samples} pairs"
        )
    if result.unit == "pts":
        return (
            f"{result.estimate * 100:+.2f} pts [{result.lower * 100:+.2f}, {result.upper * 100:+.2f}], "
            f"margin {result.margin * 100:.2f} pts over {result.candidate_samples} pairs"
        )
    if result.unit == "ratio":
        return (
            f"x{result.estimate:.3f} [x{result.lower:.3f}, x{result.upper:.3f}], margin x{result.margin:.3f} "
            f"over {result.candidate_samples} pairs"
        )
    return (
        f"judge score drop {result.estimate:+.4f} [{result.lower:+.4f}, {result.upper:+.4f}], margin "
        f"{result.margin:.4f} over {result.candidate_samples} judged pairs"
    )
