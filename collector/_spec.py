"""The rollout spec: a YAML file validated at load, errors naming the file and the field.

agent: support-bot
stable: 1a2b3c4d5e6f
candidate: 9f8e7d6c5b4a
sticky_by: session
drain_timeout: 10m          # after a rollback or abort, candidate-pinned sessions end this much later
baseline: 10m               # after a promotion, the new stable's metrics over this long (0: none)
alpha: 0.02                 # family-wise false-rollback bound over every gate, trigger and look
steps:
  - {weight: 5, min_duration: 2m, min_samples: 200}
  - {weight: 50, min_duration: 10m, max_duration: 12h}     # the last step confirms (non-inferiority)
gates:
  - {name: errors, metric: error_rate, max_increase: 0.01, window: 5m, on_failure: rollback}

Each gate is a test on the evidence accumulated since the rollout started (collector._evidence);
its `window` serves its dashboards and absolute trigger only. A step of weight 100 runs at
100 - `holdback` % so the last stage keeps a concurrent stable baseline.

An optional `shadow:` phase runs before the steps (collector._shadow_spec): the candidate serves
no user, `sample` % of stable's calls are mirrored to it and compared, and its own gates decide
whether the first step opens. A spec with `shadow:` may leave out `steps`: a pure shadow run,
which ends ABORTED by the controller ("shadow run complete") once its gates pass, ROLLED_BACK on
harm, never PROMOTED (the candidate never served).

shadow:
  sample: 20                  # % of stable's calls mirrored, in (0, 100]
  min_duration: 10m
  min_pairs: 500              # compared calls before the first step may open
  max_duration: 6h            # past it without a decision: NO_DATA
  gates:
    - {name: tools, metric: tool_agreement, min: 0.9}
    - {name: quality, metric: judge_score, max_decrease: 0.05}

`risk: low | medium | high | critical` picks a default plan when the spec leaves out `steps`
(and, for the tiers with one, `shadow`); the spec's own fields win, as collector._risk says
precisely. `time_scale: 0.001` scales every step and shadow duration, for demos; the parsed spec
keeps it (`spec.time_scale`) and `outrider rollout plan` prints it.

Per-tenant canaries (collector._tenant_spec): `opt_in_tenants` always get the candidate while
it serves users, `exclude_tenants` never do, everyone else follows the weights; the gates
compare only that randomized rest.

opt_in_tenants: [acme, globex]
exclude_tenants: [initech]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collector._bluegreen_spec import BlueGreen
from collector._config_errors import SpecError, parse_yaml_model
from collector._risk import RiskTier, apply_risk
from collector._shadow_spec import Shadow
from collector._tenant_spec import TenantList, check_tenant_lists
from outrider.durations import Duration

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
    "judge_score",
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
    "judge_score": "max_decrease",
}
LIMIT_KEYS = ("max_increase", "max_ratio", "max_decrease")
# safety takes no margin: any supported increase rolls back, and it never blocks a promotion
NO_MARGIN = frozenset({"safety_event_rate"})
DEFAULT_ALPHA = 0.02
DEFAULT_HOLDBACK = 5.0
DEFAULT_LOOK_INTERVAL_S = 10.0
# how long sessions pinned to a rolled-back or aborted candidate keep being served
DEFAULT_DRAIN_TIMEOUT_S = 600.0
# the baseline snapshot of a promoted version: its metrics over this long at full traffic
# (capped at the collector's retention when the spec does not set it)
DEFAULT_BASELINE_S = 600.0
DEFAULT_MIN_SAMPLES = 30
DEFAULT_CRITICAL = ("secret", "pii")
DEFAULT_CRITICAL_MIN_CALLS = 1000
_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Step(_Model):
    """One stage: the candidate's traffic share, held for a time and a sample count."""

    weight: float
    min_duration: Duration = 0.0
    min_samples: int = Field(default=0, ge=0)  # candidate requests in this stage, a floor
    max_duration: Duration | None = None  # past it without its evidence: NO_DATA

    @field_validator("weight")
    @classmethod
    def _weight_range(cls, value: float) -> float:
        if not 0 < value <= 100:
            raise ValueError("must be in (0, 100]")
        return value

    @model_validator(mode="after")
    def _max_after_min(self) -> Step:
        if self.max_duration is not None and self.max_duration < self.min_duration:
            raise ValueError("max_duration: must be at least min_duration")
        return self


