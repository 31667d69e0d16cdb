"""A/B test library: planning, the analyses' contracts, magnitudes, ranks and sample-ratio mismatch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]

import collector.stats as cs
from collector.stats import (
    MAGNITUDE,
    PROPORTION,
    SRM_THRESHOLD,
    VariantStats,
    analyze_fixed,
    analyze_fixed_ranks,
    analyze_sequential,
    design_effect,
    fixed_horizon_n_proportions,
    plan_ab,
    sample_ratio_mismatch,
    two_proportion_ztest,
)

AB_NAMES = {
    "MAGNITUDE",
    "PROPORTION",
    "SRM_THRESHOLD",
    "ABPlan",
    "ABResult",
    "Comparison",
    "SampleRatioCheck",
    "VariantStats",
    "analyze_fixed",
    "analyze_fixed_ranks",
    "analyze_sequential",
    "design_effect",
    "plan_ab",
    "sample_ratio_mismatch",
}


def test_ab_test_names_are_public() -> None:
    assert set(cs.__all__) >= AB_NAMES
    assert all(hasattr(cs, name) for name in cs.__all__)


def binary(successes: int, n: int) -> VariantStats:
    return VariantStats.from_units(np.ones(n), np.r_[np.ones(successes), np.zeros(n - successes)])


# ---------------------------------------------------------------- planning


def test_ab_test_plan_two_variants_is_the_textbook_n() -> None:
    plan = plan_ab(PROPORTION, mde=0.05, baseline=0.85, alpha=0.05, power=0.9)
    assert plan.fixed_n == fixed_horizon_n_proportions(0.85, 0.05, 0.05, 0.9)
    assert (plan.alpha_per_comparison, plan.power_per_comparison) == (0.05, 0.9)


@pytest.mark.parametrize("variants", [2, 3, 4, 5])
def test_ab_test_plan_sequential_has_its_own_n(variants: int) -> None:
    plan = plan_ab(PROPORTION, mde=0.05, baseline=0.85, power=0.9, variants=variants)
    # the horizon pays for looking at every step; the typical stop comes before the fixed n
    assert plan.sequential_expected_n < plan.fixed_n < plan.sequential_n
    assert plan.alpha_per_comparison == pytest.approx(0.05 / (variants * (variants - 1) / 2))


def test_ab_test_plan_grows_with_variants_and_the_design_effect() -> None:
    sizes = [plan_ab(PROPORTION, mde=0.05, baseline=0.85, variants=k).fixed_n for k in (2, 3, 4, 5)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    one = plan_ab(MAGNITUDE, mde=0.1, sd=1.0)
    two = plan_ab(MAGNITUDE, mde=0.1, sd=1.0, deff=2.0)
    assert two.fixed_n == pytest.approx(2 * one.fixed_n, abs=1)
    assert two.sequential_n == pytest.approx(2 * one.sequential_n, abs=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metric": PROPORTION, "mde": 0.05},  # no baseline
        {"metric": MAGNITUDE, "mde": 0.05},  # no sd
        {"metric": PROPORTION, "mde": 0.05, "baseline": 0.5, "variants": 6},
        {"metric": PROPORTION, "mde": 0.0, "baseline": 0.5},
        {"metric": PROPORTION, "mde": 0.05, "baseline": 0.5, "deff": 0.5},
        {"metric": "ratio", "mde": 0.05, "baseline": 0.5},
    ],
)
def test_ab_test_plan_rejects_bad_designs(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        plan_ab(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- analyses


def test_ab_test_fixed_proportions_match_the_z_test_without_clustering() -> None:
    arms = [binary(850, 1000), binary(900, 1000)]
    result = analyze_fixed(arms, PROPORTION)
    _, p = two_proportion_ztest(900, 1000, 850, 1000)
    c = result.comparison(1, 0)
    assert c.p_value == pytest.approx(p, rel=1e-2)  # deff is k/(k-1), a hair above 1
    assert c.effect.estimate == pytest.approx(-0.05)
    assert c.effect.lower < -0.05 < c.effect.upper
    assert result.winner == 1


def test_ab_test_clustering_weakens_the_evidence() -> None:
    """The same 850 vs 900 successes from 100 users of 10 tasks each, users all-or-none."""
    units = np.full(100, 10.0)
    arms = [
        VariantStats.from_units(units, np.r_[np.full(85, 10.0), np.zeros(15)]),
        VariantStats.from_units(units, np.r_[np.full(90, 10.0), np.zeros(10)]),
    ]
    assert design_effect(arms) > 5
    assert analyze_fixed(arms, PROPORTION).winner is None
    assert analyze_fixed([binary(850, 1000), binary(900, 1000)], PROPORTION).winner == 1


def test_ab_test_lower_is_better_picks_the_cheaper_variant() -> None:
    rng = np.random.default_rng(7)
    costs = [rng.normal(1.0, 0.3, 2000), rng.normal(0.9, 0.3, 2000), rng.normal(1.0, 0.3, 2000)]
    arms = [VariantStats.from_units(np.ones(x.size), x) for x in costs]
    assert analyze_fixed(arms, MAGNITUDE, higher_is_better=False).winner == 1
    assert analyze_fixed(arms, MAGNITUDE, higher_is_better=True).winner is None
    seq = analyze_sequential(arms, MAGNITUDE, mde=0.05, higher_is_better=False)
    assert seq.winner == 1


def test_ab_test_ranks_use_scipy_mann_whitney_and_find_a_heavy_tailed_winner() -> None:
    rng = np.random.default_rng(8)
    costs = [rng.lognormal(0.0, 1.0, 1500), rng.lognormal(-0.2, 1.0, 1500), rng.lognormal(0.0, 1.0, 1500)]
    result = analyze_fixed_ranks(costs, higher_is_better=False)
    expected = stats.mannwhitneyu(costs[0], costs[1], alternative="two-sided").pvalue
    assert result.comparison(0, 1).p_value == pytest.approx(expected)
    assert result.winner == 1
    null = [rng.lognormal(0.0, 1.0, 1500) for _ in range(3)]
    assert analyze_fixed_ranks(null, higher_is_better=False).winner is None


def test_ab_test_sequential_e_value_agrees_with_its_confidence_sequence() -> None:
    rng = np.random.default_rng(9)
    for _ in range(200):
        n = int(rng.integers(50, 3000))
        arms = [binary(int(rng.binomial(n, p)), n) for p in (0.85, 0.88, 0.9)]
        result = analyze_sequential(arms, PROPORTION, mde=0.05)
        for c in result.comparisons:
            assert c.e_value is not None
            excluded = not c.effect.contains(0.0)
            assert excluded == c.significant
            # e >= m/alpha exactly when the sequence excludes 0 (up to the root's tolerance)
            if abs(math.log(c.e_value) - math.log(3 / 0.05)) > 1e-6:
                assert (c.e_value >= 3 / 0.05) == excluded


def test_ab_test_sequential_waits_for_units() -> None:
    arms = [binary(0, 20), binary(20, 20)]
    result = analyze_sequential(arms, PROPORTION, mde=0.05)
    assert result.winner is None
    assert math.isinf(result.comparisons[0].effect.upper)
    assert analyze_sequential(arms, PROPORTION, mde=0.05, min_units=10).winner == 1


@pytest.mark.parametrize("k", [1, 6])
def test_ab_test_needs_two_to_five_variants(k: int) -> None:
    arms = [binary(50, 100)] * k
    for call in (
        lambda: analyze_fixed(arms, PROPORTION),
        lambda: analyze_sequential(arms, PROPORTION, mde=0.05),
    ):
        with pytest.raises(ValueError, match="2 to 5 variants"):
            call()


# ---------------------------------------------------------------- sample-ratio mismatch


def test_ab_test_srm_flags_a_52_48_split_of_a_50_50_design() -> None:
    check = sample_ratio_mismatch([52_000, 48_000], [0.5, 0.5])
    assert check.mismatch
    assert check.p_value < 1e-30
    assert check.statistic == pytest.approx(160.0)
    assert check.expected == (50_000.0, 50_000.0)


def test_ab_test_srm_leaves_fair_splits_alone() -> None:
    assert not sample_ratio_mismatch([50_000, 50_000], [1, 1]).mismatch
    rng = np.random.default_rng(10)
    flagged = 0
    for _ in range(2000):
        a = int(rng.binomial(100_000, 0.5))
        flagged += sample_ratio_mismatch([a, 100_000 - a], [0.5, 0.5]).mismatch
    print(f"\n[ab_test] SRM on 2,000 fair 50/50 splits of 100,000: flagged {flagged / 2000:.2%}")
    assert flagged / 2000 <= 0.005  # the threshold is 0.1 %
    # a 52/48 split is caught well before 100,000 units
    assert sample_ratio_mismatch([5_200, 4_800], [0.5, 0.5]).mismatch
    assert not sample_ratio_mismatch([520, 480], [0.5, 0.5]).mismatch


def test_ab_test_srm_uses_the_set_weights() -> None:
    assert not sample_ratio_mismatch([20_000, 40_000, 40_000], [1, 2, 2]).mismatch
    assert sample_ratio_mismatch([20_000, 40_000, 40_000], [1, 1, 1]).mismatch
    assert SRM_THRESHOLD == 0.001
    with pytest.raises(ValueError):
        sample_ratio_mismatch([10, 10], [1.0])
