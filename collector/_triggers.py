"""Absolute triggers: the candidate's figure beyond a fixed limit, on the last minutes.

Noise must not fire them, so each fires only when an anytime-valid bound (the same
normal-mixture confidence sequence as the gates, at the trigger's share of alpha) lies beyond
the limit, after `min_samples`, and never while stable is beyond the same limit: then the
incident is not the candidate's.

    error_rate      candidate errors / requests over `window` above `limit`           rollback
    latency_p99_ms  share of calls slower than `limit` above 1 % over `window`, and
                    above it in each of the last `consecutive` minutes               rollback
    cost_ratio      spend per call above `limit` x stable's over `window`             hold
    judge_drop      judge score more than `limit` (a fraction) below stable's         rollback
"""

from __future__ import annotations

import math

from collector._evidence import (
    REQ,
    T_CALLS,
    T_ERR,
    T_REQ,
    T_SCORE,
    T_SCORE2,
    T_SCORES,
    T_SLOW,
    T_SPEND,
    T_SPEND2,
    FloatArray,
    RolloutEvidence,
)
from collector._gates import HARM, UNDECIDED, WAITING, design_effect
from collector._spec import RolloutSpec, Trigger
from collector.stats import msprt_half_width
from outrider.v1 import control_pb2

P99_SHARE = 0.01


def evaluate_triggers(
    spec: RolloutSpec, evidence: RolloutEvidence, now: float, alpha: float
) -> list[control_pb2.GateResult]:
    """Every enabled trigger's verdict now."""
    results = []
    deff = design_effect(evidence.family(REQ))
    for name, trigger in spec.triggers.active():
        result = control_pb2.GateResult(
            name=f"trigger:{name}",
            metric=name,
            limit=trigger.limit,
            margin=trigger.limit,
            alpha=alpha,
            kind="trigger",
            action=trigger.action,
            verdict=UNDECIDED,
        )
        window = evidence.window(now, trigger.window)
        if name == "error_rate":
            _share_above(result, window[:, T_ERR], window[:, T_REQ], trigger.limit, trigger, alpha, deff)
        elif name == "latency_p99_ms":
            _share_above(result, window[:, T_SLOW], window[:, T_CALLS], P99_SHARE, trigger, alpha, deff)
            if result.verdict == HARM and not _consecutive(evidence, now, trigger):
                result.verdict = UNDECIDED
                result.detail += f"; not yet above in {trigger.consecutive} consecutive minutes"
        elif name == "cost_ratio":
            _cost_ratio(result, window, trigger, alpha)
        elif name == "judge_drop":
            _judge_drop(result, window, trigger, alpha)
        results.append(result)
    return results


def _share_above(
    result: control_pb2.GateResult,
    hits: FloatArray,
    totals: FloatArray,
    limit: float,
    trigger: Trigger,
    alpha: float,
    deff: float,
) -> None:
    """A share (errors of requests, slow calls of calls) whose lower bound passes `limit`.

    Calls within a session are correlated, so both variances carry the design effect of the
    gates' evidence; and the candidate must also be above stable's own upper bound, so a
    stable that is itself near or past the limit never lets noise fire the trigger.
    """
    h0, h1 = float(hits[0]), float(hits[1])
    n0, n1 = float(totals[0]), float(totals[1])
    result.unit = "pts"
    result.candidate_samples, result.baseline_samples = int(n1), int(n0)
    if n1 < trigger.min_samples:
        result.verdict = WAITING
        result.waiting_for = f"{trigger.min_samples} candidate samples in {trigger.window:g}s (has {int(n1)})"
        result.detail = f"waiting for {result.waiting_for}"
        return
    p1 = h1 / n1
    p0 = (h0 + 0.5) / (n0 + 1)
    result.candidate_value, result.baseline_value, result.ready = p1, h0 / n0 if n0 else 0.0, True
    h1_width = msprt_half_width(deff * limit * (1 - limit) / n1, limit, alpha)
    h0_width = msprt_half_width(deff * p0 * (1 - p0) / n0, limit, alpha) if n0 else math.inf
    result.estimate, result.lower, result.upper = p1, p1 - h1_width, p1 + h1_width
    lower = p1 - h1_width
    if lower > limit and lower > p0 + h0_width and result.baseline_value <= limit:
        result.verdict = HARM
        result.detail = f"fired: candidate {p1:.2%} (lower bound {lower:.2%}) above {limit:.2%} and stable"
    else:
        suppressed = " (stable is near or beyond it too: suppressed)" if lower > limit else ""
        result.detail = f"quiet: candidate {p1:.2%} (lower bound {lower:.2%}), limit {limit:.2%}{suppressed}"


