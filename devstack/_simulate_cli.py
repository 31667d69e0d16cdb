"""`outrider rollout plan | simulate`: a spec's expected time to a decision, and simulated
rollouts on synthetic traffic. Local: no collector needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from collector._spec import RolloutSpec
    from collector.simulate import Scenario, Traffic

_rate_option = click.option(
    "--calls-per-second",
    required=True,
    type=click.FloatRange(min=0, min_open=True),
    help="The agent's total traffic (stable and candidate), calls per second.",
)
_baseline_option = click.option(
    "--baseline",
    default="",
    metavar="KEY=VALUE,...",
    help="Stable's traffic: error_rate, task_success, feedback_share, latency_p50_ms, latency_sigma, "
    "cost_per_call_usd, safety_rate, judge_score, judge_share, ... (every key has a default).",
)
_json_last_option = click.option(
    "--json", "as_json", is_flag=True, help="Also print the result as one JSON object on the last line."
)


@click.command("plan")
@click.argument("spec", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--risk",
    type=click.Choice(["low", "medium", "high", "critical"]),
    help="Instead of SPEC: print this risk tier's default plan (shadow, stages, durations).",
)
@click.option(
    "--time-scale",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=1.0,
    show_default=True,
    help="With --risk: scale every duration of the tier's plan, as a spec's `time_scale` (a demo).",
)
@click.option(
    "--calls-per-second",
    type=click.FloatRange(min=0, min_open=True),
    help="The agent's total traffic (stable and candidate), calls per second. Required with SPEC; "
    "with --risk, sizes the tier's stages at this rate.",
)
@_baseline_option
@_json_last_option
def rollout_plan(
    spec: Path | None,
    risk: str | None,
    time_scale: float,
    calls_per_second: float | None,
    baseline: str,
    as_json: bool,
) -> None:
    """Per stage of SPEC: the expected time to a decision and the smallest regression each gate
    detects with 97.5% power at the spec's alpha. With --risk TIER instead of SPEC: the tier's
    default plan, sized too when --calls-per-second is given. Local: no collector needed."""
    from collector.simulate import plan
    from collector.simulate._plan import format_plan
    from collector.simulate._schedule import format_schedule

    if spec is not None and risk is not None:
        raise click.UsageError("give SPEC or --risk TIER, not both (a spec sets its tier with `risk:`)")
    if spec is None and risk is None:
        raise click.UsageError("Missing argument 'SPEC' (or --risk TIER for a tier's default plan).")
    if risk is None and time_scale != 1.0:
        raise click.UsageError("--time-scale goes with --risk; a spec sets its own `time_scale:`")
    if spec is not None and calls_per_second is None:
        raise click.UsageError("Missing option '--calls-per-second' (required with SPEC).")
    if risk is not None:
        loaded, source = _tier_spec(risk, time_scale), f"risk tier {risk}"
        for line in format_schedule(loaded, source):
            click.echo(line)
        if calls_per_second is None:
            if as_json:
                click.echo(_json_line(loaded.model_dump(include={"risk", "time_scale", "shadow", "steps"})))
            return
        click.echo("")
    else:
        assert spec is not None
        loaded, source = _local_spec(spec), str(spec)
    assert calls_per_second is not None
    if loaded.ab is not None:  # an A/B test: its sample sizes (devstack._ab_simulate)
        from devstack._ab_simulate import ab_plan_lines

        for line in ab_plan_lines(loaded, source, calls_per_second):
            click.echo(line)
        return
    traffic = _local_traffic(baseline)
    try:
        result = plan(loaded, calls_per_second, traffic)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--calls-per-second'") from exc
    for line in format_plan(result, source):
        click.echo(line)
    if as_json:
        click.echo(_json_line(result.to_json()))


def _tier_spec(risk: str, time_scale: float) -> RolloutSpec:
    """A spec that sets only its tier (and scale): the tier's default plan, without canary gates."""
    from collector._spec import RolloutSpec

    return RolloutSpec.model_validate(
        {
            "agent": "example",
            "stable": "stable",
            "candidate": "candidate",
            "risk": risk,
            "time_scale": time_scale,
        }
    )


