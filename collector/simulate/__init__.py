"""The decisions simulator and planner: the collector's own decision code on synthetic traffic."""

from collector.simulate._plan import (
    PLANNED_POWER,
    GatePlan,
    Plan,
    StagePlan,
    format_duration,
    format_plan,
    plan,
)
from collector.simulate._run import (
    DEFAULT_MAX_VIRTUAL_TIME_S,
    RunResult,
    Scenario,
    run_once,
    simulate,
    summarize,
)
from collector.simulate._traffic import Traffic, apply_effect, baseline_from

__all__ = [
    "DEFAULT_MAX_VIRTUAL_TIME_S",
    "PLANNED_POWER",
    "GatePlan",
    "Plan",
    "RunResult",
    "Scenario",
    "StagePlan",
    "Traffic",
    "apply_effect",
    "baseline_from",
    "format_duration",
    "format_plan",
    "plan",
    "run_once",
    "simulate",
    "summarize",
]
