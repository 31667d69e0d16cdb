"""Sequential statistics: mSPRT confidence sequences, variance helpers and the safety e-process.

The simulations check the property the gates rely on: error rates stay below alpha even when the
data are looked at after every batch. Seeds are fixed and the work is vectorised with numpy.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.stats import (
    DEFAULT_RATIOS,
    CountEProcess,
    Interval,
    confidence_sequence,
    msprt_half_width,
    normal_mixture_detectable_effect,
    proportion_difference_variance,
    ratio_mean_variance,
    samples_to_detect,
)


def slack(alpha: float, paths: int) -> float:
    """Three binomial standard errors: room for Monte Carlo noise around a rate of alpha."""
    return 3.0 * math.sqrt(alpha * (1.0 - alpha) / paths)


def half_widths(variances: np.ndarray, tau: float, alpha: float) -> np.ndarray:
    return np.array([msprt_half_width(float(v), tau, alpha) for v in variances.ravel()]).reshape(
        variances.shape
    )


# ---------------------------------------------------------------- msprt_half_width


variances = st.floats(1e-12, 1e6, allow_nan=False)
taus = st.floats(1e-4, 1e2)
alphas = st.floats(1e-6, 0.5)


@given(variances, variances, taus, alphas)
def test_half_width_increases_with_variance(v1: float, v2: float, tau: float, alpha: float) -> None:
    lo, hi = sorted((v1, v2))
    assert msprt_half_width(lo, tau, alpha) <= msprt_half_width(hi, tau, alpha)


@given(variances, taus, alphas, alphas)
def test_half_width_decreases_with_alpha(v: float, tau: float, a1: float, a2: float) -> None:
    lo, hi = sorted((a1, a2))
    assert msprt_half_width(v, tau, hi) <= msprt_half_width(v, tau, lo)


@given(variances, taus, alphas)
def test_half_width_is_where_the_mixture_lr_reaches_one_over_alpha(v: float, tau: float, a: float) -> None:
    # The normal-mixture LR at difference d: sqrt(V/(V+tau^2)) exp(tau^2 d^2 / (2V(V+tau^2))).
    h = msprt_half_width(v, tau, a)
    log_lr = 0.5 * math.log(v / (v + tau**2)) + tau**2 * h**2 / (2 * v * (v + tau**2))
    assert log_lr == pytest.approx(math.log(1 / a), rel=1e-9, abs=1e-9)


def test_half_width_asymptotics() -> None:
    tau, alpha = 0.5, 0.05
    # Small V (much data): h ~ sqrt(V (2 ln(1/alpha) + ln(tau^2/V))), i.e. sqrt(V log(1/V)).
    v = 1e-10 * tau**2
    expected = math.sqrt(v * (2 * math.log(1 / alpha) + math.log(tau**2 / v)))
    assert msprt_half_width(v, tau, alpha) == pytest.approx(expected, rel=1e-8)
    # Large V (little data): h ~ (V / tau) sqrt(2 ln(1/alpha)), linear in V.
    v = 1e10 * tau**2
    expected = v / tau * math.sqrt(2 * math.log(1 / alpha))
    assert msprt_half_width(v, tau, alpha) == pytest.approx(expected, rel=1e-8)
    # A subnormal variance still gives a (tiny) finite width, not inf from an overflowing tau^2/V.
    assert 0 < msprt_half_width(5e-324, tau, alpha) < 1e-150


@pytest.mark.parametrize("variance", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_half_width_without_usable_variance_is_infinite(variance: float) -> None:
    assert msprt_half_width(variance, 0.1, 0.05) == math.inf
    assert not confidence_sequence(0.5, variance, 0.1, 0.05).contains(math.nan)
    assert confidence_sequence(0.5, variance, 0.1, 0.05).contains(1e300)


@pytest.mark.parametrize(
    ("tau", "alpha", "name"),
    [(0.0, 0.05, "tau"), (-1.0, 0.05, "tau"), (math.nan, 0.05, "tau"), (math.inf, 0.05, "tau"),
     (0.1, 0.0, "alpha"), (0.1, 1.0, "alpha"), (0.1, math.nan, "alpha")],
)  # fmt: skip
def test_half_width_rejects_bad_arguments(tau: float, alpha: float, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        msprt_half_width(1.0, tau, alpha)


def test_confidence_sequence_interval() -> None:
    ci = confidence_sequence(0.2, 0.01, 0.1, 0.05)
    h = msprt_half_width(0.01, 0.1, 0.05)
    assert ci == Interval(0.2, 0.2 - h, 0.2 + h)
    assert ci.contains(0.2) and ci.contains(0.2 + h) and not ci.contains(0.2 + 1.01 * h)
    unbounded = confidence_sequence(math.nan, 0.01, 0.1, 0.05)
    assert unbounded.lower == -math.inf and unbounded.upper == math.inf


def test_normal_cs_keeps_alpha_over_2000_looks_and_detects_an_effect() -> None:
    rng = np.random.default_rng(20260101)
    paths, looks, alpha, tau = 2000, 2000, 0.05, 0.3
    n = np.arange(1, looks + 1)
    h = half_widths(1.0 / n, tau, alpha)
    z = rng.standard_normal((paths, looks))
    d = np.cumsum(z, axis=1) / n  # the running mean of N(0, 1) increments, V = 1/n

    false_exclusion = np.mean(np.any(np.abs(d) > h, axis=1))
    assert false_exclusion <= alpha + slack(alpha, paths)
    # The same data with a fixed-horizon interval at every look: peeking breaks it.
    naive = np.mean(np.any(np.abs(d) > 1.959964 / np.sqrt(n), axis=1))
    assert naive > 4 * alpha

    d_effect = d + 0.3  # the same noise around a true mean of 0.3
    assert np.mean(np.any(d_effect - h > 0, axis=1)) > 0.9
    assert np.mean(np.any(np.abs(d_effect - 0.3) > h, axis=1)) == false_exclusion  # covers 0.3


def test_proportion_cs_keeps_alpha_for_rare_bernoulli_outcomes() -> None:
    rng = np.random.default_rng(7)
    paths, looks, per_look, alpha, tau = 2000, 100, 100, 0.05, 0.01
    n = per_look * np.arange(1, looks + 1, dtype=float)
    variance = np.frompyfunc(proportion_difference_variance, 4, 1)

    def excluded(p0: float, p1: float) -> tuple[np.ndarray, np.ndarray]:
        y0 = np.cumsum(rng.binomial(per_look, p0, (paths, looks)), axis=1).astype(float)
        y1 = np.cumsum(rng.binomial(per_look, p1, (paths, looks)), axis=1).astype(float)
        h = half_widths(variance(y0, n, y1, n).astype(float), tau, alpha)
        d = (y1 - y0) / n
        return np.any(d - h > 0, axis=1), np.any(d + h < 0, axis=1)

    above, below = excluded(0.01, 0.01)
    assert np.mean(above | below) <= alpha + slack(alpha, paths)
    above, _ = excluded(0.01, 0.03)  # errors +2 points
    assert np.mean(above) > 0.9


# ---------------------------------------------------------------- variance helpers


def test_proportion_difference_variance() -> None:
    p = (3 + 5 + 0.5) / (100 + 200 + 1)
    assert proportion_difference_variance(3, 100, 5, 200) == pytest.approx(p * (1 - p) * (1 / 100 + 1 / 200))
    assert proportion_difference_variance(3, 100, 5, 200, deff=2.0) == pytest.approx(
        2 * proportion_difference_variance(3, 100, 5, 200)
    )
    # No events yet: the prior keeps V > 0, so the interval stays finite but wide.
    assert proportion_difference_variance(0, 50, 0, 50) > 0
    assert proportion_difference_variance(0, 50, 0, 50, prior=0.0) == 0.0
    assert proportion_difference_variance(0, 0, 1, 10) == math.inf
    assert proportion_difference_variance(0, 10, 0, -1) == math.inf


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"deff": 0.0}, "deff"), ({"deff": math.nan}, "deff"), ({"prior": -1.0}, "prior"),
     ({"y0": 11.0}, "y0"), ({"y1": -1.0}, "y1")],
)  # fmt: skip
def test_proportion_difference_variance_rejects_bad_arguments(kwargs: dict[str, float], name: str) -> None:
    args = {"y0": 1.0, "n0": 10.0, "y1": 1.0, "n1": 10.0} | kwargs
    with pytest.raises(ValueError, match=name):
        proportion_difference_variance(**args)


units = st.lists(st.tuples(st.integers(1, 30), st.floats(0, 1e3)), min_size=2, max_size=60)


@given(units)
def test_ratio_mean_variance_matches_the_per_unit_formula(data: list[tuple[int, float]]) -> None:
    counts = [float(c) for c, _ in data]
    sums = [s for _, s in data]
    k, n, s = len(data), math.fsum(counts), math.fsum(sums)
    m = s / n
    direct = k / (k - 1) * math.fsum((si - m * ni) ** 2 for ni, si in data) / n**2
    got = ratio_mean_variance(
        k,
        n,
        s,
        math.fsum(c * c for c in counts),
        math.fsum(x * x for x in sums),
        math.fsum(c * x for c, x in zip(counts, sums, strict=True)),
    )
    scale = k / (k - 1) * (math.fsum(x * x for x in sums) + m * m * math.fsum(c * c for c in counts)) / n**2
    assert got >= 0
    assert got == pytest.approx(direct, rel=1e-9, abs=1e-12 * scale + 1e-300)  # 1e-300: underflow


@given(st.lists(st.booleans(), min_size=2, max_size=500))
def test_ratio_mean_variance_is_binomial_for_one_observation_per_unit(outcomes: list[bool]) -> None:
    k, s = len(outcomes), float(sum(outcomes))
    p = s / k
    got = ratio_mean_variance(k, float(k), s, float(k), s, s)
    assert got == pytest.approx(k / (k - 1) * p * (1 - p) / k, rel=1e-9, abs=1e-15)


def test_ratio_mean_variance_tracks_the_spread_of_clustered_data() -> None:
    # Sessions with a shared random effect: the naive binomial variance is too small, the
    # sandwich variance matches the spread of m across replicates.
    rng = np.random.default_rng(3)
    reps, k = 2000, 200
    sizes = rng.integers(1, 20, (reps, k)).astype(float)
    rates = np.clip(0.3 + rng.normal(0, 0.15, (reps, k)), 0, 1)
    sums = rng.binomial(sizes.astype(int), rates).astype(float)
    n, s = sizes.sum(axis=1), sums.sum(axis=1)
    m = s / n
    v = [
        ratio_mean_variance(
            k, n[i], s[i], (sizes[i] ** 2).sum(), (sums[i] ** 2).sum(), (sizes[i] * sums[i]).sum()
        )
        for i in range(reps)
    ]
    assert np.mean(v) == pytest.approx(np.var(m), rel=0.1)
    assert np.mean(m * (1 - m) / n) < 0.7 * np.var(m)


def test_ratio_mean_variance_needs_two_units_and_observations() -> None:
    assert ratio_mean_variance(1, 5.0, 2.0, 25.0, 4.0, 10.0) == math.inf
    assert ratio_mean_variance(3, 0.0, 0.0, 0.0, 0.0, 0.0) == math.inf
    assert ratio_mean_variance(3, 3.0, 3.0, 3.0, 3.0, 3.0) == 0.0  # identical units: no spread


# ---------------------------------------------------------------- detectable effect


def test_detectable_effect_has_the_stated_single_look_power() -> None:
    v, tau, alpha, power = 1e-4, 0.02, 0.01, 0.8
    delta = normal_mixture_detectable_effect(v, tau, alpha, power)
    h = msprt_half_width(v, tau, alpha)
    assert delta == pytest.approx(h + 0.8416212335729143 * math.sqrt(v))
    rng = np.random.default_rng(11)
    d = delta + math.sqrt(v) * rng.standard_normal(200_000)
    assert np.mean(d - h > 0) == pytest.approx(power, abs=0.005)
    assert normal_mixture_detectable_effect(0.0, tau, alpha, power) == math.inf
    with pytest.raises(ValueError, match="power"):
        normal_mixture_detectable_effect(v, tau, alpha, 1.0)


@given(st.floats(1e-3, 10), st.floats(1e-3, 1), st.floats(1e-3, 1))
@settings(max_examples=50)
def test_samples_to_detect_is_the_smallest_n(unit_variance: float, delta: float, tau: float) -> None:
    n = samples_to_detect(unit_variance, delta, tau, 0.05, 0.8)
    assert normal_mixture_detectable_effect(unit_variance / n, tau, 0.05, 0.8) <= delta
    if n > 1:
        assert normal_mixture_detectable_effect(unit_variance / (n - 1), tau, 0.05, 0.8) > delta


# ---------------------------------------------------------------- CountEProcess


def null_paths(schedule: np.ndarray, paths: int, seed: int) -> float:
    """The share of null paths whose e-value ever reaches 1/0.05."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(paths):
        proc = CountEProcess()
        proc.update_many(rng.random(schedule.size) < schedule, schedule)
        hits += proc.harm_detected(0.05)
    return hits / paths


