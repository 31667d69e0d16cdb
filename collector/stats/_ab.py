"""A/B tests with 2 to 5 variants: planning, fixed-horizon and sequential analysis, and SRM.

Each variant's evidence is the sums over its randomization units (users) of each unit's count n
and sum s, as in the rollout evidence: K, N = Σn, S = Σs, NN = Σn², SS = Σs², NS = Σns. A
proportion (task success, thumbs-up) has s = successes of n trials; a magnitude (judge score,
cost per task) has s = the sum of n values. The mean is S/N and its variance is the cluster-robust
(sandwich) one of `ratio_mean_variance`, so correlated observations of one user are not counted
as independent.

- **Fixed horizon** (`analyze_fixed`): one look at the planned n. Proportions use the pooled
  two-proportion z-test, its z divided by the square root of the design effect of clustering;
  magnitudes a normal approximation with the cluster-robust variance. `analyze_fixed_ranks` runs
  Mann-Whitney U on raw samples (one value per unit) for a heavy-tailed magnitude. All
  k(k-1)/2 pairwise tests are held at family-wise error alpha by Holm's step-down; the reported
  intervals are simultaneous (Bonferroni, alpha/m each).
- **Sequential** (`analyze_sequential`): the gates' confidence sequence (the normal-mixture mSPRT
  mixed over scales from the MDE up, `scale_mixture_half_width`) on every pairwise difference at
  alpha/m each (an alpha split: a union bound over the m sequences, valid at every look at once).
  The e-value of a pair is that mixture's likelihood ratio against "no difference"; its interval
  excludes 0 exactly when e >= m/alpha.
- **Winner**: a variant better than every other, each comparison significant (k-1 of them).
- **Planning** (`plan_ab`): the fixed n per variant, the sequential test's own n (the single-look
  power bound of the confidence sequence: every earlier look only adds power), and its expected
  n at the MDE by the known first-order approximation (documented on `ABPlan`).
- **Sample-ratio mismatch** (`sample_ratio_mismatch`): a chi-square goodness-of-fit test of the
  observed units per variant against the set weights, flagged at a strict p < 0.001.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from collector.stats._fixed import (
    _scipy_stats,
    fixed_horizon_n_means,
    fixed_horizon_n_proportions,
    holm,
    mann_whitney,
    two_proportion_ztest,
)
from collector.stats._scales import (
    _log_mixture,
    scale_grid,
    scale_mixture_detectable_effect,
    scale_mixture_half_width,
)
from collector.stats._sequential import Interval, proportion_difference_variance, ratio_mean_variance

PROPORTION, MAGNITUDE = "proportion", "magnitude"
Metric = Literal["proportion", "magnitude"]
Correction = Literal["holm", "none"]
MIN_VARIANTS, MAX_VARIANTS = 2, 5
SRM_THRESHOLD = 0.001  # strict: a broken assignment is a bug to stop for, not a borderline call
MIN_UNITS = 30  # per variant before a sequential look: the normal approximation needs some data
_MAX_EXP = 709.0
_NORMAL = NormalDist()


@dataclass(frozen=True)
class VariantStats:
    """One variant's sufficient statistics over its K randomization units (see the module doc)."""

    k: float
    n: float
    s: float
    nn: float
    ss: float
    ns: float

    @classmethod
    def from_units(
        cls,
        counts: Sequence[float] | npt.NDArray[Any],
        sums: Sequence[float] | npt.NDArray[Any],
    ) -> VariantStats:
        """From each unit's count n_i and sum s_i (for a proportion, trials and successes)."""
        n = np.asarray(counts, dtype=float).ravel()
        s = np.asarray(sums, dtype=float).ravel()
        if n.shape != s.shape:
            raise ValueError(f"counts and sums differ in length: {n.size} != {s.size}")
        if n.size and not bool(np.all(n >= 0)):
            raise ValueError("counts must all be >= 0")
        return cls(
            float(n.size),
            float(n.sum()),
            float(s.sum()),
            float((n * n).sum()),
            float((s * s).sum()),
            float((n * s).sum()),
        )

    @property
    def mean(self) -> float:
        """S/N (nan with no observations)."""
        return self.s / self.n if self.n > 0 else math.nan

    @property
    def mean_variance(self) -> float:
        """Cluster-robust variance of the mean (inf with fewer than 2 units)."""
        return ratio_mean_variance(int(self.k), self.n, self.s, self.nn, self.ss, self.ns)


