"""Stage sizing you can read: what each stage of a spec can decide, at a traffic rate.

`plan(spec, calls_per_second, traffic)` is the maths of `outrider rollout plan`. It runs no
collector: it predicts, from the baseline traffic (`Traffic`, the simulator's `--baseline`),
what the gates of `collector._gates` will see.

- **Evidence accumulates** over the stages: stage i contributes c_i observations of a metric
  (calls x the metric's per-call share: `feedback_share` for task and thumbs, `judge_share`
  for scores, 1 / `session_calls` sessions for cost per session) split w_i : 1 - w_i between
  candidate and stable. The gates weight each stratum by W_i = n0·n1/(n0+n1) = c_i·w_i(1-w_i).
- **Variances**: a proportion p(1-p)(1/n0 + 1/n1) with the gate's lightly shrunk pooled p
  (and, under a regression, the pooled p the gate would see), times a design effect for
  calls within a session; log latency and log cost sigma²(1/n0 + 1/n1); a judge score
  judge_sd²(1/n0 + 1/n1). Stratified: V = Σ W_i² V_i / (Σ W_i)².
- **Detectable regression**: the smallest true harm δ with d - h > 0 with probability `power`
  at the gate's alpha: δ - z_power·√V(δ) >= h(V(δ)), h the mSPRT half-width with the gate's
  margin as the base of the mixing scales (`scale_mixture_detectable_effect` for means). It is a one-look
  bound at the end of the stage: the gate also gets every earlier look, so it is conservative.
- **Time to a decision**: an earlier stage advances at max(min_duration, min_samples / (R·w));
  the last stage also waits until an identical candidate is shown non-inferior on every gate
  with a margin with probability `power` (each gate: h(V) + z_power·√V <= margin).
- **Safety** (no margin): the smallest candidate rate that the count e-process flags with
  probability `power`, by Monte Carlo over Poisson event counts (fixed seed: deterministic).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from collector._gates import METRICS, margin_scale
from collector._spec import NO_MARGIN, Gate, RolloutSpec
from collector.simulate._shadow_plan import ShadowPlan, format_shadow, plan_shadow
from collector.simulate._traffic import Traffic
from collector.stats import DEFAULT_RATIOS, scale_mixture_detectable_effect, scale_mixture_half_width

PLANNED_POWER = 0.975
MAX_PLAN_S = 365 * 86400.0  # a last stage that needs longer than this "never" decides
_SAFETY_DRAWS = 4000
_SAFETY_SEED = 20240601


@dataclass(frozen=True)
class _Model:
    """One metric under the baseline traffic."""

    test: str  # "prop", "mean" or "count"
    per_call: float  # observations per call
    p: float = 0.0  # prop and count: the baseline rate
    sigma2: float = 0.0  # mean: the variance of one observation
    deff: float = 1.0  # prop: the design effect of clustering by session


@dataclass(frozen=True)
class GatePlan:
    """One gate at the end of one stage. `margin` and `detectable` are on the spec's scale:
    a fraction for `max_increase` (shown in pts), a ratio for `max_ratio`, a drop for
    `max_decrease`, a per-call rate increase for safety; `detectable` None: no power (no data)."""

    name: str
    metric: str
    unit: str  # "pts", "ratio", "score"
    margin: float | None
    detectable: float | None
    display: str
    stable_samples: float
    candidate_samples: float


@dataclass(frozen=True)
class StagePlan:
    index: int  # 1-based
    weight: float  # as written
    effective_weight: float  # the candidate's share, in [0, 1]
    final: bool
    duration_s: float | None  # expected time in the stage to its decision; None: never
    ends_at_s: float | None  # since the rollout started
    decided_by: str  # what the stage waits for longest
    no_data: bool  # its max_duration passes first: NO_DATA from then on (it keeps testing)
    max_duration_s: float | None
    candidate_calls: float  # in the stage
    judge_scores_per_hour: tuple[float, float] | None  # (stable, candidate), with a quality gate
    gates: tuple[GatePlan, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Plan:
    calls_per_second: float
    alpha: float
    gate_alpha: float
    trigger_alpha: float
    power: float
    stages: tuple[StagePlan, ...]
    notes: tuple[str, ...]
    shadow: ShadowPlan | None = None  # the shadow phase before the stages
    risk: str | None = None  # the spec's risk tier (collector._risk)
    time_scale: float = 1.0  # every stage and shadow duration is the spec's YAML x this (a demo)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _design_effect(traffic: Traffic, p: float, share: float, correlated: bool) -> float:
    """1 + (E[m²]/E[m] - 1)·ICC: m observations per session (1 + Poisson(session_calls - 1)
    calls, each observed with probability `share`), ICC ≈ p(1-p)·session_effect_sd² for a
    logit-normal session effect."""
    if not correlated or p <= 0:
        return 1.0
    s = traffic.session_calls
    m2_over_m = (1.0 - share) + share * ((s - 1.0) + s * s) / s
    return 1.0 + (m2_over_m - 1.0) * p * (1.0 - p) * traffic.session_effect_sd**2


def metric_model(metric: str, traffic: Traffic) -> _Model:
    """How one metric's observations arrive and vary under `traffic` (as the simulator draws)."""
    t = traffic
    if metric == "error_rate":
        tools = t.tool_failure_rate > 0  # the simulator makes one tool call per call then
        p = (t.error_rate + t.tool_failure_rate) / 2 if tools else t.error_rate
        return _Model("prop", 2.0 if tools else 1.0, p=p, deff=_design_effect(t, p, 1.0, True))
    if metric == "tool_failure_rate":
        return _Model("prop", 1.0, p=t.tool_failure_rate)
    if metric == "fallback_rate":
        return _Model("prop", 1.0, p=0.0)
    if metric == "task_failure_rate":
        p = 1.0 - t.task_success
        return _Model("prop", t.feedback_share, p=p, deff=_design_effect(t, p, t.feedback_share, True))
    if metric == "thumbs_down_rate":
        return _Model("prop", t.feedback_share, p=t.thumbs_down_rate)
    if metric in ("latency_p95_ms", "latency_p99_ms", "ttft_p95_ms", "cost_per_call"):
        return _Model("mean", 1.0, sigma2=t.latency_sigma**2)
    if metric == "cost_per_session":
        s = t.session_calls  # the squared CV of a session's spend (a sum of lognormal calls)
        cv2 = (s * math.expm1(t.latency_sigma**2) + s - 1.0) / (s * s)
        return _Model("mean", 1.0 / s, sigma2=cv2)
    if metric == "judge_score":
        return _Model("mean", t.judge_share, sigma2=t.judge_sd**2)
    if metric == "safety_event_rate":
        return _Model("count", 1.0, p=t.safety_rate + t.critical_safety_rate)
    raise ValueError(f"no planning model for metric {metric!r}")