@pytest.mark.parametrize(
    "schedule",
    [np.full(300, 0.05), np.full(300, 0.25), np.full(300, 0.5),
     np.repeat([0.05, 0.25, 0.5], 100), np.linspace(0.01, 0.99, 300)],
    ids=["5%", "25%", "50%", "stages", "ramp"],
)  # fmt: skip
def test_e_process_null_crossing_rate_is_at_most_alpha(schedule: np.ndarray) -> None:
    paths = 2000
    assert null_paths(schedule, paths, seed=int(schedule.sum() * 1000)) <= 0.05 + slack(0.05, paths)


@given(st.lists(st.floats(0.01, 0.99), min_size=1, max_size=8))
@settings(max_examples=30)
def test_e_process_is_a_martingale_under_the_null(shares: list[float]) -> None:
    # Exact expectation over every outcome: E[E_n] = E_0 = 1.
    expected = 0.0
    for outcome in itertools.product((False, True), repeat=len(shares)):
        proc, prob = CountEProcess(), 1.0
        for x, pi in zip(outcome, shares, strict=True):
            proc.update(x, pi)
            prob *= pi if x else 1 - pi
        expected += prob * proc.e_value
    assert expected == pytest.approx(1.0, rel=1e-9)


def test_e_process_detects_a_rate_ratio_of_five_quickly() -> None:
    rng = np.random.default_rng(5)
    pi, r = 0.25, 5.0
    q = r * pi / (r * pi + 1 - pi)
    needed = []
    for _ in range(500):
        proc, events = CountEProcess(), 0
        while not proc.harm_detected(0.05) and events < 200:
            proc.update(bool(rng.random() < q), pi)
            events += 1
        needed.append(events)
    assert np.median(needed) <= 30
    assert np.mean(np.array(needed) <= 100) >= 0.95