@dataclass(frozen=True)
class Comparison:
    """Variant `first` against `second` (first < second): effect = mean[first] - mean[second].

    `p_value` is set by the fixed-horizon analyses, `e_value` by the sequential one; `effect` is
    the simultaneous confidence interval (fixed) or confidence sequence (sequential).
    """

    first: int
    second: int
    effect: Interval
    significant: bool
    p_value: float | None = None
    e_value: float | None = None


@dataclass(frozen=True)
class ABResult:
    """The analysis of one look: the winner (None when no variant beats every other) and why."""

    method: str
    alpha: float
    means: tuple[float, ...]
    comparisons: tuple[Comparison, ...]
    winner: int | None

    def comparison(self, i: int, j: int) -> Comparison:
        """The comparison of variants i and j, whichever order it is stored in."""
        a, b = min(i, j), max(i, j)
        for c in self.comparisons:
            if (c.first, c.second) == (a, b):
                return c
        raise KeyError((i, j))


@dataclass(frozen=True)
class ABPlan:
    """Per-variant sample sizes (observations; units when each unit has one) for one design.

    - `fixed_n`: the fixed-horizon test (Holm's first step: alpha/m per comparison).
    - `sequential_n`: the confidence sequence's single-look power bound: the n at which one look
      detects the MDE with `power_per_comparison` (every earlier look only adds power), the
      horizon to budget for.
    - `sequential_expected_n`: the known first-order approximation of the stopping time at the
      MDE, the n where the half-width falls to the MDE (the expected path d = MDE then first
      clears 0): about the median stopping time of one comparison. A winner among k needs all
      k-1 comparisons, so it stops somewhat later; the tests measure both by simulation.

    Power is split over the k-1 comparisons a winner needs (`power_per_comparison` =
    1 - (1 - power)/(k-1), a union bound on the misses), so the joint power is at least `power`.
    All sizes include the design effect `deff` of clustering.
    """

    fixed_n: int
    sequential_n: int
    sequential_expected_n: int
    alpha_per_comparison: float
    power_per_comparison: float


@dataclass(frozen=True)
class SampleRatioCheck:
    """Chi-square goodness of fit of the observed units per variant against the set weights."""

    statistic: float
    p_value: float
    expected: tuple[float, ...]
    mismatch: bool


def _check_probability(name: str, value: float) -> None:
    if not (0 < value < 1):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _check_variants(k: int) -> None:
    if not MIN_VARIANTS <= k <= MAX_VARIANTS:
        raise ValueError(f"an A/B test has {MIN_VARIANTS} to {MAX_VARIANTS} variants, got {k}")


def _check_metric(metric: str) -> None:
    if metric not in (PROPORTION, MAGNITUDE):
        raise ValueError(f"metric must be {PROPORTION!r} or {MAGNITUDE!r}, got {metric!r}")


def pairs(k: int) -> list[tuple[int, int]]:
    """The k(k-1)/2 pairwise comparisons (i, j), i < j, in a fixed order."""
    return list(itertools.combinations(range(k), 2))


def design_effect(variants: Sequence[VariantStats]) -> float:
    """How much clustering by unit inflates a proportion's variance over the binomial one (>= 1).

    The ratio of the summed cluster-robust variances to the summed binomial ones; 1 when either
    cannot be estimated. Also the `deff` to plan with, measured on a pilot or earlier data.
    """
    robust = naive = 0.0
    for v in variants:
        if v.k < 2 or v.n <= 0:
            return 1.0
        p = v.s / v.n
        robust += v.mean_variance
        naive += p * (1.0 - p) / v.n
    if naive <= 0 or not math.isfinite(robust):
        return 1.0
    return max(robust / naive, 1.0)