class Gate(_Model):
    """A test of the candidate against the stable baseline on the rollout's evidence.

    Rollback needs evidence of harm; the last stage promotes on evidence that any harm is
    below the margin (`max_increase` in points of a rate, `max_ratio` of a magnitude,
    `max_decrease` of a score). `min_samples` is the randomization units (sessions, users or
    tenants, per `sticky_by`) with data per arm before the first look: variances come from them.
    """

    name: str = Field(min_length=1)
    metric: Metric
    max_increase: float | None = Field(default=None, gt=0, le=1)
    max_ratio: float | None = Field(default=None, gt=1)
    max_decrease: float | None = Field(default=None, gt=0, le=1)
    window: Duration = 300.0
    min_samples: int = Field(default=DEFAULT_MIN_SAMPLES, ge=1)
    on_failure: Literal["rollback", "hold"] = "rollback"
    # safety only: categories whose first candidate event rolls back when stable had none
    critical: tuple[str, ...] = DEFAULT_CRITICAL
    critical_min_calls: int = Field(default=DEFAULT_CRITICAL_MIN_CALLS, ge=1)

    @field_validator("window")
    @classmethod
    def _window_positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be longer than 0s")
        return value

    @model_validator(mode="after")
    def _limit_matches_metric(self) -> Gate:
        wanted = LIMIT_KEY[self.metric]
        given = {k for k in LIMIT_KEYS if getattr(self, k) is not None}
        if self.metric in NO_MARGIN:
            if given - {wanted}:
                raise ValueError(f"{(given - {wanted}).pop()}: not allowed for metric {self.metric}")
            return self
        if wanted not in given:
            raise ValueError(f"{wanted}: required for metric {self.metric}")
        if given - {wanted}:
            other = (given - {wanted}).pop()
            raise ValueError(f"{other}: not allowed for metric {self.metric} (use {wanted})")
        return self

    @property
    def limit(self) -> float:
        """The margin as written (0 for a gate without one)."""
        value = getattr(self, LIMIT_KEY[self.metric])
        return float(value) if value is not None else 0.0


class Trigger(_Model):
    """An absolute trigger: fires only when an anytime-valid bound on the candidate's figure
    lies beyond `limit` after `min_samples`, and never while stable is beyond it too."""

    enabled: bool = True
    limit: float = Field(gt=0)
    window: Duration = 300.0
    min_samples: int = Field(default=100, ge=1)
    consecutive: int = Field(default=1, ge=1)  # consecutive minutes (p99)
    action: Literal["rollback", "hold"] = "rollback"


