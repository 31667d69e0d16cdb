"""The rollout spec: a YAML file validated at load, errors naming the file and the field.

agent: support-bot
stable: 1a2b3c4d5e6f
candidate: 9f8e7d6c5b4a
sticky_by: session
steps:
  - {weight: 5, min_duration: 30s, min_samples: 50}
gates:
  - {name: errors, metric: error_rate, max_increase: 0.05, window: 1m, min_samples: 20,
     on_failure: rollback}
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collector._config_errors import SpecError, parse_yaml_model
from collector._duration import Duration

Metric = Literal[
    "error_rate",
    "latency_p95_ms",
    "latency_p99_ms",
    "ttft_p95_ms",
    "cost_per_call",
    "cost_per_session",
    "tool_failure_rate",
    "thumbs_down_rate",
    "task_failure_rate",
    "safety_event_rate",
    "fallback_rate",
]
# which limit key each metric takes: rates move by an absolute increase over the baseline,
# magnitudes by a ratio to it
LIMIT_KEY: dict[str, str] = {
    "error_rate": "max_increase",
    "latency_p95_ms": "max_ratio",
    "latency_p99_ms": "max_ratio",
    "ttft_p95_ms": "max_ratio",
    "cost_per_call": "max_ratio",
    "cost_per_session": "max_ratio",
    "tool_failure_rate": "max_increase",
    "thumbs_down_rate": "max_increase",
    "task_failure_rate": "max_increase",
    "safety_event_rate": "max_increase",
    "fallback_rate": "max_increase",
}
_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Step(_Model):
    """One stage: the candidate's traffic share, held for a time and a sample count."""

    weight: float
    min_duration: Duration = 0.0
    min_samples: int = Field(default=0, ge=0)

    @field_validator("weight")
    @classmethod
    def _weight_range(cls, value: float) -> float:
        if not 0 < value <= 100:
            raise ValueError("must be in (0, 100]")
        return value


class Gate(_Model):
    """A check of the candidate against the stable baseline over a rolling window."""

    name: str = Field(min_length=1)
    metric: Metric
    max_increase: float | None = Field(default=None, ge=0, le=1)
    max_ratio: float | None = Field(default=None, gt=0)
    window: Duration = 60.0
    min_samples: int = Field(default=20, ge=1)
    on_failure: Literal["rollback", "hold"] = "rollback"

    @field_validator("window")
    @classmethod
    def _window_positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be longer than 0s")
        return value

    @model_validator(mode="after")
    def _limit_matches_metric(self) -> Gate:
        wanted = LIMIT_KEY[self.metric]
        given = {k for k in LIMIT_KEY.values() if getattr(self, k) is not None}
        if wanted not in given:
            raise ValueError(f"{wanted}: required for metric {self.metric}")
        if given - {wanted}:
            other = (given - {wanted}).pop()
            raise ValueError(f"{other}: not allowed for metric {self.metric} (use {wanted})")
        return self

    @property
    def limit(self) -> float:
        value = self.max_increase if LIMIT_KEY[self.metric] == "max_increase" else self.max_ratio
        assert value is not None  # checked at validation
        return value


class RolloutSpec(_Model):
    """A canary rollout of one agent from `stable` to `candidate`."""

    agent: str = Field(min_length=1, max_length=249)
    stable: str = Field(pattern=_VERSION_PATTERN)
    candidate: str = Field(pattern=_VERSION_PATTERN)
    sticky_by: Literal["session", "user", "tenant"] = "session"
    steps: list[Step] = Field(min_length=1, max_length=100)
    gates: list[Gate] = Field(default_factory=list, max_length=50)

    @model_validator(mode="after")
    def _cross_field(self) -> RolloutSpec:
        if self.stable == self.candidate:
            raise ValueError("candidate: must differ from stable")
        for i in range(1, len(self.steps)):
            if self.steps[i].weight <= self.steps[i - 1].weight:
                raise ValueError(
                    f"steps[{i}].weight: must be greater than the previous step's "
                    f"({self.steps[i - 1].weight:g}); weights strictly increase"
                )
        seen: set[str] = set()
        for i, gate in enumerate(self.gates):
            if gate.name in seen:
                raise ValueError(f"gates[{i}].name: duplicate gate name {gate.name!r}")
            seen.add(gate.name)
        return self


def load_spec_text(text: str, source_name: str = "<spec>") -> RolloutSpec:
    """Parse and validate a rollout spec; SpecError names `source_name` and the field."""
    return parse_yaml_model(RolloutSpec, text, source_name)


def load_spec_file(path: Path) -> RolloutSpec:
    """Read and validate a rollout spec file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    return load_spec_text(text, str(path))
