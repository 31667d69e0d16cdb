"""Gate checks: the candidate against the stable baseline, over a rolling window."""

from __future__ import annotations

from typing import Protocol

from collector._spec import LIMIT_KEY, Gate, RolloutSpec
from collector._windows import WindowStats
from outrider.v1 import common_pb2, control_pb2


class StatsProvider(Protocol):
    """Where gates read rolling metrics; RollingWindows is one."""

    def snapshot(
        self, agent: str, version_id: str, role: int | None, window_s: float, now: float
    ) -> WindowStats: ...


def candidate_stats(stats: StatsProvider, spec: RolloutSpec, window_s: float, now: float) -> WindowStats:
    return stats.snapshot(spec.agent, spec.candidate, common_pb2.ROLE_CANARY, window_s, now)


def baseline_stats(stats: StatsProvider, spec: RolloutSpec, window_s: float, now: float) -> WindowStats:
    return stats.snapshot(spec.agent, spec.stable, common_pb2.ROLE_STABLE, window_s, now)


def metric_value(metric: str, stats: WindowStats) -> float:
    """A gate metric's value in a window."""
    if metric == "task_failure_rate":
        tasks = stats.task_successes + stats.task_failures
        return stats.task_failures / tasks if tasks else 0.0
    return float(getattr(stats, metric))


def metric_samples(metric: str, stats: WindowStats) -> int:
    """How many observations a gate metric rests on in a window."""
    if metric == "thumbs_down_rate":
        return stats.feedback_thumbs
    if metric == "task_failure_rate":
        return stats.task_successes + stats.task_failures
    if metric == "tool_failure_rate":
        return stats.tool_calls
    if metric in ("cost_per_call", "ttft_p95_ms", "fallback_rate"):
        return stats.calls
    if metric == "cost_per_session":
        return stats.sessions
    return stats.requests


def _value(gate: Gate, stats: WindowStats) -> float:
    return metric_value(gate.metric, stats)


def check_gate(
    gate: Gate, spec: RolloutSpec, stats: StatsProvider, now: float, rollout_age_s: float
) -> control_pb2.GateResult:
    """Judge one gate. Not ready (and not passed) until both sides have `min_samples`.

    When the stable side is thin in the gate's window (late steps send it little traffic),
    its baseline widens to everything seen since the rollout started.
    """
    candidate = candidate_stats(stats, spec, gate.window, now)
    baseline = baseline_stats(stats, spec, gate.window, now)
    if metric_samples(gate.metric, baseline) < gate.min_samples and rollout_age_s > gate.window:
        baseline = baseline_stats(stats, spec, rollout_age_s, now)
    cand_value, base_value = _value(gate, candidate), _value(gate, baseline)
    if gate.metric == "error_rate":
        limit = base_value + gate.limit
        rule = f"error rate {cand_value:.4f} vs baseline {base_value:.4f} (max increase {gate.limit:g})"
    elif gate.metric == "latency_p95_ms":
        limit = base_value * gate.limit
        rule = f"p95 {cand_value:.1f} ms vs baseline {base_value:.1f} ms (max ratio {gate.limit:g})"
    elif LIMIT_KEY[gate.metric] == "max_increase":
        limit = base_value + gate.limit
        rule = f"{gate.metric} {cand_value:.4f} vs baseline {base_value:.4f} (max increase {gate.limit:g})"
    else:
        limit = base_value * gate.limit
        rule = f"{gate.metric} {cand_value:.4g} vs baseline {base_value:.4g} (max ratio {gate.limit:g})"
    cand_samples, base_samples = metric_samples(gate.metric, candidate), metric_samples(gate.metric, baseline)
    ready = cand_samples >= gate.min_samples and base_samples >= gate.min_samples
    passed = ready and cand_value <= limit
    if not ready:
        detail = (
            f"waiting for {gate.min_samples} samples per side "
            f"(candidate {cand_samples}, baseline {base_samples})"
        )
    else:
        detail = ("pass: " if passed else "fail: ") + rule
    return control_pb2.GateResult(
        name=gate.name,
        metric=gate.metric,
        passed=passed,
        ready=ready,
        candidate_value=cand_value,
        baseline_value=base_value,
        limit=limit,
        candidate_samples=cand_samples,
        baseline_samples=base_samples,
        detail=detail,
    )
