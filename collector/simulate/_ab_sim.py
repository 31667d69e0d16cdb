"""The decisions simulator for A/B tests: the controller's own look (`collector._ab_phase.ab_look`)
on simulated users, run after run, to measure how often it names a winner and which.

Traffic: users are the randomization unit, assigned to the variants by the weights (a
multinomial per look, as the sticky hash splits them). A user's activity is heavy-tailed: tasks
per user are Zipf(2.5) capped at 100 (most users one or two, a few dozens). For a rate (task
success, thumbs up) each user has their own rate, Beta with the variant's mean and
concentration 8, so tasks of one user are correlated (a design effect near 2: plan with
`primary.deff`); for a magnitude (judge score, cost) each observation is normal around the
variant's mean with the spec's `sd`, plus a per-user shift of half that sd.

A run looks every `users_per_look` users, exactly as the controller looks at its evidence
(fixed: one analysis once every variant has the planned samples; sequential: every look), and
ends at the first verdict that is not "running". Effects (`B:task_success=+0.05`) add to the
baseline of the named variant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from collector._ab_phase import RUNNING_VERDICT, WINNER, ab_look, ab_plan, planned_samples
from collector._ab_spec import ABTest, ABVariant
from collector._spec import RolloutSpec
from collector.simulate._traffic import parse_pairs
from collector.stats import VariantStats

ZIPF, CAP, CONCENTRATION = 2.5, 100, 8.0
DEFAULT_MAGNITUDE_BASE = {"judge_score": 0.7, "cost_per_task": 0.003}
MAX_LOOKS = 400  # a run still running after this many looks is "undecided"


@dataclass(frozen=True)
class ABScenario:
    spec: RolloutSpec
    means: tuple[float, ...]  # each variant's true mean of the primary metric
    users_per_look: int = 200


@dataclass
class ABSummary:
    runs: int = 0
    winners: dict[str, int] = field(default_factory=dict)
    no_winner: int = 0
    srm: int = 0
    undecided: int = 0
    samples: list[int] = field(default_factory=list)  # per variant at the decision, the largest

    def rate(self, name: str) -> float:
        return self.winners.get(name, 0) / self.runs if self.runs else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "winners": dict(self.winners),
            "no_winner": self.no_winner,
            "sample_ratio_mismatch": self.srm,
            "undecided": self.undecided,
            "median_samples": float(np.median(self.samples)) if self.samples else None,
        }


def with_variants(spec: RolloutSpec, count: int | None) -> RolloutSpec:
    """The spec with `count` equal-weight variants A, B, C... (None: the spec's own)."""
    assert spec.ab is not None
    if count is None or count == len(spec.ab.variants):
        return spec
    weights = [round(100 / count, 4)] * count
    weights[-1] = round(100 - sum(weights[:-1]), 4)
    variants = [
        ABVariant(
            name="ABCDE"[i],
            version=spec.ab.variants[i].version if i < len(spec.ab.variants) else f"sim-{i}",
            weight=w,
        )
        for i, w in enumerate(weights)
    ]
    ab = ABTest.model_validate({**spec.ab.model_dump(), "variants": [v.model_dump() for v in variants]})
    return spec.model_copy(update={"ab": ab, "stable": variants[0].version, "candidate": variants[1].version})


def scenario_from(
    spec: RolloutSpec, baseline: str = "", effect: str = "", users_per_look: int = 200
) -> ABScenario:
    """The true means per variant: the baseline (`--baseline task_success=0.85`; default the
    spec's `baseline`) plus each named variant's effect (`--effect B:task_success=+0.05`)."""
    ab = spec.ab
    assert ab is not None
    metric = ab.primary.metric
    base = ab.primary.baseline_rate if ab.primary.proportion else DEFAULT_MAGNITUDE_BASE[metric]
    for key, value in parse_pairs(baseline, "--baseline").items():
        if key != metric:
            raise ValueError(f"--baseline: an A/B test on {metric} takes only {metric}=VALUE, not {key!r}")
        base = _number(value, "--baseline", key)
    means = [base] * len(ab.variants)
    names = [v.name for v in ab.variants]
    for key, value in parse_pairs(effect, "--effect").items():
        name, sep, metric_key = key.partition(":")
        if not sep:
            raise ValueError(f"--effect: name the variant, e.g. {names[1]}:{metric}={value}")
        if name not in names:
            raise ValueError(f"--effect: no variant {name!r} (variants: {', '.join(names)})")
        if metric_key != metric:
            raise ValueError(f"--effect: the test's primary metric is {metric}, not {metric_key!r}")
        means[names.index(name)] += _number(value, "--effect", key)
    if ab.primary.proportion and not all(0 < m < 1 for m in means):
        raise ValueError(f"--effect: every variant's {metric} must stay in (0, 1), got {means}")
    return ABScenario(spec, tuple(means), users_per_look)


def _number(value: str, option: str, key: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{option}: {key}={value!r} is not a number") from None


def _users(rng: np.random.Generator, scenario: ABScenario, variant: int, count: int) -> np.ndarray:
    """(count, 3) per user: tasks n, sum s, and n*s is derived; returns columns n, s."""
    ab = scenario.spec.ab
    assert ab is not None
    n = np.minimum(rng.zipf(ZIPF, count), CAP).astype(float)
    mean = scenario.means[variant]
    if ab.primary.proportion:
        rate = rng.beta(mean * CONCENTRATION, (1 - mean) * CONCENTRATION, count)
        s = rng.binomial(n.astype(np.int64), rate).astype(float)
    else:
        sd = float(ab.primary.sd or 1.0)
        shift = rng.normal(0.0, sd / 2, count)
        s = n * (mean + shift) + rng.normal(0.0, sd, count) * np.sqrt(n)
    return np.stack([n, s], axis=1)


def run_ab_once(scenario: ABScenario, rng: np.random.Generator) -> tuple[str, int | None, int]:
    """One simulated test: (verdict, winner index, the largest variant's samples at the end)."""
    spec = scenario.spec
    ab = spec.ab
    assert ab is not None
    plan = ab_plan(spec)
    weights = np.asarray(ab.weights())
    sums = np.zeros((len(weights), 6))  # K, N, S, NN, SS, NS per variant
    for _ in range(MAX_LOOKS):
        counts = rng.multinomial(scenario.users_per_look, weights)
        for v, count in enumerate(counts):
            if count:
                users = _users(rng, scenario, v, int(count))
                n, s = users[:, 0], users[:, 1]
                sums[v] += (count, n.sum(), s.sum(), (n * n).sum(), (s * s).sum(), (n * s).sum())
        stats = [VariantStats(*row) for row in sums.tolist()]
        look = ab_look(spec, stats, [int(k) for k in sums[:, 0]], 0.0, frozenset(), plan)
        if look.verdict != RUNNING_VERDICT:
            return look.verdict, look.winner, int(sums[:, 1].max())
    return RUNNING_VERDICT, None, int(sums[:, 1].max())


def simulate_ab(scenario: ABScenario, runs: int, seed: int = 0) -> ABSummary:
    """`runs` independent tests (seeded: the same seed gives the same summary)."""
    ab = scenario.spec.ab
    assert ab is not None
    out = ABSummary()
    for i in range(runs):
        verdict, winner, samples = run_ab_once(scenario, np.random.default_rng([seed, i]))
        out.runs += 1
        out.samples.append(samples)
        if verdict == WINNER and winner is not None:
            name = ab.variants[winner].name
            out.winners[name] = out.winners.get(name, 0) + 1
        elif verdict == RUNNING_VERDICT:
            out.undecided += 1
        elif verdict == "sample_ratio_mismatch":
            out.srm += 1
        else:
            out.no_winner += 1
    return out


def binomial_se(rate: float, runs: int) -> float:
    """The standard error of a rate measured over `runs` runs."""
    return math.sqrt(max(rate * (1 - rate), 0.0) / runs) if runs else math.nan


def format_ab_summary(scenario: ABScenario, summary: ABSummary, effect: str, seed: int) -> list[str]:
    spec = scenario.spec
    ab = spec.ab
    assert ab is not None
    plan = ab_plan(spec)
    best = max(
        range(len(scenario.means)),
        key=lambda i: scenario.means[i] * (1 if ab.primary.higher_is_better else -1),
    )
    truly_equal = len(set(scenario.means)) == 1
    lines = [
        f"simulated {summary.runs} A/B tests of {', '.join(v.name for v in ab.variants)} on "
        f"{ab.primary.metric} ({ab.analysis}, alpha {spec.alpha:g}, seed {seed})",
        "true means: "
        + ", ".join(f"{v.name} {m:g}" for v, m in zip(ab.variants, scenario.means, strict=True))
        + (f"  ({effect})" if effect.strip() else "  (a true null)"),
        f"plan per variant: {plan.fixed_n} samples at a fixed horizon; sequential cap {plan.sequential_n}, "
        f"expected {plan.sequential_expected_n}; this test runs to {planned_samples(spec, plan)}",
        "",
        f"{'outcome':<22} {'runs':>6} {'share':>7} {'± se':>7}",
    ]
    rows: list[tuple[str, int]] = [(f"winner {v.name}", summary.winners.get(v.name, 0)) for v in ab.variants]
    rows += [
        ("no winner", summary.no_winner),
        ("sample ratio mismatch", summary.srm),
        ("undecided", summary.undecided),
    ]
    for label, count in rows:
        rate = count / summary.runs
        lines.append(f"{label:<22} {count:>6} {rate:>7.1%} {binomial_se(rate, summary.runs):>7.1%}")
    if truly_equal:
        rate = summary.no_winner / summary.runs
        lines.append(
            f"\nno winner under a true null: {rate:.1%} (the design promises at least {1 - spec.alpha:.0%})"
        )
    else:
        rate = summary.rate(ab.variants[best].name)
        lines.append(
            f"\nthe right winner ({ab.variants[best].name}): {rate:.1%} (planned power "
            f"{ab.primary.power:.0%} at the minimum detectable effect {ab.primary.min_detectable_effect:g})"
        )
    if summary.samples:
        lines.append(f"median samples of the largest variant at the end: {np.median(summary.samples):.0f}")
    return lines


def summary_json(summary: ABSummary, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {**summary.to_json(), **(extra or {})}