Strata = list[tuple[float, float]]  # (observations c_i, candidate share w_i)


def _strata(stages: list[tuple[float, float]], rate: float) -> Strata:
    return [(rate * d, w) for d, w in stages if rate * d > 0]


def _arms(strata: Strata) -> tuple[float, float]:
    return float(sum(c * (1 - w) for c, w in strata)), float(sum(c * w for c, w in strata))


def _variances(model: _Model, strata: Strata, delta: float) -> tuple[float, float]:
    """(V the gate computes, V of d's sampling distribution) with a true harm `delta`."""
    weights = [c * w * (1 - w) for c, w in strata]
    total = sum(weights)
    if total <= 0:
        return math.inf, math.inf
    if model.test == "mean":
        v = model.sigma2 / total
        return v, v
    p0, p1 = model.p, model.p + delta
    shrunk = [(c * (p0 + delta * w) + 0.5) / (c + 1.0) for c, w in strata]  # the gate's pooled p
    pooled = sum(wt * q * (1 - q) for wt, q in zip(weights, shrunk, strict=True))
    spread = sum(c * w * (1 - w) * (p0 * (1 - p0) * w + p1 * (1 - p1) * (1 - w)) for c, w in strata)
    return pooled * model.deff / total**2, spread * model.deff / total**2