def _winner(k: int, comparisons: Sequence[Comparison], higher_is_better: bool) -> int | None:
    """The variant that beats every other with significance, or None."""
    beats = [0] * k
    for c in comparisons:
        if not c.significant:
            continue
        first_better = (c.effect.estimate > 0) == higher_is_better
        beats[c.first if first_better else c.second] += 1
    for i, wins in enumerate(beats):
        if wins == k - 1:
            return i
    return None


def _reject(p_values: Sequence[float], alpha: float, correction: Correction) -> list[bool]:
    if correction == "holm":
        return holm(p_values, alpha)
    if correction == "none":
        return [p <= alpha for p in p_values]
    raise ValueError(f"correction must be 'holm' or 'none', got {correction!r}")


def _normal_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


def analyze_fixed(
    variants: Sequence[VariantStats],
    metric: Metric,
    alpha: float = 0.05,
    *,
    higher_is_better: bool = True,
    correction: Correction = "holm",
) -> ABResult:
    """The fixed-horizon analysis at the planned n: one look only (peeking voids it).

    Proportions: pooled two-proportion z-test with z / √deff (deff from all variants);
    magnitudes: z = d / √(V0 + V1) with cluster-robust variances. Intervals are Wald intervals
    at alpha/m (simultaneous); decisions by Holm (or uncorrected, to show what Holm buys).
    """
    _check_probability("alpha", alpha)
    _check_metric(metric)
    k = len(variants)
    _check_variants(k)
    todo = pairs(k)
    m = len(todo)
    z_ci = _NORMAL.inv_cdf(1.0 - alpha / (2.0 * m))
    deff = design_effect(variants) if metric == PROPORTION else 1.0
    estimates, variances, p_values = [], [], []
    for i, j in todo:
        a, b = variants[i], variants[j]
        d = a.mean - b.mean
        if metric == PROPORTION:
            z, _ = two_proportion_ztest(round(b.s), round(b.n), round(a.s), round(a.n))
            p = _normal_p(z / math.sqrt(deff))
            v = (a.mean * (1 - a.mean) / a.n + b.mean * (1 - b.mean) / b.n) * deff
        else:
            v = a.mean_variance + b.mean_variance
            p = _normal_p(d / math.sqrt(v)) if math.isfinite(v) and v > 0 else 1.0
        estimates.append(d)
        variances.append(v)
        p_values.append(p)
    rejected = _reject(p_values, alpha, correction)
    comparisons = tuple(
        Comparison(i, j, _wald(d, v, z_ci), rej, p_value=p)
        for (i, j), d, v, p, rej in zip(todo, estimates, variances, p_values, rejected, strict=True)
    )
    return ABResult(
        f"fixed-{correction}",
        alpha,
        tuple(v.mean for v in variants),
        comparisons,
        _winner(k, comparisons, higher_is_better),
    )


def _wald(d: float, v: float, z: float) -> Interval:
    if not (math.isfinite(d) and math.isfinite(v)):
        return Interval(d, -math.inf, math.inf)
    h = z * math.sqrt(max(v, 0.0))
    return Interval(d, d - h, d + h)


