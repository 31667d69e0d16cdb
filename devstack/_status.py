"""`outrider rollout status`: the collector's live evaluation as text or JSON. Pure: a
`RolloutStatus` in, lines (or a JSON-able dict) out, so it is unit-tested without a collector.

Words matter here: scripts and people grep this for "rolled back" and "promoted", so those
words appear only in the phase of a rollout that ended that way, never in gate text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from devstack._tenant_status import groups_view, scale_of, tenant_lines, time_scale_line
from outrider.v1 import admin_pb2, common_pb2, control_pb2

PHASES = {
    control_pb2.ROLLOUT_PHASE_SHADOW: "shadow",
    control_pb2.ROLLOUT_PHASE_SMOKE_TEST: "smoke test",
    control_pb2.ROLLOUT_PHASE_SWITCHED: "switched",
    control_pb2.ROLLOUT_PHASE_RUNNING: "running",
    control_pb2.ROLLOUT_PHASE_HOLD: "on hold",
    control_pb2.ROLLOUT_PHASE_NO_DATA: "no data (held)",
    control_pb2.ROLLOUT_PHASE_PROMOTED: "promoted",
    control_pb2.ROLLOUT_PHASE_ROLLED_BACK: "rolled back",
    control_pb2.ROLLOUT_PHASE_ABORTED: "aborted",
}
ENDED = frozenset(
    {
        control_pb2.ROLLOUT_PHASE_PROMOTED,
        control_pb2.ROLLOUT_PHASE_ROLLED_BACK,
        control_pb2.ROLLOUT_PHASE_ABORTED,
    }
)
_UNITS = {"pts": "% points", "ratio": "ratio", "score": "score", "events": "events", "share": "share"}
VERDICTS = {"harm": "harm", "no_harm": "no harm", "undecided": "undecided", "waiting": "waiting"}
TIMES = "\u00d7"  # the multiplication sign, before a ratio
_ROLES = {common_pb2.ROLE_STABLE: "stable", common_pb2.ROLE_CANARY: "candidate"}
# what the controller's own words become while a rollout is still running
_NEUTRAL = (("rolled back", "reverted"), ("promoted", "advanced"))


def in_shadow(state: control_pb2.RolloutState) -> bool:
    """The shadow phase, running or held (a held shadow keeps its `shadow_sample`)."""
    held = (control_pb2.ROLLOUT_PHASE_HOLD, control_pb2.ROLLOUT_PHASE_NO_DATA)
    shadow = control_pb2.ROLLOUT_PHASE_SHADOW
    return state.phase == shadow or (state.phase in held and state.shadow_sample > 0)


def _left(seconds: float) -> str:
    whole = max(round(seconds), 0)
    return f"{whole}s" if whole < 120 else f"{whole // 60}m{whole % 60:02d}s"


def blue_green_where(state: control_pb2.RolloutState, now_s: float) -> str:
    """Where a blue-green stands: its smoke tests, or how long blue stays warm."""
    if state.phase == control_pb2.ROLLOUT_PHASE_SMOKE_TEST:
        left = state.started_at_unix_nano / 1e9 + state.smoke.timeout_s - now_s
        tests = len(state.smoke.tests)
        return f"blue-green: smoke tests against green ({tests}, {_left(left)} left)"
    if state.phase == control_pb2.ROLLOUT_PHASE_SWITCHED:
        until = state.switched_at_unix_nano / 1e9 + state.keep_warm_s
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
        return f"blue-green: green serves new sessions, blue warm until {stamp} ({_left(until - now_s)})"
    return "blue-green"


def phase_label(phase: int) -> str:
    return PHASES.get(phase, "unknown")  # type: ignore[call-overload,no-any-return]


def _neutral(text: str, phase: int) -> str:
    if phase in ENDED:
        return text
    for word, instead in _NEUTRAL:
        text = text.replace(word, instead).replace(word.upper(), instead.upper())
    return text


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _duration(seconds: float) -> str:
    return (
        f"{seconds:g}s"
        if seconds < 120
        else f"{seconds / 60:g}m"
        if seconds < 7200
        else f"{seconds / 3600:g}h"
    )


def side_unit(metric: str) -> str:
    """The unit of the per-side figures (candidate_value, baseline_value) of a metric."""
    if metric.endswith("_ms"):
        return "ms"
    if metric.startswith("cost") or metric == "cost_ratio":
        return "USD"
    if metric.endswith("_rate"):
        return "%"
    return ""


def _side(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.2%}"
    if unit == "ms":
        return f"{value:.0f} ms"
    if unit == "USD":
        return f"${value:.4g}"
    return f"{value:.4g}"


def bounds_text(g: control_pb2.GateResult) -> str:
    """Estimate, confidence bounds and margin in the test's unit."""
    if g.unit == "pts":
        text = f"{g.estimate * 100:+.2f} [{g.lower * 100:+.2f}, {g.upper * 100:+.2f}] % points"
        return text + (f", margin {g.margin * 100:.2f} % points" if g.kind != "trigger" else "")
    if g.unit == "ratio":
        text = f"{TIMES}{g.estimate:.3f} [{TIMES}{g.lower:.3f}, {TIMES}{g.upper:.3f}]"
        return text + (f", margin {TIMES}{g.margin:.3f}" if g.kind != "trigger" else "")
    if g.unit == "share":
        return f"{g.estimate:.3f} [{g.lower:.3f}, {g.upper:.3f}], min {g.margin:.3f}"
    if g.unit == "score":
        return f"score drop {g.estimate:+.4f} [{g.lower:+.4f}, {g.upper:+.4f}], margin {g.margin:.4f}"
    if g.unit == "events":
        return (
            f"e-value {g.e_value:.2f} (harm at {1 / g.alpha:.0f})"
            if g.alpha > 0
            else f"e-value {g.e_value:.2f}"
        )
    return ""


