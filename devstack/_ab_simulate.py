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
