"""Fixed-horizon tests and sample sizes, checked against scipy, textbook formulas and simulation."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats  # type: ignore[import-untyped]

from collector.stats import (
    fixed_horizon_n_means,
    fixed_horizon_n_proportions,
    holm,
    mann_whitney,
    two_proportion_ztest,
    welch_ttest,
)

# ---------------------------------------------------------------- two-proportion z-test


@st.composite
def two_arms(draw: st.DrawFn) -> tuple[int, int, int, int]:
    n0, n1 = draw(st.integers(1, 10_000)), draw(st.integers(1, 10_000))
    return draw(st.integers(0, n0)), n0, draw(st.integers(0, n1)), n1


@given(two_arms())
def test_ztest_matches_the_statsmodels_formula(arms: tuple[int, int, int, int]) -> None:
    y0, n0, y1, n1 = arms
    z, p = two_proportion_ztest(y0, n0, y1, n1)
    # statsmodels.stats.proportion.proportions_ztest([y1, y0], [n1, n0]), written out.
    pooled = (y0 + y1) / (n0 + n1)
    var = pooled * (1 - pooled) * (1 / n0 + 1 / n1)
    if var == 0:
        assert (z, p) == (0.0, 1.0)
        return
    expected_z = (y1 / n1 - y0 / n0) / math.sqrt(var)
    assert z == pytest.approx(expected_z, rel=1e-12, abs=1e-12)
    assert p == pytest.approx(2 * stats.norm.sf(abs(expected_z)), rel=1e-9, abs=1e-300)
    assert two_proportion_ztest(y1, n1, y0, n0)[0] == pytest.approx(-z, abs=1e-12)


def test_ztest_known_value() -> None:
    # R: prop.test(c(50, 75), c(1000, 1000), correct = FALSE) gives X-squared = 5.3333 = z^2.
    z, p = two_proportion_ztest(50, 1000, 75, 1000)
    assert z**2 == pytest.approx(16 / 3, rel=1e-12)
    assert z > 0  # the candidate's rate is higher
    assert p == pytest.approx(stats.chi2.sf(16 / 3, 1), rel=1e-9)
    assert p == pytest.approx(0.020921, abs=1e-6)


def test_ztest_rejects_at_rate_alpha_under_the_null() -> None:
    rng = np.random.default_rng(42)
    sims, n, p, alpha = 10_000, 400, 0.3, 0.05
    y0, y1 = rng.binomial(n, p, sims), rng.binomial(n, p, sims)
    rate = np.mean(
        [two_proportion_ztest(int(a), n, int(b), n)[1] < alpha for a, b in zip(y0, y1, strict=True)]
    )
    assert rate == pytest.approx(alpha, abs=4 * math.sqrt(alpha * (1 - alpha) / sims))


@pytest.mark.parametrize(
    ("args", "name"),
    [((0, 0, 0, 10), "n0"), ((0, 10, 0, -1), "n1"), ((11, 10, 0, 10), "y0"), ((0, 10, -1, 10), "y1")],
)
def test_ztest_rejects_bad_counts(args: tuple[int, int, int, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        two_proportion_ztest(*args)


# ---------------------------------------------------------------- Mann-Whitney, Welch


def test_mann_whitney_matches_scipy_and_counts_pairs() -> None:
    assert mann_whitney([1.0, 2.0, 3.0], [1.5, 4.0])[0] == 2.0  # pairs with x > y
    rng = np.random.default_rng(9)
    x, y = rng.lognormal(0, 1, 80), rng.lognormal(0.3, 1, 60)
    ref = stats.mannwhitneyu(x, y, alternative="two-sided")
    u, p = mann_whitney(list(x), list(y))
    assert u == pytest.approx(ref.statistic)
    assert p == pytest.approx(ref.pvalue)
    with pytest.raises(ValueError, match="y"):
        mann_whitney([1.0], [])


def test_welch_matches_the_raw_data_test() -> None:
    rng = np.random.default_rng(10)
    x0, x1 = rng.normal(0, 1, 40), rng.normal(0.5, 2, 25)
    t, p = welch_ttest(x0.mean(), x0.var(ddof=1), x0.size, x1.mean(), x1.var(ddof=1), x1.size)
    ref = stats.ttest_ind(x1, x0, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-9)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    # Welch-Satterthwaite by hand.
    a, b = x0.var(ddof=1) / x0.size, x1.var(ddof=1) / x1.size
    df = (a + b) ** 2 / (a**2 / (x0.size - 1) + b**2 / (x1.size - 1))
    assert p == pytest.approx(2 * stats.t.sf(abs((x1.mean() - x0.mean()) / math.sqrt(a + b)), df), rel=1e-9)


@pytest.mark.parametrize(
    ("args", "name"),
    [((0, -1, 5, 0, 1, 5), "var0"), ((0, 1, 1, 0, 1, 5), "n0"), ((0, 1, 5, 0, math.nan, 5), "var1")],
)
def test_welch_rejects_bad_statistics(args: tuple[float, float, int, float, float, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        welch_ttest(*args)


# ---------------------------------------------------------------- sample sizes


def test_n_for_a_five_point_task_success_change() -> None:
    # Fleiss without continuity correction, the test two_proportion_ztest performs.
    assert fixed_horizon_n_proportions(0.85, 0.05, 0.05, 0.8) == 686
    assert fixed_horizon_n_proportions(0.85, -0.05, 0.05, 0.8) == 906  # a drop: more variance
    # Fleiss with continuity correction (the figure most online calculators print).
    assert fixed_horizon_n_proportions(0.85, 0.05, 0.05, 0.8, continuity_correction=True) == 726
    # Independent: Cohen's arcsine effect size, n = 2((z_a + z_b) / h)^2.
    h = 2 * math.asin(math.sqrt(0.90)) - 2 * math.asin(math.sqrt(0.85))
    cohen = 2 * ((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / h) ** 2
    assert fixed_horizon_n_proportions(0.85, 0.05, 0.05, 0.8) == pytest.approx(cohen, rel=0.02)


def test_n_for_proportions_gives_the_stated_power_in_simulation() -> None:
    n = fixed_horizon_n_proportions(0.85, 0.05, 0.05, 0.8)
    rng = np.random.default_rng(8)
    sims = 10_000
    y0, y1 = rng.binomial(n, 0.85, sims), rng.binomial(n, 0.90, sims)
    power = np.mean(
        [two_proportion_ztest(int(a), n, int(b), n)[1] < 0.05 for a, b in zip(y0, y1, strict=True)]
    )
    assert power == pytest.approx(0.8, abs=0.02)


@given(st.floats(0.01, 0.99), st.floats(-0.5, 0.5), st.floats(0.001, 0.2), st.floats(0.5, 0.99))
def test_n_for_proportions_decreases_with_effect_size(
    p0: float, delta: float, alpha: float, power: float
) -> None:
    if abs(delta) < 1e-3 or not 0 < p0 + 2 * delta < 1 or not 0 < p0 + delta < 1:
        return
    assert fixed_horizon_n_proportions(p0, 2 * delta, alpha, power) <= fixed_horizon_n_proportions(
        p0, delta, alpha, power
    )


def test_n_for_means_matches_the_textbook_formula() -> None:
    assert fixed_horizon_n_means(1.0, 0.5, 0.05, 0.8) == 63  # Lehr's rule of thumb 16/delta^2 = 64
    for sd, delta, alpha, power in [(2.0, 0.3, 0.01, 0.9), (0.5, -0.1, 0.05, 0.8), (10.0, 1.0, 0.1, 0.95)]:
        expected = 2 * ((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * sd / delta) ** 2
        assert fixed_horizon_n_means(sd, delta, alpha, power) == math.ceil(expected)


@pytest.mark.parametrize(
    ("call", "name"),
    [(lambda: fixed_horizon_n_proportions(0.0, 0.1, 0.05, 0.8), "p0"),
     (lambda: fixed_horizon_n_proportions(0.9, 0.1, 0.05, 0.8), "delta"),
     (lambda: fixed_horizon_n_proportions(0.5, 0.0, 0.05, 0.8), "delta"),
     (lambda: fixed_horizon_n_proportions(0.5, 0.1, 1.0, 0.8), "alpha"),
     (lambda: fixed_horizon_n_proportions(0.5, 0.1, 0.05, 0.0), "power"),
     (lambda: fixed_horizon_n_means(0.0, 0.1, 0.05, 0.8), "sd"),
     (lambda: fixed_horizon_n_means(1.0, 0.0, 0.05, 0.8), "delta")],
)  # fmt: skip
def test_sample_sizes_reject_bad_arguments(call: Callable[[], int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()


# ---------------------------------------------------------------- Holm


def test_holm_hand_computed() -> None:
    # Sorted: 0.005 <= 0.05/4, 0.01 <= 0.05/3, 0.03 > 0.05/2 stops; 0.04 is not tested.
    assert holm([0.01, 0.04, 0.03, 0.005], 0.05) == [True, False, False, True]
    assert holm([0.02, 0.02], 0.05) == [True, True]  # 0.02 <= 0.025, then 0.02 <= 0.05
    assert holm([0.03, 0.02], 0.05) == [True, True]  # 0.02 <= 0.025, then 0.03 <= 0.05
    assert holm([0.03, 0.026], 0.05) == [False, False]  # 0.026 > 0.025 stops at once
    assert holm([], 0.05) == []
    with pytest.raises(ValueError, match="p_values"):
        holm([0.5, 1.5], 0.05)
    with pytest.raises(ValueError, match="alpha"):
        holm([0.5], 0.0)


@given(st.lists(st.floats(0, 1), max_size=20), st.floats(0.001, 0.5))
def test_holm_lies_between_bonferroni_and_unadjusted(p_values: list[float], alpha: float) -> None:
    got = holm(p_values, alpha)
    m = len(p_values)
    for p, rejected in zip(p_values, got, strict=True):
        if p <= alpha / m:
            assert rejected
        if p > alpha:
            assert not rejected
    # Step-down: every rejected p is smaller than or equal to every retained p.
    kept = [p for p, r in zip(p_values, got, strict=True) if not r]
    assert not kept or all(p <= min(kept) for p, r in zip(p_values, got, strict=True) if r)