def analyze_fixed_ranks(
    samples: Sequence[Sequence[float]],
    alpha: float = 0.05,
    *,
    higher_is_better: bool = True,
    correction: Correction = "holm",
) -> ABResult:
    """Mann-Whitney U (scipy.stats.mannwhitneyu) on raw samples, one value per unit per variant.

    For a heavy-tailed magnitude (cost per task) where a mean's normal approximation is poor.
    The rank test decides (p-values, Holm, winner); the effect reported is the difference of
    means with its simultaneous normal interval, for scale. The direction of a significant
    comparison is that of the rank statistic (U above or below n_i·n_j/2).
    """
    _check_probability("alpha", alpha)
    k = len(samples)
    _check_variants(k)
    todo = pairs(k)
    m = len(todo)
    z_ci = _NORMAL.inv_cdf(1.0 - alpha / (2.0 * m))
    arrays = [np.asarray(x, dtype=float).ravel() for x in samples]
    means = tuple(float(x.mean()) if x.size else math.nan for x in arrays)
    p_values, effects, ranks_up = [], [], []
    for i, j in todo:
        a, b = arrays[i], arrays[j]
        u, p = mann_whitney(a.tolist(), b.tolist())
        ranks_up.append(u > a.size * b.size / 2.0)
        v = (float(a.var(ddof=1)) / a.size if a.size > 1 else math.inf) + (
            float(b.var(ddof=1)) / b.size if b.size > 1 else math.inf
        )
        effects.append(_wald(means[i] - means[j], v, z_ci))
        p_values.append(p)
    rejected = _reject(p_values, alpha, correction)
    comparisons = tuple(
        Comparison(i, j, eff, rej, p_value=p)
        for (i, j), eff, p, rej in zip(todo, effects, p_values, rejected, strict=True)
    )
    # the winner follows the rank direction, which can differ from the sign of the means' difference
    beats = [0] * k
    for c, up in zip(comparisons, ranks_up, strict=True):
        if c.significant:
            beats[c.first if up == higher_is_better else c.second] += 1
    winner = next((i for i, w in enumerate(beats) if w == k - 1), None)
    return ABResult(f"ranks-{correction}", alpha, means, comparisons, winner)


def _pair_variance(metric: Metric, a: VariantStats, b: VariantStats) -> float:
    if metric == PROPORTION:
        # pooled under "no difference", lightly shrunk, inflated by the pair's design effect
        return proportion_difference_variance(b.s, b.n, a.s, a.n, design_effect((a, b)))
    return a.mean_variance + b.mean_variance


def analyze_sequential(
    variants: Sequence[VariantStats],
    metric: Metric,
    mde: float,
    alpha: float = 0.05,
    *,
    higher_is_better: bool = True,
    min_units: int = MIN_UNITS,
) -> ABResult:
    """One look of the sequential test: valid at every look, so it may be run after every batch.

    Each pairwise difference gets the scale-mixture confidence sequence at alpha/m (mixing scales
    from the MDE up); a comparison is significant when its sequence excludes 0, equivalently when
    its e-value reaches m/alpha. Stop at the first look with a winner. Before `min_units` units
    on every variant nothing is significant.

    As in the gates, the variance is a plug-in (pooled and shrunk for a proportion, times the
    pair's design effect; cluster-robust for a magnitude), so the guarantee is the normal
    approximation's: `min_units` keeps the first looks from leaning on it too early.
    """
    _check_probability("alpha", alpha)
    _check_metric(metric)
    if not (math.isfinite(mde) and mde > 0):
        raise ValueError(f"mde must be finite and > 0, got {mde!r}")
    k = len(variants)
    _check_variants(k)
    todo = pairs(k)
    alpha_each = alpha / len(todo)
    grid = scale_grid(mde)
    ready = min(v.k for v in variants) >= min_units
    comparisons = []
    for i, j in todo:
        a, b = variants[i], variants[j]
        d = a.mean - b.mean
        v = _pair_variance(metric, a, b)
        h = scale_mixture_half_width(v, mde, alpha_each)
        if not (ready and math.isfinite(d) and math.isfinite(h)):
            comparisons.append(Comparison(i, j, Interval(d, -math.inf, math.inf), False, e_value=1.0))
            continue
        log_e = _log_mixture(abs(d), v, grid)
        e = math.inf if log_e > _MAX_EXP else math.exp(log_e)
        comparisons.append(Comparison(i, j, Interval(d, d - h, d + h), abs(d) > h, e_value=e))
    return ABResult(
        "sequential",
        alpha,
        tuple(v.mean for v in variants),
        tuple(comparisons),
        _winner(k, comparisons, higher_is_better),
    )


