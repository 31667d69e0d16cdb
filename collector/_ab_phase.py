"""The controller of an A/B test (`strategy: ab_test`): plan, looks, guardrails, SRM, the decision.

Called from `RolloutController.propose_start` (`start_ab` fills the first state) and `decide`
(`decide_ab`, every `look_interval`). `ab_look` is the one analysis step, shared with the
decisions simulator (collector.simulate._ab_sim), so what the simulator measures is what the
controller does:

1. **Sample ratio mismatch**, users per variant against the weights: the assignment is broken,
   so no comparison can be trusted: the test stops (ABORTED, the reason names the SRM), traffic
   back to the control. Checked at every look, so by an anytime-valid e-value (`srm_e_value`,
   at the library's 0.001); the chi-square p of `stats.sample_ratio_mismatch` is reported.
2. **Fixed** analysis: once every variant has the planned observations of the primary metric
   (`stats.plan_ab`'s fixed n, Holm across the k(k-1)/2 comparisons), one look decides: the
   winner, or none. **Sequential**: every look is valid (the confidence sequences at alpha/m):
   the first look with a winner stops; at its planned cap (`sequential_n`) without one: none.
3. Past `ab.max_duration` without a decision: no winner.

The primary metric is held at the spec's `alpha` (family-wise over the comparisons); the
guardrails (the spec's `gates`) test each variant against the control with the gates' own
alpha split. A variant with guardrail harm is reported (`guardrails_failed`) and cannot win:
the test goes on for the others; when every non-control variant has harm the test ends
ROLLED_BACK.

The end: `on_decision: promote_winner` with a winner that is not the control -> PROMOTED, the
winner as the state's candidate (the new stable, via the router's PROMOTED path). Otherwise
(report, no winner, the control won, SRM) -> ABORTED with the reason saying which, and every
new session goes back to the control. Variants that lose are retired with the usual drain.
Every state carries the latest analysis (`RolloutState.ab`), so the deployment record does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collector._ab_evidence import ABEvidence
from collector._evidence import RolloutEvidence
from collector._gates import HARM, evaluate_gate
from collector._rollout_state import ABORTED, CONTROLLER, PROMOTED, ROLLED_BACK, RUNNING, retired_after
from collector._rollout_state import ns as _ns
from collector._spec import RolloutSpec
from collector._triggers import evaluate_triggers
from collector.stats import (
    ABPlan,
    ABResult,
    VariantStats,
    analyze_fixed,
    analyze_sequential,
    plan_ab,
)
from collector.stats._ab import SRM_THRESHOLD, Metric
from outrider.v1 import common_pb2, control_pb2

RUNNING_VERDICT, WINNER, NO_WINNER, SRM = "running", "winner", "no_winner", "sample_ratio_mismatch"
SRM_PRIOR = 100.0  # the Dirichlet prior's concentration: deviations of about 1/sqrt(100) weigh most


@dataclass(frozen=True)
class Look:
    """One look's outcome: `verdict` (running, winner, no_winner, sample_ratio_mismatch)."""

    verdict: str
    result: ABResult | None
    winner: int | None
    srm_p_value: float
    detail: str


def ab_plan(spec: RolloutSpec) -> ABPlan:
    """The test's sample sizes per variant, from the primary metric's MDE and power."""
    ab = spec.ab
    assert ab is not None
    p = ab.primary
    return plan_ab(
        _metric(spec),
        mde=p.min_detectable_effect,
        alpha=spec.alpha,
        power=p.power,
        variants=len(ab.variants),
        baseline=p.baseline_rate if p.proportion else None,
        sd=p.sd,
        deff=p.deff,
    )


def srm_p_value(units: list[int], weights: list[float]) -> float:
    """The chi-square goodness-of-fit p of `stats.sample_ratio_mismatch`, in closed form for its
    1 to 4 degrees of freedom (scipy's call costs milliseconds, and the simulator looks often)."""
    total = float(sum(units))
    if total <= 0:
        return 1.0
    w_sum = math.fsum(weights)
    x = sum((u - total * w / w_sum) ** 2 / (total * w / w_sum) for u, w in zip(units, weights, strict=True))
    df = len(units) - 1
    half = math.exp(-x / 2)
    if df == 1:
        return math.erfc(math.sqrt(x / 2))
    if df == 2:
        return half
    if df == 3:
        return math.erfc(math.sqrt(x / 2)) + math.sqrt(2 * x / math.pi) * half
    return half * (1 + x / 2)


