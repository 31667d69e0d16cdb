"""Fixed-horizon tests and sample sizes: for reports, A/B analyses and the benchmark baseline.

These are valid only for a single look at a pre-planned sample size; the rollout gates use the
sequential tools in `_sequential` instead. Kept here so that reports and benchmarks compare
against the textbook procedure rather than an ad-hoc one. Normal quantiles come from
`statistics.NormalDist`; scipy is needed only by the rank and t tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

_NORMAL = NormalDist()


def _scipy_stats() -> Any:
    """scipy.stats, imported on first use: it takes about a second, and the gates never need it."""
    from scipy import stats  # type: ignore[import-untyped]

    return stats


def _check_probability(name: str, value: float) -> None:
    if not (0 < value < 1):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _check_count(name_y: str, y: int, name_n: str, n: int) -> None:
    if not n > 0:
        raise ValueError(f"{name_n} must be > 0, got {n!r}")
    if not 0 <= y <= n:
        raise ValueError(f"{name_y} must be in [0, {name_n}={n!r}], got {y!r}")


def two_proportion_ztest(y0: int, n0: int, y1: int, n1: int) -> tuple[float, float]:
    """Pooled two-proportion z-test of p1 - p0 (candidate minus stable): (z, two-sided p).

    When the pooled proportion is 0 or 1 both arms are identical (all failures or all
    successes), so there is no evidence of a difference: (0.0, 1.0).
    """
    _check_count("y0", y0, "n0", n0)
    _check_count("y1", y1, "n1", n1)
    pooled = (y0 + y1) / (n0 + n1)
    var = pooled * (1.0 - pooled) * (1.0 / n0 + 1.0 / n1)
    if var <= 0:
        return 0.0, 1.0
    z = (y1 / n1 - y0 / n0) / math.sqrt(var)
    return z, math.erfc(abs(z) / math.sqrt(2.0))


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Mann-Whitney U of x against y and its two-sided p (scipy's exact/asymptotic choice).

    For heavy-tailed metrics (latency, cost) where a t-test on raw values is unreliable.
    """
    if len(x) == 0:
        raise ValueError("x must not be empty")
    if len(y) == 0:
        raise ValueError("y must not be empty")
    res = _scipy_stats().mannwhitneyu(x, y, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def welch_ttest(
    mean0: float, var0: float, n0: int, mean1: float, var1: float, n1: int
) -> tuple[float, float]:
    """Welch's t-test of mean1 - mean0 from sufficient statistics: (t, two-sided p).

    Sufficient statistics are what the windows keep; variances are sample variances (ddof 1).
    """
    for name, var in (("var0", var0), ("var1", var1)):
        if not (math.isfinite(var) and var >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {var!r}")
    for name, n in (("n0", n0), ("n1", n1)):
        if not n >= 2:
            raise ValueError(f"{name} must be >= 2, got {n!r}")
    res = _scipy_stats().ttest_ind_from_stats(
        mean1, math.sqrt(var1), n1, mean0, math.sqrt(var0), n0, equal_var=False
    )
    return float(res.statistic), float(res.pvalue)


def fixed_horizon_n_proportions(
    p0: float, delta: float, alpha: float, power: float, *, continuity_correction: bool = False
) -> int:
    """Per-arm n for the two-sided pooled z-test to detect p1 = p0 + delta.

    n = (z_{1-alpha/2}·√(2p̄q̄) + z_power·√(p0q0 + p1q1))² / δ² with p̄ the mean of p0 and p1
    (Fleiss). That matches `two_proportion_ztest`, which has no continuity correction; pass
    continuity_correction=True for Fleiss's corrected n (for Yates-corrected tests).
    """
    _check_probability("p0", p0)
    _check_probability("alpha", alpha)
    _check_probability("power", power)
    p1 = p0 + delta
    if delta == 0 or not (0 < p1 < 1):
        raise ValueError(f"delta must be non-zero with p0 + delta in (0, 1), got {delta!r}")
    z_a = _NORMAL.inv_cdf(1.0 - alpha / 2.0)
    z_b = _NORMAL.inv_cdf(power)
    p_bar = (p0 + p1) / 2.0
    root = z_a * math.sqrt(2.0 * p_bar * (1.0 - p_bar)) + z_b * math.sqrt(p0 * (1 - p0) + p1 * (1 - p1))
    n = root * root / (delta * delta)
    if continuity_correction:
        n = n / 4.0 * (1.0 + math.sqrt(1.0 + 4.0 / (n * abs(delta)))) ** 2
    return math.ceil(n - 1e-9)  # not rounded up by float noise on an exact integer


def fixed_horizon_n_means(sd: float, delta: float, alpha: float, power: float) -> int:
    """Per-arm n for a two-sided two-sample z-test of means (equal sd) to detect delta.

    n = 2(z_{1-alpha/2} + z_power)²·sd²/δ² (normal approximation; a t-test needs one or two more).
    """
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sd must be finite and > 0, got {sd!r}")
    if not (math.isfinite(delta) and delta != 0):
        raise ValueError(f"delta must be finite and non-zero, got {delta!r}")
    _check_probability("alpha", alpha)
    _check_probability("power", power)
    z = _NORMAL.inv_cdf(1.0 - alpha / 2.0) + _NORMAL.inv_cdf(power)
    return math.ceil(2.0 * (z * sd / delta) ** 2 - 1e-9)


def holm(p_values: Sequence[float], alpha: float) -> list[bool]:
    """Holm step-down rejections at family-wise error alpha, in the input order.

    Uniformly more powerful than Bonferroni at the same guarantee, for any dependence.
    """
    _check_probability("alpha", alpha)
    for p in p_values:
        if not (0 <= p <= 1):
            raise ValueError(f"p_values must all be in [0, 1], got {p!r}")
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    rejected = [False] * m
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (m - rank):
            break
        rejected[i] = True
    return rejected