def plan_ab(
    metric: Metric,
    *,
    mde: float,
    alpha: float = 0.05,
    power: float = 0.8,
    variants: int = 2,
    baseline: float | None = None,
    sd: float | None = None,
    deff: float = 1.0,
) -> ABPlan:
    """Per-variant sample sizes to find a variant `mde` better than the rest.

    Proportions need the `baseline` rate (the alternative is baseline + mde); magnitudes the
    per-observation `sd`. The fixed n is Fleiss's two-proportion n (or the normal n for means)
    at alpha/m and the per-comparison power; see `ABPlan` for the sequential figures.
    """
    _check_metric(metric)
    _check_probability("alpha", alpha)
    _check_probability("power", power)
    _check_variants(variants)
    if not (math.isfinite(mde) and mde > 0):
        raise ValueError(f"mde must be finite and > 0, got {mde!r}")
    if not (math.isfinite(deff) and deff >= 1):
        raise ValueError(f"deff must be finite and >= 1, got {deff!r}")
    m = variants * (variants - 1) // 2
    alpha_each = alpha / m
    power_each = 1.0 - (1.0 - power) / (variants - 1)
    if metric == PROPORTION:
        if baseline is None:
            raise ValueError("a proportion needs the baseline rate")
        fixed = fixed_horizon_n_proportions(baseline, mde, alpha_each, power_each)
        p1 = baseline + mde
        unit_variance = baseline * (1 - baseline) + p1 * (1 - p1)
    else:
        if sd is None:
            raise ValueError("a magnitude needs the per-observation sd")
        fixed = fixed_horizon_n_means(sd, mde, alpha_each, power_each)
        unit_variance = 2.0 * sd * sd

    def powered(n: int) -> bool:
        return scale_mixture_detectable_effect(unit_variance / n, mde, alpha_each, power_each) <= mde

    def crossed(n: int) -> bool:
        return scale_mixture_half_width(unit_variance / n, mde, alpha_each) <= mde

    return ABPlan(
        math.ceil(fixed * deff),
        math.ceil(_smallest(powered) * deff),
        math.ceil(_smallest(crossed) * deff),
        alpha_each,
        power_each,
    )


def _smallest(ok: Callable[[int], bool]) -> int:
    """The smallest n >= 1 with ok(n), for ok monotone in n (false, then true for ever)."""
    hi = 1
    while not ok(hi):
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def sample_ratio_mismatch(
    counts: Sequence[int], weights: Sequence[float], threshold: float = SRM_THRESHOLD
) -> SampleRatioCheck:
    """Is the assignment broken? scipy.stats.chisquare of units per variant against the weights.

    `mismatch` when p < threshold (0.001 by default: with continuous checks a looser threshold
    would stop healthy tests; a real mismatch at any size of test reaches it quickly).
    """
    _check_probability("threshold", threshold)
    if len(counts) != len(weights) or len(counts) < MIN_VARIANTS:
        raise ValueError("counts and weights need one entry per variant, at least two")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"weights must all be finite and > 0, got {list(weights)!r}")
    if not all(c >= 0 for c in counts):
        raise ValueError(f"counts must all be >= 0, got {list(counts)!r}")
    total = float(sum(counts))
    if total <= 0:
        return SampleRatioCheck(0.0, 1.0, tuple(0.0 for _ in counts), False)
    w_sum = math.fsum(weights)
    expected = [total * w / w_sum for w in weights]
    res = _scipy_stats().chisquare([float(c) for c in counts], expected)
    p = float(res.pvalue)
    return SampleRatioCheck(float(res.statistic), p, tuple(expected), p < threshold)