def srm_e_value(units: list[int], weights: list[float], concentration: float = SRM_PRIOR) -> float:
    """The anytime-valid sample-ratio-mismatch test: a Dirichlet-multinomial Bayes factor against
    the set weights (the prior's mean), a martingale under a healthy assignment.

    A chi-square p < 0.001 checked at every look would be crossed by chance over a long test
    (thousands of looks); by Ville's inequality this e-value ever reaches 1/0.001 with
    probability at most 0.001, however often it is looked at.
    """
    counts = [max(0, int(u)) for u in units]
    total = float(sum(counts))
    if total <= 0:
        return 1.0
    prior = [concentration * w for w in weights]
    log_e = math.lgamma(sum(prior)) - math.lgamma(sum(prior) + total)
    for c, a, w in zip(counts, prior, weights, strict=True):
        log_e += math.lgamma(a + c) - math.lgamma(a) - c * math.log(w)
    return math.inf if log_e > 700 else math.exp(log_e)


def _metric(spec: RolloutSpec) -> Metric:
    assert spec.ab is not None
    return "proportion" if spec.ab.primary.proportion else "magnitude"


def planned_samples(spec: RolloutSpec, plan: ABPlan | None = None) -> int:
    """Observations per variant the test runs to: the fixed n, or the sequential test's cap."""
    assert spec.ab is not None
    plan = plan or ab_plan(spec)
    return plan.fixed_n if spec.ab.analysis == "fixed" else plan.sequential_n


def ab_look(
    spec: RolloutSpec,
    stats: list[VariantStats],
    units: list[int],
    elapsed_s: float,
    harmed: frozenset[int] = frozenset(),
    plan: ABPlan | None = None,
) -> Look:
    """The analysis of one look (see the module doc); pure."""
    ab = spec.ab
    assert ab is not None
    p = ab.primary
    metric = _metric(spec)
    srm_p = srm_p_value(units, ab.weights())
    e_srm = srm_e_value(units, ab.weights())
    if e_srm >= 1.0 / SRM_THRESHOLD:
        shares = ", ".join(f"{v.name} {u}" for v, u in zip(ab.variants, units, strict=True))
        detail = f"sample ratio mismatch (chi-square p={srm_p:.2g}, e-value {e_srm:.3g}): users {shares}"
        return Look(SRM, None, None, srm_p, detail)
    planned = planned_samples(spec, plan)
    have = min(int(s.n) for s in stats)
    late = elapsed_s > ab.max_duration
    result: ABResult | None = None
    if ab.analysis == "fixed":
        if have < planned:
            if late:
                return Look(
                    NO_WINNER,
                    None,
                    None,
                    srm_p,
                    f"max_duration {ab.max_duration:g}s passed at {have} of {planned} planned samples",
                )
            return Look(RUNNING_VERDICT, None, None, srm_p, f"{have} of {planned} planned samples")
        result = analyze_fixed(stats, metric, spec.alpha, higher_is_better=p.higher_is_better)
    else:
        result = analyze_sequential(
            stats, metric, p.min_detectable_effect, spec.alpha, higher_is_better=p.higher_is_better
        )
    winner = result.winner
    if winner is not None and winner in harmed:
        blocked = f"; {ab.variants[winner].name} leads but failed a guardrail"
        winner = None
    else:
        blocked = ""
    if winner is not None:
        return Look(WINNER, result, winner, srm_p, f"{ab.variants[winner].name} wins at {have} samples")
    if ab.analysis == "fixed" or have >= planned or late:
        why = "at the planned sample" if have >= planned else f"max_duration {ab.max_duration:g}s passed"
        return Look(NO_WINNER, result, None, srm_p, f"no variant beats every other {why}{blocked}")
    return Look(RUNNING_VERDICT, result, None, srm_p, f"{have} samples, cap {planned}{blocked}")


