"""The shadow phase of `outrider rollout plan`: how fast pairs arrive and when each shadow gate
can pass, from the plan's traffic (collector.simulate._traffic).

Pairs arrive at calls_per_second x sample / 100; the judge scores `judge_share` of them (the
judge gates count judged pairs). Each
gate is the one-sample test of collector._shadow_gates on n pairs, with the per-pair variance
of an identical candidate (a paired difference of two independent draws: twice one draw's
variance; the session design effect for errors) and, for the fixed-bound gates, an assumed
true level halfway between `min` and 1 (the plan cannot know the candidate's agreement). A
gate passes once h(V) + z_power·√V is within the distance to its bound, V = σ²·deff / n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

from collector._shadow_gates import SHADOW_METRICS, shadow_margin, shadow_tau
from collector._shadow_spec import Shadow, ShadowGate
from collector.simulate._traffic import Traffic
from collector.stats import scale_mixture_half_width

MAX_PAIRS = 10**9


@dataclass(frozen=True)
class ShadowGatePlan:
    name: str
    metric: str
    pairs: float | None  # pairs (judged pairs for a judge gate) for an identical (or, for a
    # bound, a halfway) candidate to pass
    assumed: str  # what the estimate assumes


@dataclass(frozen=True)
class ShadowPlan:
    sample: float  # % of calls mirrored
    pairs_per_second: float
    judge_scores_per_hour: float
    duration_s: float | None  # expected time to leave the shadow phase; None: never
    decided_by: str
    no_data: bool  # max_duration passes first
    max_duration_s: float | None
    gates: tuple[ShadowGatePlan, ...] = field(default_factory=tuple)


def _pair_model(gate: ShadowGate, traffic: Traffic) -> tuple[float, float, float, str]:
    """(per-pair variance, design effect, distance to the bound, assumption) of one gate."""
    kind = SHADOW_METRICS[gate.metric]
    s = traffic.session_calls
    if kind.test == "bound":
        level = (gate.limit + 1) / 2
        deff = 1 + (s - 1) * 0.1  # a modest within-session correlation: the plan's assumption
        return level * (1 - level), deff, level - gate.limit, f"true level {level:.3f}, ICC 0.1"
    margin = shadow_margin(gate)
    if gate.metric in ("judge_score", "judge_preference"):
        var = 2 * traffic.judge_sd**2 if gate.metric == "judge_score" else 0.5
        return var, 1.0, margin, "an identical candidate, independent judge draws"
    if gate.metric == "shadow_error_rate":
        p = traffic.error_rate
        deff = 1 + (s - 1) * p * (1 - p) * traffic.session_effect_sd**2
        return 2 * p * (1 - p), deff, margin, "an identical candidate, independent errors"
    return 2 * traffic.latency_sigma**2, 1.0, margin, "an identical candidate, independent draws"


def _pairs_to_pass(
    gate: ShadowGate, traffic: Traffic, alpha: float, power: float
) -> tuple[float | None, str]:
    var, deff, distance, assumed = _pair_model(gate, traffic)
    z = NormalDist().inv_cdf(power)

    def ok(n: float) -> bool:
        v = var * deff / n
        return scale_mixture_half_width(v, shadow_tau(gate), alpha) + z * math.sqrt(v) <= distance

    if distance <= 0 or not ok(MAX_PAIRS):
        return None, assumed
    lo, hi = 1.0, 2.0
    while not ok(hi):
        lo, hi = hi, hi * 2
    while hi - lo > max(1.0, 1e-3 * hi):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return max(hi, float(gate.min_samples) * traffic.session_calls), assumed


def plan_shadow(
    shadow: Shadow, calls_per_second: float, traffic: Traffic, alpha: float, power: float
) -> ShadowPlan:
    rate = calls_per_second * shadow.sample / 100
    gates = []
    waits = [
        (shadow.min_duration, "min_duration"),
        (shadow.min_pairs / rate, f"min_pairs {shadow.min_pairs}"),
    ]
    for gate in shadow.gates:
        pairs, assumed = _pairs_to_pass(gate, traffic, alpha, power)
        gates.append(ShadowGatePlan(gate.name, gate.metric, pairs, assumed))
        judged = gate.metric in ("judge_score", "judge_preference")
        gate_rate = rate * traffic.judge_share if judged else rate
        waits.append((math.inf if pairs is None else pairs / gate_rate, f"shadow gate {gate.name}"))
    duration, decided_by = max(waits, key=lambda w: w[0])
    return ShadowPlan(
        shadow.sample,
        rate,
        rate * 3600 * traffic.judge_share,
        duration if math.isfinite(duration) else None,
        decided_by,
        shadow.max_duration is not None and duration > shadow.max_duration,
        shadow.max_duration,
        tuple(gates),
    )


def format_shadow(plan: ShadowPlan, duration: str) -> list[str]:
    """The shadow lines of the `rollout plan` table (`duration` formats seconds)."""
    ends = "never" if plan.duration_s is None else duration
    lines = [
        f"shadow {plan.sample:>6g}% mirrored: {plan.pairs_per_second:.3g} pairs/s, "
        f"~{plan.judge_scores_per_hour:.0f} judge scores per hour; decides after {ends}, waiting for "
        f"{plan.decided_by}" + (" - NO_DATA after its max_duration" if plan.no_data else ""),
    ]
    for g in plan.gates:
        judged = "judged " if g.metric in ("judge_score", "judge_preference") else ""
        needed = "never" if g.pairs is None else f"{g.pairs:.0f} {judged}pairs"
        lines.append(f"  shadow gate {g.name:<12} {g.metric:<18} passes after {needed} ({g.assumed})")
    return [*lines, ""]
