"""Risk tiers: the default plan of a rollout spec that sets `risk:` (collector._spec validates).

    tier      what changed   shadow   canary stages (weight, min_duration)
    low       prompt wording none     1% 4h -> 25% 4h -> 100% 4h
    medium    a new tool     4d       1% 4h -> 5% 8h -> 25% 24h -> 50% 24h -> 100% 4h
    high      model swap     6d       as medium
    critical  architecture   14d      1% 2d -> 5% 4d -> 25% 7d -> 50% 7d -> 100% 7d

Durations are minimums. Every tier stage also waits for its evidence: `min_samples`
(`TIER_MIN_SAMPLES` candidate requests) and no evidence of harm to advance, and the 100 % stage
is the confirmation stage (it runs at 100 - `holdback` % and promotes only on non-inferiority).
Each tier stage's `max_duration` is `MAX_DURATION_FACTOR` (3) x its `min_duration`, and so is
the tier shadow's; past it without the evidence the rollout is NO_DATA (held, never promoted).

A tier's shadow phase mirrors `TIER_SHADOW_SAMPLE` % of stable's calls, needs
`DEFAULT_MIN_PAIRS` pairs, and is decided by `TIER_SHADOW_GATES`:

    tools           tool_agreement      min 0.9           tool decisions agree on >= 90 % of pairs
    shadow_errors   shadow_error_rate   max_increase 0.01 the candidate errs at most 1 pt more

How a spec's own fields combine with its tier (`apply_risk`, run before field validation):

- `steps` absent: the tier's stages. `steps` given (a list, even an empty one): the spec's list
  replaces the tier's whole, step for step as written (no tier `max_duration` or `min_samples`
  is added to them). `steps: []` with a shadow phase is a pure shadow run.
- `shadow` absent: the tier's shadow phase (none for `low`). `shadow: null`: no shadow phase.
  `shadow` a mapping: its keys win over the tier's shadow field by field, and the keys it does
  not name keep the tier's values (`shadow: {sample: 25}` keeps 4 days, 12 days and the tier's
  gates; `shadow: {min_duration: 1d}` keeps the tier's `max_duration` unless it is below
  1d, then `max_duration` becomes 3 x the given `min_duration`). A `gates` list given replaces
  the tier's shadow gates whole. For `low`, a spec's shadow mapping is used as written.
- Every other field (gates, alpha, holdback, triggers, ...) is the spec's own: a tier sets none.

`time_scale` (in (0, 1], default 1) multiplies every duration of the plan once the tier's
defaults are in: each step's `min_duration` and `max_duration` and the shadow's. It is for
demos (0.001 turns 4 h into 14.4 s); gate and trigger windows, `look_interval`, `drain_timeout`
and `baseline` are not scaled, nor are sample counts. The parsed spec keeps `time_scale`, and
`outrider rollout plan` prints it. Scaling applies when a spec's YAML is parsed (specs travel
as their YAML text): validating a dump of a parsed spec again would scale it twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from collector._shadow_spec import DEFAULT_MIN_PAIRS
from outrider.durations import parse_duration

RiskTier = Literal["low", "medium", "high", "critical"]
RISK_TIERS: tuple[str, ...] = get_args(RiskTier)
MAX_DURATION_FACTOR = 3.0
TIER_MIN_SAMPLES = 200  # candidate requests in a tier stage before it may advance
TIER_SHADOW_SAMPLE = 10.0  # % of stable's calls mirrored in a tier's shadow phase
TIER_SHADOW_GATES: tuple[dict[str, Any], ...] = (
    {"name": "tools", "metric": "tool_agreement", "min": 0.9},
    {"name": "shadow_errors", "metric": "shadow_error_rate", "max_increase": 0.01},
)
_H = 3600.0
_D = 86400.0
_MEDIUM_STAGES = ((1.0, 4 * _H), (5.0, 8 * _H), (25.0, 24 * _H), (50.0, 24 * _H), (100.0, 4 * _H))


@dataclass(frozen=True)
class TierPlan:
    """A tier's default: the shadow phase's minimum (None: no shadow) and (weight, minimum) stages."""

    shadow_s: float | None
    stages: tuple[tuple[float, float], ...]


TIERS: dict[str, TierPlan] = {
    "low": TierPlan(None, ((1.0, 4 * _H), (25.0, 4 * _H), (100.0, 4 * _H))),
    "medium": TierPlan(4 * _D, _MEDIUM_STAGES),
    "high": TierPlan(6 * _D, _MEDIUM_STAGES),
    "critical": TierPlan(
        14 * _D, ((1.0, 2 * _D), (5.0, 4 * _D), (25.0, 7 * _D), (50.0, 7 * _D), (100.0, 7 * _D))
    ),
}


def tier_steps(tier: str) -> list[dict[str, Any]]:
    """The tier's stages as spec `steps` (durations in seconds)."""
    return [
        {
            "weight": weight,
            "min_duration": minimum,
            "max_duration": MAX_DURATION_FACTOR * minimum,
            "min_samples": TIER_MIN_SAMPLES,
        }
        for weight, minimum in TIERS[tier].stages
    ]


def tier_shadow(tier: str) -> dict[str, Any] | None:
    """The tier's shadow phase as a spec `shadow:` mapping; None for a tier without one."""
    minimum = TIERS[tier].shadow_s
    if minimum is None:
        return None
    return {
        "sample": TIER_SHADOW_SAMPLE,
        "min_duration": minimum,
        "max_duration": MAX_DURATION_FACTOR * minimum,
        "min_pairs": DEFAULT_MIN_PAIRS,
        "gates": [dict(g) for g in TIER_SHADOW_GATES],
    }


def _seconds(value: Any) -> float | None:
    try:
        return parse_duration(value)
    except ValueError:
        return None  # field validation reports it, naming the field


def _merge_shadow(default: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    merged = {**default, **given}
    if "min_duration" in given and "max_duration" not in given:
        given_min = _seconds(given["min_duration"])
        if given_min is not None and given_min > default["max_duration"]:
            merged["max_duration"] = MAX_DURATION_FACTOR * given_min
    return merged


def _scaled(value: Any, scale: float) -> Any:
    seconds = _seconds(value) if value is not None else None
    return value if seconds is None else seconds * scale


def _scale_durations(item: Any, scale: float) -> Any:
    if not isinstance(item, dict):
        return item
    out = dict(item)
    for key in ("min_duration", "max_duration"):
        if key in out:
            out[key] = _scaled(out[key], scale)
    return out


def _scale(value: Any) -> float | None:
    """A valid `time_scale` as the field will read it, else None (the field reports it)."""
    if isinstance(value, bool):
        return None
    try:
        scale = float(value)
    except (TypeError, ValueError):
        return None
    return scale if 0 < scale <= 1 else None


def apply_risk(data: Any) -> Any:
    """The raw spec mapping with its tier's defaults filled in and `time_scale` applied (see the
    module docstring); anything this cannot read is left for field validation to report."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    tier = out.get("risk")
    if isinstance(tier, str) and tier in TIERS:
        if "steps" not in out:
            out["steps"] = tier_steps(tier)
        default = tier_shadow(tier)
        if default is not None:
            if "shadow" not in out:
                out["shadow"] = default
            elif isinstance(out["shadow"], dict):
                out["shadow"] = _merge_shadow(default, out["shadow"])
    scale = _scale(out.get("time_scale", 1.0))
    if scale is not None and scale != 1.0:
        if isinstance(out.get("steps"), list):
            out["steps"] = [_scale_durations(step, scale) for step in out["steps"]]
        if "shadow" in out:
            out["shadow"] = _scale_durations(out["shadow"], scale)
    return out