def _consecutive(evidence: RolloutEvidence, now: float, trigger: Trigger) -> bool:
    last = math.floor(now / 60.0)
    for minute in range(last - trigger.consecutive + 1, last + 1):
        bucket = evidence.minute(minute)
        calls = bucket[1, T_CALLS]
        if calls <= 0 or bucket[1, T_SLOW] / calls <= P99_SHARE:
            return False
    return True


def _cost_ratio(result: control_pb2.GateResult, window: FloatArray, trigger: Trigger, alpha: float) -> None:
    w = window  # (2, TCOLS)
    n0, n1 = float(w[0, T_CALLS]), float(w[1, T_CALLS])
    result.unit = "ratio"
    result.candidate_samples, result.baseline_samples = int(n1), int(n0)
    if min(n0, n1) < trigger.min_samples:
        result.verdict = WAITING
        result.waiting_for = f"{trigger.min_samples} calls per arm in {trigger.window:g}s"
        result.detail = f"waiting for {result.waiting_for}"
        return
    m0, m1 = float(w[0, T_SPEND]) / n0, float(w[1, T_SPEND]) / n1
    if m0 <= 0 or m1 <= 0:
        result.detail = "no spend recorded"
        return
    v0 = max(float(w[0, T_SPEND2]) / n0 - m0 * m0, 0.0) / n0
    v1 = max(float(w[1, T_SPEND2]) / n1 - m1 * m1, 0.0) / n1
    d, variance = math.log(m1 / m0), v0 / m0**2 + v1 / m1**2
    h = msprt_half_width(variance, math.log(trigger.limit), alpha)
    result.candidate_value, result.baseline_value, result.ready = m1, m0, True
    result.estimate, result.lower, result.upper = math.exp(d), math.exp(d - h), math.exp(d + h)
    if d - h > math.log(trigger.limit):
        result.verdict = HARM
        result.detail = (
            f"fired: spend per call x{result.estimate:.2f} (lower x{result.lower:.2f}) > x{trigger.limit:g}"
        )
    else:
        result.detail = f"quiet: spend per call x{result.estimate:.2f} (lower x{result.lower:.2f})"


def _judge_drop(result: control_pb2.GateResult, window: FloatArray, trigger: Trigger, alpha: float) -> None:
    w = window
    n0, n1 = float(w[0, T_SCORES]), float(w[1, T_SCORES])
    result.unit = "score"
    result.candidate_samples, result.baseline_samples = int(n1), int(n0)
    if min(n0, n1) < trigger.min_samples:
        result.verdict = WAITING
        result.waiting_for = f"{trigger.min_samples} scores per arm in {trigger.window:g}s"
        result.detail = f"waiting for {result.waiting_for}"
        return
    m0, m1 = float(w[0, T_SCORE]) / n0, float(w[1, T_SCORE]) / n1
    v0 = max(float(w[0, T_SCORE2]) / n0 - m0 * m0, 0.0) / n0
    v1 = max(float(w[1, T_SCORE2]) / n1 - m1 * m1, 0.0) / n1
    keep = 1 - trigger.limit
    d = keep * m0 - m1  # > 0: the candidate is more than `limit` below stable
    h = msprt_half_width(keep * keep * v0 + v1, max(trigger.limit * m0, 0.01), alpha)
    result.candidate_value, result.baseline_value, result.ready = m1, m0, True
    result.estimate, result.lower, result.upper = d, d - h, d + h
    if d - h > 0:
        result.verdict = HARM
        result.detail = f"fired: judge score {m1:.3f} more than {trigger.limit:.0%} below stable {m0:.3f}"
    else:
        result.detail = f"quiet: judge score {m1:.3f} vs stable {m0:.3f}"
