"""`outrider rollout simulate` for an A/B test spec: per-variant effects on simulated users,
through the controller's own look (collector.simulate._ab_sim). Local: no collector needed."""

from __future__ import annotations

import json
import time

import click

from collector._spec import RolloutSpec


def simulate_ab_spec(
    spec: RolloutSpec,
    *,
    variants: int | None,
    runs: int,
    seed: int,
    calls_per_second: float,
    baseline: str,
    effect: str,
    as_json: bool,
) -> None:
    """Print how often the test names each winner, or none, over `runs` simulated tests."""
    from collector.simulate._ab_sim import format_ab_summary, scenario_from, simulate_ab, with_variants

    try:
        shaped = with_variants(spec, variants)
        scenario = scenario_from(shaped, baseline, effect)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    began = time.perf_counter()
    summary = simulate_ab(scenario, runs, seed)
    elapsed = time.perf_counter() - began
    for line in format_ab_summary(scenario, summary, effect, seed):
        click.echo(line)
    if summary.samples:
        assert shaped.ab is not None
        total = sorted(summary.samples)[len(summary.samples) // 2] * len(shaped.ab.variants)
        click.echo(
            f"at {calls_per_second:g} observations/s of {shaped.ab.primary.metric}: about "
            f"{total / calls_per_second / 3600:.1f}h to a decision (median)"
        )
    click.echo(f"({runs} runs in {elapsed:.1f}s)")
    if as_json:
        click.echo(json.dumps(summary.to_json(), sort_keys=True))


def ab_plan_lines(spec: RolloutSpec, source: str, calls_per_second: float) -> list[str]:
    """`outrider rollout plan` of an A/B test: its sample sizes and how long they take."""
    from collector._ab_phase import ab_plan, planned_samples

    ab = spec.ab
    assert ab is not None
    plan = ab_plan(spec)
    # the smallest variant fills last: its share of the observations sets the time
    share = min(ab.weights())

    def hours(n: int) -> str:
        return f"{n / (calls_per_second * share) / 3600:.1f}h"

    p = ab.primary
    sized = f"baseline {p.baseline_rate:g}" if p.proportion else f"sd {p.sd:g}"
    return [
        f"A/B test plan for {source} at {calls_per_second:g} observations/s of {p.metric}",
        f"variants {', '.join(f'{v.name} {v.weight:g}%' for v in ab.variants)} (control {ab.control.name})",
        f"alpha {spec.alpha:g} family-wise ({plan.alpha_per_comparison:.3g} per comparison), power "
        f"{p.power:.0%} for {p.min_detectable_effect:g} ({sized}, design effect {p.deff:g})",
        f"fixed horizon     {plan.fixed_n} samples per variant ({hours(plan.fixed_n)})",
        f"sequential        cap {plan.sequential_n} ({hours(plan.sequential_n)}), expected "
        f"{plan.sequential_expected_n} at the effect ({hours(plan.sequential_expected_n)})",
        f"this test         {ab.analysis}: runs to {planned_samples(spec, plan)} samples per variant, "
        f"max_duration {ab.max_duration:g}s",
    ]