def detectable(model: _Model, strata: Strata, tau: float, alpha: float, power: float) -> float | None:
    """The smallest harm (on the test's scale) detected with `power` on these strata."""
    v, _ = _variances(model, strata, 0.0)
    if not math.isfinite(v) or v <= 0:
        return None
    if model.test == "mean":
        return scale_mixture_detectable_effect(v, tau, alpha, power)
    z = NormalDist().inv_cdf(power)

    def ok(delta: float) -> bool:
        v_test, v_true = _variances(model, strata, delta)
        return delta - z * math.sqrt(v_true) >= scale_mixture_half_width(v_test, tau, alpha)

    lo, hi = 0.0, 1.0 - model.p - 1e-9
    if hi <= 0 or not ok(hi):
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def non_inferior(model: _Model, strata: Strata, margin: float, alpha: float, power: float) -> bool:
    """An identical candidate shows d + h < margin with probability >= `power`."""
    v, _ = _variances(model, strata, 0.0)
    if not math.isfinite(v) or v <= 0:
        return False
    return scale_mixture_half_width(v, margin, alpha) + NormalDist().inv_cdf(power) * math.sqrt(v) <= margin


def safety_detectable(p0: float, strata: Strata, alpha: float, power: float) -> float | None:
    """The smallest increase of the per-call safety rate that the count e-process flags
    (e >= 1/alpha at the end) with probability `power`; strata count calls."""
    if not strata:
        return None
    calls = np.array([c for c, _ in strata])
    share = np.array([w for _, w in strata])
    ratios = np.asarray(DEFAULT_RATIOS)[:, None]
    step = np.log1p((ratios - 1.0) * share[None, :])  # (J, k)
    gain = np.log(ratios) - step
    threshold = -math.log(alpha)

    def power_at(p1: float) -> float:
        rng = np.random.default_rng(_SAFETY_SEED)
        stable = rng.poisson(p0 * calls * (1 - share), size=(_SAFETY_DRAWS, len(calls)))
        candidate = rng.poisson(p1 * calls * share, size=(_SAFETY_DRAWS, len(calls)))
        log_lr = candidate @ gain.T - stable @ step.T  # (D, J)
        log_e = np.logaddexp.reduce(log_lr, axis=1) - math.log(len(DEFAULT_RATIOS))
        return float(np.mean(log_e >= threshold))

    lo, hi = max(p0, 1e-9), 0.5
    if power_at(hi) < power:
        return None
    for _ in range(40):  # on the log scale: rates span decades
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if power_at(mid) >= power else (mid, hi)
    return hi - p0


def _gate_plan(
    gate: Gate, stages: list[tuple[float, float]], traffic: Traffic, r: float, alpha: float, power: float
) -> GatePlan:
    model = metric_model(gate.metric, traffic)
    strata = _strata(stages, r * model.per_call)
    n0, n1 = _arms(strata)
    unit = METRICS[gate.metric].unit
    unit = "pts" if unit in ("pts", "events") else unit
    margin = None if gate.metric in NO_MARGIN else gate.limit
    value: float | None
    if model.test == "count":
        value = safety_detectable(model.p, strata, alpha, power)
    elif n0 < gate.min_samples or n1 < gate.min_samples:
        value = None
    else:
        harm = detectable(model, strata, margin_scale(gate), alpha, power)
        value = None if harm is None else (math.exp(harm) if unit == "ratio" else harm)
    if value is None:
        display = "no power" if n1 >= gate.min_samples or model.test == "count" else "waiting"
    else:
        display = format_value(unit, value)
    return GatePlan(gate.name, gate.metric, unit, margin, value, display, n0, n1)


def format_value(unit: str, value: float) -> str:
    """A margin or a regression on the spec's scale, as people read it."""
    if unit == "pts":
        return f"+{value * 100:.2f} pts" if value >= 0.001 else f"+{value * 100:.3f} pts"
    if unit == "ratio":
        return f"x{value:.3f}"
    return f"-{value:.3f}"


