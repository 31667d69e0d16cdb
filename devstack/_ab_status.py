"""The A/B test section of `outrider rollout status` (and `rollout show`): per-variant figures
and the analysis kept on the state (`RolloutState.ab`, collector._ab_phase). Pure."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format

from outrider.v1 import control_pb2

_SHARE_METRICS = frozenset({"task_success", "thumbs_up_rate"})


def ab_view(ab: control_pb2.ABAnalysis) -> dict[str, Any]:
    return json_format.MessageToDict(
        ab, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _value(metric: str, value: float) -> str:
    return f"{value:.2%}" if metric in _SHARE_METRICS else f"{value:.4g}"


def _effect(metric: str, value: float) -> str:
    if not math.isfinite(value):
        return "-inf" if value < 0 else "+inf"
    return f"{value * 100:+.2f} pts" if metric in _SHARE_METRICS else f"{value:+.4g}"


def ab_lines(ab: control_pb2.ABAnalysis) -> list[str]:
    """The text: the verdict, one line per variant, one per comparison."""
    metric = ab.primary_metric
    verdict = ab.verdict.replace("_", " ") + (f" {ab.winner}" if ab.winner else "")
    lines = [
        f"a/b test    {metric}, {ab.method}: {verdict}; planned {ab.planned_units} samples per variant; "
        f"SRM p={ab.srm_p_value:.3g}" + (f"  ({ab.detail})" if ab.detail else "")
    ]
    for i, v in enumerate(ab.variants):
        role = "control" if i == 0 else "variant"
        failed = f"  guardrails failed: {', '.join(v.guardrails_failed)}" if v.guardrails_failed else ""
        lines.append(
            f"{role:<11} {v.name:<4} {v.version_id}  weight {v.weight:.0%}  {v.units} users, "
            f"{v.samples} samples, {metric} {_value(metric, v.value)}{failed}"
        )
    for c in ab.comparisons:
        test = f"e-value {c.e_value:.3g}" if ab.method == "sequential" else f"p={c.p_value:.3g}"
        lines.append(
            f"{'compare':<11} {c.variant} - {c.against}: {_effect(metric, c.effect)} "
            f"[{_effect(metric, c.lower)}, {_effect(metric, c.upper)}]  {test}"
            + ("  significant" if c.significant else "")
        )
    return lines
