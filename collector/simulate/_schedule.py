"""A spec's schedule without traffic: the shadow phase and stages with their minimum and maximum
durations and sample floors, as `outrider rollout plan --risk TIER` prints a tier's default plan
(collector._risk) before any sizing at a traffic rate."""

from __future__ import annotations

from collector._shadow_spec import SHADOW_LIMIT_KEY
from collector._spec import RolloutSpec
from collector.simulate._plan import format_duration, time_scale_lines


def format_schedule(spec: RolloutSpec, source: str) -> list[str]:
    """The readable schedule of `spec` (named `source`): what runs, for how long at least and at most."""
    lines = [f"schedule of {source}", *time_scale_lines(spec.time_scale, spec.risk), ""]
    if spec.shadow is not None:
        sh = spec.shadow
        lines.append(
            f"shadow {sh.sample:g}% mirrored: at least {format_duration(sh.min_duration)} and "
            f"{sh.min_pairs} pairs, NO_DATA after {_upto(sh.max_duration)}"
        )
        for g in sh.gates:
            lines.append(
                f"  shadow gate {g.name:<14} {g.metric:<18} {SHADOW_LIMIT_KEY[g.metric]} {g.limit:g}"
            )
        lines.append("")
    if spec.steps:
        lines.append(
            f"{'stage':<6} {'weight':>7} {'effective':>9} {'min_duration':>12} {'max_duration':>12} "
            f"{'min_samples':>11}"
        )
    for i, step in enumerate(spec.steps):
        final = i == len(spec.steps) - 1
        lines.append(
            f"{i + 1:<6} {step.weight:>6g}% {spec.effective_weight(i):>8.0%} "
            f"{format_duration(step.min_duration):>12} {_upto(step.max_duration):>12} "
            f"{step.min_samples:>11}" + ("  confirmation (non-inferiority on every gate)" if final else "")
        )
    if not spec.steps:
        lines.append("no canary stages: a pure shadow run")
    return lines


def _upto(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)