def _ni_time(
    spec: RolloutSpec,
    earlier: list[tuple[float, float]],
    w: float,
    traffic: Traffic,
    r: float,
    alpha: float,
    power: float,
) -> tuple[float, str | None]:
    """Seconds into the last stage until every gate with a margin shows non-inferiority, and
    the slowest gate; inf when some gate never gets there within `MAX_PLAN_S`."""
    worst, by = 0.0, None
    for gate in spec.gates:
        if gate.metric in NO_MARGIN:
            continue
        model = metric_model(gate.metric, traffic)
        margin = margin_scale(gate)

        def ok(t: float, model: _Model = model, gate: Gate = gate, margin: float = margin) -> bool:
            strata = _strata([*earlier, (t, w)], r * model.per_call)
            n0, n1 = _arms(strata)
            return min(n0, n1) >= gate.min_samples and non_inferior(model, strata, margin, alpha, power)

        if ok(0.0):
            continue
        hi = 1.0
        while not ok(hi):
            hi *= 2
            if hi > MAX_PLAN_S:
                return math.inf, gate.name
        lo = hi / 2 if hi > 1 else 0.0
        while hi - lo > max(0.5, 1e-6 * hi):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        if hi > worst:
            worst, by = hi, gate.name
    return worst, by


def _to_look(t: float, look: float) -> float:
    """Decisions happen at looks: the first look at or after `t` (a stage takes one at least)."""
    return max(1, math.ceil(t / look - 1e-9)) * look if look > 0 else t


def plan(
    spec: RolloutSpec, calls_per_second: float, traffic: Traffic | None = None, power: float = PLANNED_POWER
) -> Plan:
    """What each stage of `spec` decides, and when, at `calls_per_second` of `traffic`."""
    if not (math.isfinite(calls_per_second) and calls_per_second > 0):
        raise ValueError(f"must be a finite number > 0, got {calls_per_second!r}")
    traffic = traffic or Traffic()
    traffic.validate()
    gate_alpha, trigger_alpha = spec.test_alphas()
    requests_per_call = 2.0 if traffic.tool_failure_rate > 0 else 1.0
    quality = any(g.metric == "judge_score" for g in spec.gates)
    done: list[tuple[float, float]] = []  # (duration, weight) of the stages so far
    shadow = None
    if spec.shadow is not None:
        shadow = plan_shadow(spec.shadow, calls_per_second, traffic, gate_alpha, power)
    # the stages begin when the shadow phase ends
    elapsed: float | None = 0.0 if shadow is None else shadow.duration_s
    stages: list[StagePlan] = []
    for i, step in enumerate(spec.steps):
        w = spec.effective_weight(i)
        final = i == len(spec.steps) - 1
        by_samples = step.min_samples / (calls_per_second * w * requests_per_call)
        waits = [
            (step.min_duration, f"min_duration {format_duration(step.min_duration)}"),
            (by_samples, f"min_samples {step.min_samples}"),
        ]
        if final and spec.gates:
            t_ni, slowest = _ni_time(spec, done, w, traffic, calls_per_second, gate_alpha, power)
            if slowest is not None:
                waits.append((t_ni, f"gate {slowest} (non-inferiority of an identical candidate)"))
        duration, decided_by = max(waits, key=lambda x: x[0])
        no_data = step.max_duration is not None and duration > step.max_duration
        stage_duration = _to_look(duration, spec.look_interval) if math.isfinite(duration) else None
        if stage_duration is not None:
            horizon = stage_duration
        else:  # never decides: the gates as they stand at max_duration (or the floor)
            stop = step.max_duration if step.max_duration is not None else max(step.min_duration, by_samples)
            horizon = _to_look(stop, spec.look_interval)
        done.append((horizon, w))
        gates = tuple(_gate_plan(g, done, traffic, calls_per_second, gate_alpha, power) for g in spec.gates)
        elapsed = None if elapsed is None or stage_duration is None else elapsed + stage_duration
        judge = None
        if quality:
            rate = calls_per_second * 3600.0 * traffic.judge_share
            judge = (rate * (1 - w), rate * w)
        stages.append(
            StagePlan(
                i + 1,
                step.weight,
                w,
                final,
                stage_duration,
                elapsed,
                decided_by,
                no_data,
                step.max_duration,
                calls_per_second * w * horizon,
                judge,
                gates,
            )
        )
    return Plan(
        calls_per_second,
        spec.alpha,
        gate_alpha,
        trigger_alpha,
        power,
        tuple(stages),
        tuple(_notes(spec, calls_per_second, done)),
        shadow,
        spec.risk,
        spec.time_scale,
    )


