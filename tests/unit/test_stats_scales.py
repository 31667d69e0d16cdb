"""The gates' scale-mixture confidence sequence: valid under continuous monitoring, close to the
single-scale mSPRT near the margin, much faster on large effects."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.stats import SCALE_WEIGHTS, msprt_half_width, scale_grid, scale_mixture_half_width
from collector.stats._scales import _log_mixture

LOOKS = 2000
PATHS = 2000


def _ever_excludes(effect: float, alpha: float, margin: float, seed: int) -> float:
    """Share of paths (unit-variance increments, V = 1/n) whose sequence ever excludes 0."""
    rng = np.random.default_rng(seed)
    n = np.arange(1, LOOKS + 1)
    h = np.array([scale_mixture_half_width(1.0 / k, margin, alpha) for k in n])
    means = np.cumsum(rng.normal(effect, 1.0, size=(PATHS, LOOKS)), axis=1) / n
    return float((np.abs(means) > h).any(axis=1).mean())


def test_weights_sum_to_one_and_scales_double() -> None:
    assert sum(SCALE_WEIGHTS) == pytest.approx(1.0)
    taus = [tau for tau, _ in scale_grid(0.01)]
    assert taus[0] == 0.01 and all(b == pytest.approx(2 * a) for a, b in itertools.pairwise(taus))


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_null_paths_exclude_zero_at_most_alpha_under_continuous_looks(alpha: float) -> None:
    rate = _ever_excludes(0.0, alpha, margin=0.1, seed=11)
    slack = 3 * math.sqrt(alpha * (1 - alpha) / PATHS)
    assert rate <= alpha + slack


def test_a_large_effect_is_found_far_sooner_than_with_the_margin_scale_alone() -> None:
    margin, alpha, effect = 0.01, 0.003, 0.3  # thirty margins
    first_mixture = next(
        n for n in range(1, 10**6) if scale_mixture_half_width(1 / n, margin, alpha) < effect
    )
    first_single = next(n for n in range(1, 10**6) if msprt_half_width(1 / n, margin, alpha) < effect)
    assert first_mixture * 5 < first_single


def test_near_the_margin_it_costs_little_over_the_single_scale() -> None:
    for variance in (1e-6, 1e-5, 1e-4):  # tau^2 = 1e-4: the promotion regime, V <= tau^2
        mixture, single = (
            scale_mixture_half_width(variance, 0.01, 0.003),
            msprt_half_width(variance, 0.01, 0.003),
        )
        assert single * 0.8 < mixture < single * 1.15


@given(st.floats(1e-9, 1e3), st.floats(1e-4, 10.0), st.floats(1e-4, 0.2))
def test_the_half_width_solves_the_mixture_equation_and_grows_with_the_variance(
    variance: float, margin: float, alpha: float
) -> None:
    h = scale_mixture_half_width(variance, margin, alpha)
    assert math.isfinite(h) and h > 0
    assert _log_mixture(h, variance, scale_grid(margin)) == pytest.approx(math.log(1 / alpha), abs=1e-6)
    assert scale_mixture_half_width(variance * 2, margin, alpha) > h


def test_unusable_variance_and_bad_arguments() -> None:
    assert scale_mixture_half_width(0.0, 0.1, 0.05) == math.inf
    assert scale_mixture_half_width(float("nan"), 0.1, 0.05) == math.inf
    with pytest.raises(ValueError, match="alpha"):
        scale_mixture_half_width(1.0, 0.1, 1.5)
    with pytest.raises(ValueError, match="margin"):
        scale_mixture_half_width(1.0, -1.0, 0.05)
