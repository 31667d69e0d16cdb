"""The `shadow:` phase of a rollout spec and its gates (collector._spec validates the whole).

Shadow gates test the mirrored pairs of the rollout (collector._shadow_evidence), each one
confidence sequence on a per-pair mean clustered by stable session (collector._shadow_gates):

    metric             limit          per pair                     harm when, with evidence
    tool_agreement     min            1 if the tool decisions agree  agreement below `min`
    text_similarity    min            the text similarity in [0, 1]  mean similarity below `min`
    judge_score        max_decrease   candidate - stable score       the candidate scores lower
    judge_preference   max_increase   +1 stable, -1 candidate, 0 tie  the judge prefers stable
    shadow_error_rate  max_increase   candidate - stable error (0/1)  the candidate errs more
    latency_ratio      max_ratio      log(candidate / stable)         the candidate is slower
    cost_ratio         max_ratio      log(candidate / stable)         the candidate costs more

A gate passes with evidence that the mean is at least `min` (the first two), or that any harm
is below the margin (the others, like a canary gate).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from outrider.durations import Duration

ShadowMetric = Literal[
    "tool_agreement",
    "text_similarity",
    "judge_score",
    "judge_preference",
    "shadow_error_rate",
    "latency_ratio",
    "cost_ratio",
]
SHADOW_LIMIT_KEY: dict[str, str] = {
    "tool_agreement": "min",
    "text_similarity": "min",
    "judge_score": "max_decrease",
    "judge_preference": "max_increase",
    "shadow_error_rate": "max_increase",
    "latency_ratio": "max_ratio",
    "cost_ratio": "max_ratio",
}
SHADOW_LIMIT_KEYS = ("min", "max_decrease", "max_increase", "max_ratio")
DEFAULT_SAMPLE = 100.0
DEFAULT_MIN_PAIRS = 200
DEFAULT_SHADOW_MIN_SAMPLES = 30  # stable sessions with pairs before a gate's first look


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShadowGate(_Model):
    """A test on the mirrored pairs; `min_samples` counts stable sessions (the clusters)."""

    name: str = Field(min_length=1)
    metric: ShadowMetric
    min: float | None = Field(default=None, gt=0, lt=1)
    max_decrease: float | None = Field(default=None, gt=0, le=1)
    max_increase: float | None = Field(default=None, gt=0, le=1)
    max_ratio: float | None = Field(default=None, gt=1)
    min_samples: int = Field(default=DEFAULT_SHADOW_MIN_SAMPLES, ge=2)
    on_failure: Literal["rollback", "hold"] = "rollback"

    @model_validator(mode="after")
    def _limit_matches_metric(self) -> ShadowGate:
        wanted = SHADOW_LIMIT_KEY[self.metric]
        given = {k for k in SHADOW_LIMIT_KEYS if getattr(self, k) is not None}
        if wanted not in given:
            raise ValueError(f"{wanted}: required for metric {self.metric}")
        if given - {wanted}:
            other = sorted(given - {wanted})[0]
            raise ValueError(f"{other}: not allowed for metric {self.metric} (use {wanted})")
        return self

    @property
    def limit(self) -> float:
        return float(getattr(self, SHADOW_LIMIT_KEY[self.metric]))


class Shadow(_Model):
    """The shadow phase: how much is mirrored, how long and how much evidence it needs."""

    sample: float = Field(default=DEFAULT_SAMPLE, gt=0, le=100)  # % of stable's calls mirrored
    min_duration: Duration = 0.0
    min_pairs: int = Field(default=DEFAULT_MIN_PAIRS, ge=0)
    max_duration: Duration | None = None  # past it without a decision: NO_DATA
    gates: list[ShadowGate] = Field(default_factory=list, max_length=20)

    @model_validator(mode="after")
    def _max_after_min(self) -> Shadow:
        if self.max_duration is not None and self.max_duration < self.min_duration:
            raise ValueError("max_duration: must be at least min_duration")
        return self