def _window(g: control_pb2.GateResult, status: admin_pb2.RolloutStatus) -> str:
    seconds = status.figure_windows_s.get(g.name, 0.0)
    if g.kind == "trigger":
        return f"the last {_duration(seconds)}" if seconds else "the trigger's window"
    started = status.state.started_at_unix_nano / 1e9
    now = status.now_unix_nano / 1e9
    if started and now:
        return f"since the rollout started {_ago(now - started)} ago"
    return "since the rollout started"


def gate_view(g: control_pb2.GateResult, status: admin_pb2.RolloutStatus) -> dict[str, Any]:
    phase = status.state.phase
    # a proportion test (gates and triggers alike) compares shares of calls, whatever its metric
    unit = "%" if g.unit == "pts" else side_unit(g.metric or g.name.removeprefix("trigger:"))
    finite = all(math.isfinite(v) for v in (g.estimate, g.lower, g.upper))
    return {
        "name": g.name,
        "kind": g.kind or "gate",
        "metric": g.metric,
        "verdict": VERDICTS.get(g.verdict, g.verdict or "waiting"),
        "estimate": g.estimate if finite else None,
        "lower": g.lower if finite else None,
        "upper": g.upper if finite else None,
        "margin": g.margin,
        "unit": _UNITS.get(g.unit, g.unit),
        "bounds": bounds_text(g) if g.verdict not in ("waiting", "") and finite else "",
        "candidate": {"value": g.candidate_value, "samples": g.candidate_samples, "unit": unit},
        "stable": {"value": g.baseline_value, "samples": g.baseline_samples, "unit": unit},
        "on_harm": g.action,
        "waiting_for": _neutral(g.waiting_for, phase),
        "detail": _neutral(g.detail, phase),
        "window": _window(g, status),
    }