def _notes(spec: RolloutSpec, r: float, stages: list[tuple[float, float]]) -> list[str]:
    notes = []
    for gate in spec.gates:
        if gate.metric == "safety_event_rate" and gate.critical:
            needed, at = float(gate.critical_min_calls), 0.0
            for duration, w in stages:  # stable's calls reach critical_min_calls
                rate = r * (1 - w)
                if rate * duration >= needed:
                    at += needed / rate
                    break
                needed -= rate * duration
                at += duration
            notes.append(
                f"safety: a critical event ({', '.join(gate.critical)}) on the candidate rolls back at "
                f"once when stable had none in {gate.critical_min_calls} calls (~{format_duration(at)})"
            )
        if gate.metric == "ttft_p95_ms":
            notes.append(f"{gate.name}: time to first token planned with latency's sigma")
        if gate.metric == "tool_failure_rate":
            notes.append(f"{gate.name}: planned with one tool call per call")
    return notes


def format_duration(seconds: float | None) -> str:
    if seconds is None or math.isinf(seconds):
        return "never"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def time_scale_lines(time_scale: float, risk: str | None) -> list[str]:
    """The header lines naming the risk tier and, prominently, a `time_scale` below 1."""
    lines = (
        [f"risk tier {risk}: steps and shadow the spec leaves out are the tier's defaults"] if risk else []
    )
    if time_scale != 1.0:
        lines.append(
            f"*** TIME SCALE {time_scale:g}: every stage and shadow duration below is x{time_scale:g} "
            f"(4h shows as {format_duration(4 * 3600 * time_scale)}); a demo, not a real rollout ***"
        )
    return lines


def format_plan(result: Plan, source: str) -> list[str]:
    """The readable `rollout plan` table."""
    triggers = f", {result.trigger_alpha:.3g} per trigger" if result.trigger_alpha else ""
    lines = [
        f"rollout plan for {source} at {result.calls_per_second:g} calls/s",
        f"alpha {result.alpha:g} family-wise: {result.gate_alpha:.3g} per gate{triggers}; "
        f"power {result.power:.1%}",
        *time_scale_lines(result.time_scale, result.risk),
        "",
    ]
    if result.shadow is not None:
        lines += format_shadow(result.shadow, format_duration(result.shadow.duration_s))
    if result.stages:
        lines.append(
            f"{'stage':<6} {'weight':>7} {'effective':>9} {'decides after':>13} {'ends at':>9}  "
            f"{'cand. calls':>11}  waits for"
        )
    for st in result.stages:
        waits = st.decided_by
        if st.no_data:
            waits += f" - NO_DATA after its max_duration of {format_duration(st.max_duration_s)}"
        lines.append(
            f"{st.index:<6} {st.weight:>6g}% {st.effective_weight:>8.0%} "
            f"{format_duration(st.duration_s):>13} {format_duration(st.ends_at_s):>9}  "
            f"{st.candidate_calls:>11.0f}  {waits}"
        )
    if any(st.judge_scores_per_hour for st in result.stages):
        cells = [f"{js[0]:.0f}/{js[1]:.0f}" for st in result.stages if (js := st.judge_scores_per_hour)]
        lines.append("judge scores per hour (stable/candidate), by stage: " + ", ".join(cells))
    if result.stages and result.stages[0].gates:
        lines += ["", f"smallest regression detected with {result.power:.1%} power at the end of each stage:"]
        head = f"{'gate':<12} {'metric':<18} {'margin':>10}"
        lines.append(head + "".join(f" {'stage ' + str(st.index):>15}" for st in result.stages))
        for j, gate in enumerate(result.stages[0].gates):
            margin = "none" if gate.margin is None else format_value(gate.unit, gate.margin)
            row = f"{gate.name:<12} {gate.metric:<18} {margin:>10}"
            lines.append(row + "".join(f" {st.gates[j].display:>15}" for st in result.stages))
    return lines + [f"note: {n}" for n in result.notes]