class Triggers(_Model):
    """The defaults of the design; a spec overrides any field of any of them, and the fields it
    does not name keep their defaults (`{latency_p99_ms: {limit: 5000}}` keeps 3 minutes)."""

    @model_validator(mode="before")
    @classmethod
    def _over_defaults(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = dict(value)
        for name, given in value.items():
            field = cls.model_fields.get(name)
            if field is not None and isinstance(given, dict) and isinstance(field.default, Trigger):
                merged[name] = {**field.default.model_dump(), **given}
        return merged

    error_rate: Trigger = Trigger(limit=0.02, window=300.0)
    latency_p99_ms: Trigger = Trigger(limit=10_000.0, window=180.0, consecutive=3, min_samples=100)
    cost_ratio: Trigger = Trigger(limit=3.0, window=3600.0, action="hold")
    judge_drop: Trigger = Trigger(limit=0.10, window=3600.0, min_samples=30)

    def active(self) -> list[tuple[str, Trigger]]:
        named = [(name, getattr(self, name)) for name in type(self).model_fields]
        return [(name, trigger) for name, trigger in named if trigger.enabled]


class RolloutSpec(_Model):
    """A canary rollout of one agent from `stable` to `candidate`."""

    agent: str = Field(min_length=1, max_length=249)
    strategy: Literal["canary", "ab_test", "blue_green"] = "canary"
    stable: str = Field(pattern=_VERSION_PATTERN)
    candidate: str = Field(pattern=_VERSION_PATTERN)
    sticky_by: Literal["session", "user", "tenant"] = "session"
    alpha: float = Field(default=DEFAULT_ALPHA, gt=0, lt=0.5)
    trigger_alpha_share: float = Field(default=0.1, ge=0, lt=1)  # of alpha, for the triggers
    holdback: float = Field(default=DEFAULT_HOLDBACK, gt=0, lt=50)  # % stable kept at weight 100
    look_interval: Duration = DEFAULT_LOOK_INTERVAL_S
    drain_timeout: Duration = DEFAULT_DRAIN_TIMEOUT_S
    baseline: Duration | None = None  # None: DEFAULT_BASELINE_S, at most the collector's retention
    shadow: Shadow | None = None
    steps: list[Step] = Field(default_factory=list, max_length=100)  # empty only with `shadow`
    gates: list[Gate] = Field(default_factory=list, max_length=50)
    triggers: Triggers = Triggers()
    risk: RiskTier | None = None  # the tier whose defaults filled `steps` / `shadow` (collector._risk)
    time_scale: float = Field(default=1.0, gt=0, le=1)  # every plan duration is already x this
    opt_in_tenants: TenantList = ()  # always the candidate while it serves users
    exclude_tenants: TenantList = ()  # never the candidate
    blue_green: BlueGreen | None = None  # strategy blue_green: smoke tests, switch, keep warm

    @model_validator(mode="before")
    @classmethod
    def _tier_defaults(cls, value: Any) -> Any:
        return apply_risk(value)

    @field_validator("time_scale", mode="before")
    @classmethod
    def _scale_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number in (0, 1], not a boolean")  # noqa: TRY004 (pydantic reports ValueError)
        return value

    @property
    def scaled(self) -> bool:
        """Whether the plan's durations are scaled (`time_scale` below 1): a demo."""
        return self.time_scale != 1.0

    @property
    def shadow_only(self) -> bool:
        """A pure shadow run: no canary step follows the shadow phase."""
        return self.shadow is not None and not self.steps

    def effective_weight(self, index: int) -> float:
        """The candidate's share of new sessions at step `index`, in [0, 1]."""
        if not self.steps:
            return 0.0
        weight = self.steps[index].weight
        return (100.0 - self.holdback) / 100 if weight >= 100 else weight / 100

    def baseline_s(self, retention_s: float) -> float:
        """How long the baseline after a promotion covers (0: none); a collector refuses a
        spec that sets more than its retention (`RolloutManager.check_windows`)."""
        return self.baseline if self.baseline is not None else min(DEFAULT_BASELINE_S, retention_s)

    def test_alphas(self) -> tuple[float, float]:
        """(alpha per gate, alpha per trigger): Bonferroni over the family, shadow gates included
        (each shadow gate gets the alpha of one gate too)."""
        triggers = len(self.triggers.active())
        share = self.trigger_alpha_share if triggers else 0.0
        shadow_gates = len(self.shadow.gates) if self.shadow is not None else 0
        gate_alpha = self.alpha * (1 - share) / max(1, len(self.gates) + shadow_gates)
        return gate_alpha, (self.alpha * share / triggers if triggers else 0.0)

    @model_validator(mode="after")
    def _cross_field(self) -> RolloutSpec:
        if self.stable == self.candidate:
            raise ValueError("candidate: must differ from stable")
        if (self.strategy == "blue_green") != (self.blue_green is not None):
            raise ValueError(
                "blue_green: required with strategy: blue_green"
                if self.blue_green is None
                else "blue_green: only with strategy: blue_green"
            )
        if self.blue_green is not None:
            if self.steps or self.shadow is not None:
                raise ValueError(f"{'steps' if self.steps else 'shadow'}: not used by strategy blue_green")
        elif not self.steps and self.shadow is None:
            raise ValueError("steps: at least one step is required (or a shadow phase)")
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
        for i, shadow_gate in enumerate(self.shadow.gates if self.shadow is not None else ()):
            if shadow_gate.name in seen:
                raise ValueError(f"shadow.gates[{i}].name: duplicate gate name {shadow_gate.name!r}")
            seen.add(shadow_gate.name)
        check_tenant_lists(self.opt_in_tenants, self.exclude_tenants)
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