events = st.lists(st.tuples(st.booleans(), st.floats(0.0, 1.0)), max_size=200)


@given(events, st.integers(0, 200))
def test_update_many_matches_sequential_updates(data: list[tuple[bool, float]], cut: int) -> None:
    one_by_one = CountEProcess()
    for x, pi in data:
        one_by_one.update(x, pi)
    batched = CountEProcess()
    xs, shares = [x for x, _ in data], [pi for _, pi in data]
    batched.update_many(xs[:cut], shares[:cut])
    e = batched.update_many(np.array(xs[cut:], dtype=bool), np.array(shares[cut:]))
    assert e == pytest.approx(one_by_one.e_value, rel=1e-9)
    assert batched.max_e_value == pytest.approx(one_by_one.max_e_value, rel=1e-9)
    assert batched.events == one_by_one.events
    for alpha in (0.5, 0.05, 0.001):
        assert batched.harm_detected(alpha) == one_by_one.harm_detected(alpha) or math.isclose(
            one_by_one.max_e_value, 1 / alpha, rel_tol=1e-9
        )


def test_harm_detection_is_sticky_within_a_batch() -> None:
    xs = [True] * 12 + [False] * 60
    proc = CountEProcess()
    proc.update_many(xs, [0.5] * len(xs))
    assert proc.e_value < 1.0 < 20.0 <= proc.max_e_value
    assert proc.harm_detected(0.05)