def analysis_message(
    spec: RolloutSpec,
    look: Look,
    stats: list[VariantStats],
    units: list[int],
    guardrails: dict[int, list[str]],
    planned: int,
) -> control_pb2.ABAnalysis:
    """The analysis as the states and the record keep it."""
    ab = spec.ab
    assert ab is not None
    msg = control_pb2.ABAnalysis(
        primary_metric=ab.primary.metric,
        method=ab.analysis,
        verdict=look.verdict,
        winner=ab.variants[look.winner].name if look.winner is not None else "",
        planned_units=planned,
        srm_p_value=look.srm_p_value,
        detail=look.detail,
    )
    shares = ab.weights()
    for i, (variant, s, u) in enumerate(zip(ab.variants, stats, units, strict=True)):
        msg.variants.add(
            name=variant.name,
            version_id=variant.version,
            units=u,
            samples=round(s.n),
            value=_finite(s.mean),
            weight=shares[i],
            guardrails_failed=guardrails.get(i, []),
        )
    for c in look.result.comparisons if look.result is not None else ():
        msg.comparisons.add(
            variant=ab.variants[c.first].name,
            against=ab.variants[c.second].name,
            effect=_finite(c.effect.estimate),
            lower=_finite(c.effect.lower),
            upper=_finite(c.effect.upper),
            p_value=_finite(c.p_value) if c.p_value is not None else 0.0,
            e_value=_finite(c.e_value) if c.e_value is not None else 0.0,
            significant=c.significant,
        )
    return msg


def _finite(x: float) -> float:
    """NaN reads 0 on the wire; infinities stay (the proto double holds them)."""
    return 0.0 if math.isnan(x) else x


def start_ab(state: control_pb2.RolloutState, spec: RolloutSpec) -> None:
    """Make `propose_start`'s first state an A/B test's: the variants, the plan, its gates."""
    ab = spec.ab
    assert ab is not None
    plan = ab_plan(spec)
    state.strategy = control_pb2.ROLLOUT_STRATEGY_AB_TEST
    shares = ab.weights()
    state.variants.extend(
        control_pb2.Variant(name=v.name, version_id=v.version, weight=w)
        for v, w in zip(ab.variants, shares, strict=True)
    )
    state.candidate_weight = 1.0 - shares[0]
    split = "/".join(f"{v.weight:g}" for v in ab.variants)
    state.reason = (
        f"started: A/B test of {', '.join(v.name for v in ab.variants)} ({split}) on {ab.primary.metric}, "
        f"{ab.analysis}: {plan.fixed_n} samples per variant at a fixed horizon; sequential cap "
        f"{plan.sequential_n}, expected {plan.sequential_expected_n}"
    )
    waiting = [g for g in state.gate_results]
    del state.gate_results[:]
    for variant in ab.variants[1:]:
        for g in waiting:
            entry = state.gate_results.add()
            entry.CopyFrom(g)
            entry.name = f"{g.name}[{variant.name}]"
    stats = [VariantStats(0, 0, 0, 0, 0, 0) for _ in ab.variants]
    look = Look(RUNNING_VERDICT, None, None, 1.0, "not analysed yet")
    state.ab.CopyFrom(analysis_message(spec, look, stats, [0] * len(stats), {}, planned_samples(spec, plan)))


def decide_ab(
    state: control_pb2.RolloutState,
    spec: RolloutSpec,
    evidence: RolloutEvidence,
    now: float,
) -> tuple[list[control_pb2.GateResult], control_pb2.ABAnalysis | None, dict[str, Any] | None]:
    """One look: (guardrail results, the analysis, the change for `finish_ab` or None)."""
    ab = spec.ab
    assert ab is not None
    gate_alpha, trigger_alpha = spec.test_alphas()
    if not isinstance(evidence, ABEvidence) or state.phase != RUNNING:
        return [], None, None  # HOLD and NO_DATA: frozen until an operator resumes
    results: list[control_pb2.GateResult] = []
    guardrails: dict[int, list[str]] = {}
    for i, pair in enumerate(evidence.pairs, start=1):
        gates = [(g.name, evaluate_gate(g, pair, gate_alpha)) for g in spec.gates]
        # the absolute triggers watch every variant too (their harm is a guardrail's)
        triggers = (
            [(r.name, r) for r in evaluate_triggers(spec, pair, now, trigger_alpha)] if trigger_alpha else []
        )
        for name, result in gates + triggers:
            result.name = f"{name}[{ab.variants[i].name}]"
            results.append(result)
            if result.verdict == HARM:
                guardrails.setdefault(i, []).append(name)
    stats = evidence.variant_stats(ab.primary.metric)
    units = evidence.units()
    plan = ab_plan(spec)
    elapsed = now - state.started_at_unix_nano / 1e9
    look = ab_look(spec, stats, units, elapsed, frozenset(guardrails), plan)
    analysis = analysis_message(spec, look, stats, units, guardrails, planned_samples(spec, plan))
    names = {i: ab.variants[i].name for i in range(len(ab.variants))}
    if len(guardrails) == len(ab.variants) - 1:
        failed = "; ".join(f"{names[i]}: {', '.join(g)}" for i, g in sorted(guardrails.items()))
        analysis.verdict, analysis.detail = NO_WINNER, f"every variant failed a guardrail ({failed})"
        change = _end(ROLLED_BACK, f"A/B test rolled back: every variant failed a guardrail ({failed})")
        return results, analysis, {**change, "results": results, "analysis": analysis}
    if look.verdict == RUNNING_VERDICT:
        return results, analysis, None
    change = _change(results, analysis, look, spec)
    return results, analysis, change