@click.command("simulate")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True, help="Rollouts.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same results.")
@_rate_option
@_baseline_option
@click.option(
    "--effect",
    default="",
    metavar="KEY=[x]VALUE,...",
    help="The candidate's change: added to the baseline's value, or a ratio when written xF "
    "(task_success=-0.05,latency_p50_ms=x1.2). None: identical to stable.",
)
@click.option(
    "--max-virtual-time",
    default="168h",
    show_default=True,
    help="Virtual time a run may take (a duration: 30s, 5m, 1h); still deciding then: held or undecided.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Processes (default: one per 25 runs, at most one per core). Results do not depend on it.",
)
@click.option(
    "--variants",
    type=click.IntRange(min=2, max=5),
    help="An A/B test spec: simulate this many equal-weight variants A, B, C... instead of the spec's; "
    "effects name them (--effect B:task_success=+0.05).",
)
@_json_last_option
def rollout_simulate(
    spec: Path,
    runs: int,
    seed: int,
    calls_per_second: float,
    baseline: str,
    effect: str,
    max_virtual_time: str,
    workers: int | None,
    variants: int | None,
    as_json: bool,
) -> None:
    """Simulate RUNS rollouts of SPEC on synthetic traffic, with the collector's own evidence,
    tests and controller on a virtual clock: how often it rolls back, promotes or holds."""
    import os
    import time

    from collector.simulate import Scenario, apply_effect, simulate, summarize
    from outrider.durations import parse_duration

    local = _local_spec(spec)
    if local.ab is not None:  # an A/B test: per-variant effects (devstack._ab_simulate)
        from devstack._ab_simulate import simulate_ab_spec

        return simulate_ab_spec(
            local,
            variants=variants,
            runs=runs,
            seed=seed,
            calls_per_second=calls_per_second,
            baseline=baseline,
            effect=effect,
            as_json=as_json,
        )
    if variants is not None:
        raise click.UsageError("--variants: only for an A/B test spec (strategy: ab_test)")
    if local.shadow_only:
        raise click.UsageError(
            "a pure shadow run has no canary stages to simulate: see `outrider rollout plan`"
        )
    base = _local_traffic(baseline)
    try:
        candidate = apply_effect(base, effect, "--effect")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        cap = parse_duration(max_virtual_time)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--max-virtual-time'") from exc
    if cap <= 0:
        raise click.BadParameter("must be longer than 0s", param_hint="'--max-virtual-time'")
    scenario = Scenario(spec.read_text(encoding="utf-8"), base, candidate, calls_per_second, cap)
    workers = workers or max(1, min(os.cpu_count() or 1, runs // 25))
    began = time.perf_counter()
    summary = summarize(simulate(scenario, runs, seed, workers))
    elapsed = time.perf_counter() - began
    for line in _simulation_table(summary, spec, scenario, seed, effect):
        click.echo(line)
    click.echo(f"({runs} runs in {elapsed:.1f}s on {workers} worker{'s' if workers > 1 else ''})")
    if as_json:
        click.echo(_json_line(summary))


def _local_spec(path: Path) -> RolloutSpec:
    from collector import SpecError
    from collector._spec import load_spec_file

    try:
        return load_spec_file(path)
    except SpecError as exc:
        raise click.ClickException(str(exc)) from exc


def _local_traffic(text: str) -> Traffic:
    from collector.simulate import baseline_from

    try:
        return baseline_from(text)
    except ValueError as exc:
        message = str(exc)
        if not message.startswith("--baseline"):
            message = f"--baseline: {message}"
        raise click.UsageError(message) from exc


def _json_line(value: object) -> str:
    import json

    return json.dumps(value, sort_keys=True, allow_nan=False)


def _simulation_table(
    summary: dict[str, Any], spec: Path, scenario: Scenario, seed: int, effect: str
) -> list[str]:
    from collector.simulate import format_duration

    runs = summary["runs"]
    lines = [
        f"simulated {runs} rollouts of {spec} at {scenario.calls_per_second:g} calls/s (seed {seed}, "
        f"at most {format_duration(scenario.max_virtual_time_s)} each)",
        f"candidate: {effect.strip() or 'identical to stable'}",
        "",
        f"{'outcome':<12} {'runs':>6} {'share':>7}",
    ]
    for key, label in (
        ("rolled_back", "rolled back"),
        ("promoted", "promoted"),
        ("held", "held"),
        ("undecided", "undecided"),
    ):
        lines.append(f"{label:<12} {summary[key]:>6} {summary[key] / runs:>7.1%}")
    lines.append("")

    def counts(name: str) -> str:
        items = sorted(summary[name].items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{k} {v}" for k, v in items) or "-"

    def median(seconds: str, calls: str) -> str:
        if summary[seconds] is None:
            return "-"
        return f"{format_duration(summary[seconds])}, {summary[calls]:.0f} candidate calls"

    fixed = summary["fixed_horizon"]
    oracle = summary["oracle_median_candidate_calls"]
    lines += [
        f"rolled back by gate     {counts('rolled_back_by_gate')}",
        f"rolled back by metric   {counts('rolled_back_by_metric')}",
        f"median to a decision    {median('median_decision_s', 'median_candidate_calls')}",
        f"median to a rollback    {median('median_rollback_s', 'median_rollback_candidate_calls')}",
        f"oracle (Wald SPRT)      {'-' if oracle is None else f'{oracle:.0f} candidate calls (median)'}",
    ]
    if fixed["runs"]:
        lines.append(
            f"fixed horizon           {fixed['rejected']}/{fixed['runs']} rejected at "
            f"{format_duration(fixed['median_s'])}, {fixed['median_candidate_calls']:.0f} candidate calls "
            f"(median)"
        )
    return lines


COMMANDS = (rollout_plan, rollout_simulate)
