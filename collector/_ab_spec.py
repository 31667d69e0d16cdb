"""The `ab:` section of a rollout spec with `strategy: ab_test` (collector._spec validates the whole).

agent: support-bot
strategy: ab_test
sticky_by: user                 # the default for ab_test (or tenant); a user keeps their variant
ab:
  variants:                     # 2 to 5; the first is the control, weights sum to 100
    - {name: A, version: 1a2b3c4d5e6f, weight: 50}
    - {name: B, version: 9f8e7d6c5b4a, weight: 50}
  primary: {metric: task_success, min_detectable_effect: 0.05, power: 0.8, baseline: 0.85}
  analysis: fixed               # or sequential (anytime-valid: stops at the first look with a winner)
  on_decision: promote_winner   # or report: the test ends, traffic goes back to the control
  max_duration: 7d              # past it without a decision: no winner, the control stays
gates:                          # guardrails: each variant against the control; harm -> it can't win
  - {name: errors, metric: error_rate, max_increase: 0.02}

`stable` and `candidate` are not written for an A/B test: the variants replace them. The parsed
spec has stable = the control's version and candidate = the second variant's (what the state's
`stable_version_id` / `candidate_version_id` carry while RUNNING; a promoted winner becomes the
state's candidate, so the router's PROMOTED path serves it). A spec that still names `stable`
must name the control's version. `steps`, `shadow` and `risk` do not apply to an A/B test.

Primary metrics, from the rollout evidence's families (collector._evidence), per user:

    task_success     proportion  task success feedback      higher is better   needs `baseline`
    thumbs_up_rate   proportion  thumbs up of thumbs        higher is better   needs `baseline`
    judge_score      magnitude   feedback scores and judge  higher is better   needs `sd`
    cost_per_task    magnitude   model spend per call, USD  lower is better    needs `sd`

`baseline` (the control's expected rate; 0.5 when not given, the most conservative) or `sd`
(per observation) sizes the test up front with `stats.plan_ab`; `deff` is the design effect
of clustering by user to plan with (1: none; measure it on earlier data).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from outrider.durations import Duration

ABMetric = Literal["task_success", "thumbs_up_rate", "judge_score", "cost_per_task"]
PROPORTION_METRICS = frozenset({"task_success", "thumbs_up_rate"})
LOWER_IS_BETTER = frozenset({"cost_per_task"})
DEFAULT_BASELINE = 0.5
DEFAULT_AB_MAX_DURATION_S = 14 * 86_400.0
_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ABVariant(_Model):
    """One arm: a name as reports show it, the version it serves, its % of new sessions."""

    name: str = Field(pattern=_NAME_PATTERN)
    version: str = Field(pattern=_VERSION_PATTERN)
    weight: float = Field(gt=0, lt=100)


class Primary(_Model):
    """The metric that picks the winner and what the test is sized to detect."""

    metric: ABMetric
    min_detectable_effect: float = Field(gt=0)
    power: float = Field(default=0.8, gt=0, lt=1)
    baseline: float | None = Field(default=None, gt=0, lt=1)
    sd: float | None = Field(default=None, gt=0)
    deff: float = Field(default=1.0, ge=1)

    @property
    def proportion(self) -> bool:
        return self.metric in PROPORTION_METRICS

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    @model_validator(mode="after")
    def _sizing(self) -> Primary:
        if self.proportion:
            if self.sd is not None:
                raise ValueError(f"sd: not allowed for metric {self.metric} (a rate: use baseline)")
            if self.min_detectable_effect >= 1:
                raise ValueError(
                    f"min_detectable_effect: a rate moves by less than 1, got {self.min_detectable_effect:g}"
                )
            if self.baseline_rate + self.min_detectable_effect >= 1:
                raise ValueError("min_detectable_effect: baseline + min_detectable_effect must stay below 1")
        else:
            if self.baseline is not None:
                raise ValueError(f"baseline: not allowed for metric {self.metric} (use sd)")
            if self.sd is None:
                raise ValueError(f"sd: required for metric {self.metric} (the per-observation spread)")
        return self

    @property
    def baseline_rate(self) -> float:
        return self.baseline if self.baseline is not None else DEFAULT_BASELINE


class ABTest(_Model):
    """The A/B plan: variants, the primary metric, how and when it is analysed."""

    variants: list[ABVariant] = Field(min_length=2, max_length=5)
    primary: Primary
    analysis: Literal["fixed", "sequential"] = "fixed"
    on_decision: Literal["promote_winner", "report"] = "promote_winner"
    max_duration: Duration = DEFAULT_AB_MAX_DURATION_S

    @model_validator(mode="after")
    def _variants(self) -> ABTest:
        total = sum(v.weight for v in self.variants)
        if abs(total - 100.0) > 0.01:  # 33.33 x 3 is fine; the shares are normalized
            raise ValueError(f"variants: weights must sum to 100, got {total:g}")
        names: set[str] = set()
        versions: set[str] = set()
        for i, variant in enumerate(self.variants):
            if variant.name in names:
                raise ValueError(f"variants[{i}].name: duplicate variant name {variant.name!r}")
            if variant.version in versions:
                raise ValueError(f"variants[{i}].version: {variant.version!r} is already another variant's")
            names.add(variant.name)
            versions.add(variant.version)
        if self.max_duration <= 0:
            raise ValueError("max_duration: must be longer than 0s")
        return self

    @property
    def control(self) -> ABVariant:
        return self.variants[0]

    def weights(self) -> list[float]:
        """Each variant's share of new sessions, in [0, 1], summing to 1."""
        total = sum(v.weight for v in self.variants)
        return [v.weight / total for v in self.variants]


def apply_ab_defaults(data: Any) -> Any:
    """The raw spec mapping of an `ab_test` with stable/candidate from its variants, sticky by
    user unless given, and `time_scale` applied to `ab.max_duration`; anything unreadable is
    left for field validation to report."""
    if not isinstance(data, dict) or data.get("strategy") != "ab_test":
        return data
    out = dict(data)
    for key in ("steps", "shadow", "risk"):
        if key in out:
            raise ValueError(f"{key}: not used by strategy ab_test (the variants and `ab` plan it)")
    ab = out.get("ab")
    variants = ab.get("variants") if isinstance(ab, dict) else None
    if isinstance(variants, list) and len(variants) >= 2 and all(isinstance(v, dict) for v in variants):
        control, second = variants[0].get("version"), variants[1].get("version")
        if "stable" in out and out["stable"] != control:
            raise ValueError(f"stable: must be the control variant's version {control!r} (or left out)")
        if "candidate" in out:
            raise ValueError("candidate: not used by strategy ab_test (name the variants instead)")
        out["stable"], out["candidate"] = control, second
    out.setdefault("sticky_by", "user")
    scale = out.get("time_scale", 1.0)
    if isinstance(ab, dict) and "max_duration" in ab and isinstance(scale, int | float) and 0 < scale < 1:
        from collector._risk import _scaled  # one scaling rule for every plan duration

        out["ab"] = {**ab, "max_duration": _scaled(ab["max_duration"], float(scale))}
    return out