def _change(
    results: list[control_pb2.GateResult], analysis: control_pb2.ABAnalysis, look: Look, spec: RolloutSpec
) -> dict[str, Any]:
    ab = spec.ab
    assert ab is not None
    names = {i: v.name for i, v in enumerate(ab.variants)}
    extra: dict[str, Any] = {"results": results, "analysis": analysis}
    if look.verdict == SRM:
        return {**_end(ABORTED, f"A/B test stopped: {look.detail}; traffic back to the control"), **extra}
    if look.verdict == NO_WINNER:
        return {**_end(ABORTED, f"A/B test ended with no winner: {look.detail}; the control stays"), **extra}
    assert look.winner is not None
    name = names[look.winner]
    if look.winner == 0:
        return {**_end(ABORTED, f"A/B test: winner {name} is the control; it stays ({look.detail})"), **extra}
    if ab.on_decision == "report":
        reason = f"A/B test: winner {name}, report only ({look.detail}); traffic back to the control"
        return {**_end(ABORTED, reason), **extra}
    promoted = _end(PROMOTED, f"A/B test: winner {name} promoted ({look.detail})", weight=1.0)
    return {**promoted, **extra, "winner": ab.variants[look.winner].version}


def _end(phase: int, reason: str, weight: float = 0.0) -> dict[str, Any]:
    return {"phase": phase, "weight": weight, "reason": reason, "release": ""}


def finish_ab(
    next_state: Callable[..., control_pb2.RolloutState],
    previous: control_pb2.RolloutState,
    change: dict[str, Any],
    drain_s: float,
    now: float,
) -> control_pb2.RolloutState:
    """The state `decide_ab`'s change makes (by the controller's `_next`): the analysis on it;
    at the end the winner as its candidate (so the router's PROMOTED path serves it), and every
    other non-control variant retired with drain (`_next` retires only the state's candidate)."""
    change = dict(change)
    analysis, winner = change.pop("analysis", None), change.pop("winner", None)
    new = next_state(previous, now, CONTROLLER, **change)
    if analysis is not None:
        new.ab.CopyFrom(analysis)
    if new.phase not in (PROMOTED, ABORTED, ROLLED_BACK):
        return new
    if winner is not None:
        new.candidate_version_id = winner
    listed = {e.version_id for e in new.retired if e.rollout_id == previous.rollout_id}
    losers = [
        v.version_id
        for v in previous.variants[1:]
        if v.version_id != new.candidate_version_id or new.phase != PROMOTED
    ]
    added = [
        control_pb2.RetiredVersion(
            version_id=version,
            drain_deadline_unix_nano=_ns(now + drain_s),
            reason="rolled_back" if new.phase == ROLLED_BACK else "aborted",
            rollout_id=previous.rollout_id,
        )
        for version in losers
        if version not in listed
    ]
    if added:
        entries = list(new.retired)
        del new.retired[:]
        new.retired.extend([*added, *retired_after(entries, now)])
    return new


def status_versions(state: control_pb2.RolloutState) -> list[tuple[str, common_pb2.Role.ValueType]]:
    """The (version, role) pairs whose figures `rollout status` shows: each variant of an A/B
    test (the control as stable), else stable and candidate."""
    if state.strategy == control_pb2.ROLLOUT_STRATEGY_AB_TEST and state.variants:
        return [
            (v.version_id, common_pb2.ROLE_STABLE if i == 0 else common_pb2.ROLE_VARIANT)
            for i, v in enumerate(state.variants)
        ]
    return [
        (state.stable_version_id, common_pb2.ROLE_STABLE),
        (state.candidate_version_id, common_pb2.ROLE_CANARY),
    ]