def test_uninformative_events_are_ignored() -> None:
    proc = CountEProcess()
    assert proc.update(True, 0.0) == 1.0
    assert proc.update(False, 1.0) == 1.0
    assert proc.update_many([True, False], [1.0, 0.0]) == 1.0
    assert proc.events == 0 and not proc.harm_detected(0.5)


def test_e_value_survives_overflow() -> None:
    proc = CountEProcess()
    proc.update_many([True] * 400, [0.01] * 400)
    assert proc.e_value == math.inf and proc.log_e_value > 1000 and proc.harm_detected(1e-300)


def test_state_round_trips_through_json() -> None:
    rng = np.random.default_rng(1)
    xs, shares = rng.random(300) < 0.3, rng.uniform(0.05, 0.5, 300)
    whole = CountEProcess(ratios=(2.0, 10.0), weights=(3.0, 1.0))
    whole.update_many(xs, shares)
    first = CountEProcess(ratios=(2.0, 10.0), weights=(3.0, 1.0))
    first.update_many(xs[:150], shares[:150])
    state = json.loads(json.dumps(first.to_state()))
    resumed = CountEProcess.from_state(state)
    assert resumed.to_state() == first.to_state()
    resumed.update_many(xs[150:], shares[150:])
    assert resumed.e_value == pytest.approx(whole.e_value, rel=1e-9)
    assert resumed.max_e_value == pytest.approx(whole.max_e_value, rel=1e-9)
    assert resumed.events == whole.events == 300


def test_e_process_rejects_bad_input() -> None:
    assert CountEProcess().ratios == DEFAULT_RATIOS
    with pytest.raises(ValueError, match="ratios"):
        CountEProcess(ratios=())
    with pytest.raises(ValueError, match="ratios"):
        CountEProcess(ratios=(2.0, -1.0))
    with pytest.raises(ValueError, match="weights"):
        CountEProcess(ratios=(2.0, 3.0), weights=(1.0,))
    proc = CountEProcess()
    with pytest.raises(ValueError, match="share"):
        proc.update(True, 1.5)
    with pytest.raises(ValueError, match="share"):
        proc.update(True, math.nan)
    with pytest.raises(ValueError, match="shares"):
        proc.update_many([True], [-0.1])
    with pytest.raises(ValueError, match="length"):
        proc.update_many([True, False], [0.5])
    with pytest.raises(ValueError, match="alpha"):
        proc.harm_detected(0.0)
    with pytest.raises(ValueError, match="log_lr"):
        CountEProcess.from_state(proc.to_state() | {"log_lr": [0.0]})