def version_view(
    m: admin_pb2.VersionMetrics, status: admin_pb2.RolloutStatus, labels: Mapping[str, str]
) -> dict[str, Any]:
    now = status.now_unix_nano / 1e9
    seen = m.last_seen_unix_nano / 1e9
    return {
        "role": _ROLES.get(m.role, "version"),
        "version_id": m.version_id,
        "label": labels.get(m.version_id, ""),
        "models": list(m.models),
        "last_seen_s_ago": (now - seen) if seen and now else None,
        "requests": m.requests,
        "errors": m.errors,
        "error_rate": m.error_rate,
        "latency_p95_ms": m.latency_p95_ms,
        "window_s": m.window_s,
    }


def status_view(status: admin_pb2.RolloutStatus, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The structured view that the text renders: for `--json` and `watch`. `labels` maps
    version ids to the labels a sidecar config gives them (the collector knows only ids)."""
    state = status.state
    return {
        "agent": state.agent,
        "rollout_id": state.rollout_id,
        "generation": state.generation,
        "phase": phase_label(state.phase),
        "ended": state.phase in ENDED,
        "step": state.step_index + 1,
        "shadow_phase": in_shadow(state),
        "shadow_sample": state.shadow_sample,
        "shadow": shadow_view(status.shadow) if status.HasField("shadow") else None,
        "step_count": state.step_count,
        "candidate_weight": state.candidate_weight,
        "reason": _neutral(state.reason, state.phase),
        "release": state.release,
        "decided_by": state.decided_by,
        "gates": [gate_view(g, status) for g in state.gate_results],
        "versions": [version_view(m, status, labels or {}) for m in status.metrics],
        "warnings": list(status.warnings) + _missing_warning(status),
        "collector_replica": status.collector_replica,
        "time_scale": scale_of(state.time_scale),
        "groups": groups_view(status),
    }


def shadow_view(s: admin_pb2.ShadowSummary) -> dict[str, Any]:
    return json_format.MessageToDict(
        s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def shadow_lines(s: admin_pb2.ShadowSummary) -> list[str]:
    """The shadow section of the text: every mirrored pair since the rollout started."""
    lines = [
        f"shadow      {s.pairs} pairs of {s.candidate_version_id} vs stable: tool agreement "
        f"{s.tool_agreement:.1%}, text similarity p10 {s.similarity_p10:.2f} p50 {s.similarity_p50:.2f} "
        f"(mean {s.similarity_mean:.2f})",
    ]
    if s.judged or s.judge_unparsed:
        lines.append(
            f"{'':<11} judge: {s.judged} pairs, score {s.judge_score:.3f} vs stable "
            f"{s.stable_judge_score:.3f}; prefers candidate {s.prefer_candidate:.0%}, stable "
            f"{s.prefer_stable:.0%}, tie {s.prefer_tie:.0%}; "
            f"{s.judge_unparsed} unparsed; judge cost ${s.judge_cost_usd:.4g}"
        )
    lines.append(
        f"{'':<11} errors {s.error_rate:.2%} vs stable {s.stable_error_rate:.2%}; latency "
        f"{s.latency_delta_ms:+.0f} ms (median); cost {s.cost_delta_usd:+.4g} USD/call; tokens "
        f"{s.tokens_delta:+.0f}/call; {s.intercepted_writes} intercepted writes"
    )
    return lines


def _missing_warning(status: admin_pb2.RolloutStatus) -> list[str]:
    if status.events_missing <= 0:
        return []
    return [
        f"{status.events_missing} events from this agent's sidecars never reached the collector: "
        "the evidence behind the gates has holes"
    ]


def status_json(status: admin_pb2.RolloutStatus, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`--json`: the admin API's answer as it is, plus the rendered view under `view`."""
    data = json_format.MessageToDict(status, preserving_proto_field_name=True)
    data["view"] = status_view(status, labels)
    return data


def render_status(
    status: admin_pb2.RolloutStatus, timeline: bool = True, labels: Mapping[str, str] | None = None
) -> list[str]:
    """The text of `outrider rollout status`."""
    view = status_view(status, labels)
    state = status.state
    if state.strategy == control_pb2.ROLLOUT_STRATEGY_BLUE_GREEN:
        where = blue_green_where(state, status.now_unix_nano / 1e9)
    elif view["shadow_phase"]:
        where = f"shadow phase ({view['shadow_sample']:.0%} of calls mirrored)"
    elif not view["step_count"]:
        where = "a pure shadow run"
    else:
        where = f"step {view['step']}/{view['step_count']}"
    scaled = time_scale_line(state.time_scale)
    lines = [f"*** {scaled} ***"] if scaled else []
    lines += [
        f"agent       {view['agent']}",
        f"rollout     {view['rollout_id']}  (generation {view['generation']}"
        + (
            f", decided by collector replica {view['collector_replica']})"
            if view["collector_replica"]
            else ")"
        ),
        f"phase       {view['phase']}  {where}  candidate weight {view['candidate_weight']:.0%}",
    ]
    if view["reason"]:
        lines.append(f"reason      {view['reason']}  (by {view['decided_by']})")
    if state.phase == control_pb2.ROLLOUT_PHASE_SWITCHED:  # blue-green: what the gates compare with
        lines += [
            f"baseline    {g.detail}" for g in state.gate_results if g.detail.startswith("no baseline")
        ][:1]
    if view["release"] and state.phase in (control_pb2.ROLLOUT_PHASE_HOLD, control_pb2.ROLLOUT_PHASE_NO_DATA):
        lines.append(f"released by {view['release']}")
    for v in view["versions"]:
        models = ", ".join(v["models"]) or "model not reported yet"
        seen = (
            "never seen" if v["last_seen_s_ago"] is None else f"last event {_ago(v['last_seen_s_ago'])} ago"
        )
        version = f"{v['version_id']} {v['label']}" if v["label"] else v["version_id"]
        lines.append(
            f"{v['role']:<11} {version}  ({models}; {seen})  last {_duration(v['window_s'] or 60)}: "
            f"{v['requests']} requests, {v['error_rate']:.2%} errors, p95 {v['latency_p95_ms']:.0f} ms"
        )
    lines.extend(tenant_lines(state, view["groups"]))
    if status.HasField("shadow"):
        lines.extend(shadow_lines(status.shadow))
    for warning in view["warnings"]:
        lines.append(f"WARNING     {warning}")
    for g in view["gates"]:
        if g["kind"] == "smoke":
            verdict = {"no harm": "PASSED", "harm": "FAILED"}.get(g["verdict"], g["verdict"].upper())
            lines.append(f"{'smoke':<11} {g['name']:<16} {verdict:<10} {g['detail']}")
            continue
        label = g["kind"] if g["kind"] in ("trigger", "shadow") else "gate"
        name = g["name"].removeprefix("trigger:")
        c, s = g["candidate"], g["stable"]
        lines.append(f"{label:<11} {name:<16} {g['verdict'].upper():<10} {g['bounds'] or '-'}")
        if g["kind"] == "shadow" and g["unit"] == "share":  # against a fixed bound: no stable side
            lines.append(
                f"{'':<11}   candidate {c['value']:.3f} over {c['samples']} pairs  window: {g['window']}"
            )
        else:
            lines.append(
                f"{'':<11}   candidate {_side(c['value'], c['unit'])} (n={c['samples']})  "
                f"stable {_side(s['value'], s['unit'])} (n={s['samples']})  window: {g['window']}"
            )
        if g["waiting_for"]:
            lines.append(f"{'':<11}   waits for {g['waiting_for']}")
        elif g["verdict"] == "harm" and g["on_harm"]:
            lines.append(f"{'':<11}   on harm: {g['on_harm']}")
    if timeline:
        for stage in status.timeline:
            lines.append(
                f"timeline    gen {stage.generation} step {stage.step_index + 1} "
                f"weight {stage.candidate_weight:.0%} {phase_label(stage.phase)}: "
                f"{_neutral(stage.reason, state.phase)} (by {stage.decided_by})"
            )
    return lines
