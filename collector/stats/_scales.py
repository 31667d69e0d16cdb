"""The gates' confidence sequence: the normal-mixture mSPRT mixed over a grid of scales.

One mixing scale tau is optimal for effects near tau: set to a gate's margin, it decides the
margin well but is slow on a large harm (its half-width grows like V/tau while V >> tau²), and
a 30-point error rate would wait for hundreds of samples. A weighted average of test
martingales is a test martingale, so mixing the likelihood ratios of tau_j = margin · 2^j
(j = 0..5, weights halving: most weight at the margin, where promotion decides) stays valid at
every look by Ville's inequality and costs at most ln(1/w_j) over the best single scale.

With V the variance of the estimate d, each scale's likelihood ratio against "the difference is
theta" depends on r = |d - theta| only,

    LR_j(r) = sqrt(V / (V + tau_j²)) · exp(tau_j² r² / (2 V (V + tau_j²))),

so the sequence is {d ± h} with h the r where sum_j w_j LR_j(r) = 1/alpha (found by Newton's
method: the log of the sum is convex and increasing in r).
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

SCALE_STEPS = 6
# 1/2, 1/4, ..., 1/32, and the last 1/32 again: they sum to 1
SCALE_WEIGHTS: tuple[float, ...] = (
    *(2.0 ** -(j + 1) for j in range(SCALE_STEPS - 1)),
    2.0 ** -(SCALE_STEPS - 1),
)
_NEWTON_STEPS = 50


@functools.lru_cache(maxsize=256)
def scale_grid(margin: float) -> tuple[tuple[float, float], ...]:
    """(tau, weight) pairs: margin · 2^j with halving weights."""
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be finite and > 0, got {margin!r}")
    return tuple((margin * 2.0**j, w) for j, w in enumerate(SCALE_WEIGHTS))


def _log_mixture(r: float, variance: float, grid: tuple[tuple[float, float], ...]) -> float:
    """log sum_j w_j LR_j(r)."""
    offsets, curves = _parts(variance, grid)
    return _lse([a + c * r * r / 2 for a, c in zip(offsets, curves, strict=True)])


def _parts(variance: float, grid: tuple[tuple[float, float], ...]) -> tuple[list[float], list[float]]:
    """Per scale: log w_j + ½ log(V / (V + tau²)) and tau² / (V (V + tau²)), which do not depend on r."""
    offsets, curves = [], []
    for tau, weight in grid:
        total = variance + tau * tau
        offsets.append(math.log(weight) + 0.5 * math.log(variance / total))
        curves.append(tau * tau / (variance * total))
    return offsets, curves


def _lse(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(x - top) for x in values))


def scale_mixture_half_width(variance: float, margin: float, alpha: float) -> float:
    """Half-width of the scale-mixture confidence sequence at variance V (inf when V is unusable)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    grid = scale_grid(margin)
    if not (math.isfinite(variance) and variance > 0):
        return math.inf
    offsets, curves = _parts(variance, grid)
    target = math.log(1 / alpha)
    # each scale alone at alpha·w_j bounds the half-width from above: its log-LR reaches the target
    r = min(math.sqrt(2 * (target - a) / c) for a, c in zip(offsets, curves, strict=True))
    # the log-mixture is convex and increasing in r > 0: Newton from above comes down to the root
    for _ in range(_NEWTON_STEPS):
        terms = [a + c * r * r / 2 for a, c in zip(offsets, curves, strict=True)]
        top = max(terms)
        shares = [math.exp(x - top) for x in terms]
        mass = sum(shares)
        value = top + math.log(mass)
        slope = r * sum(s * c for s, c in zip(shares, curves, strict=True)) / mass
        if slope <= 0:
            break
        step = (value - target) / slope
        r -= step
        if abs(step) <= 1e-12 * r:
            break
    return r


def scale_mixture_detectable_effect(variance: float, margin: float, alpha: float, power: float) -> float:
    """The smallest true difference one look at variance V detects with `power`: h + z_power·√V
    (a single-look bound; the continuous procedure also has every earlier look)."""
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    h = scale_mixture_half_width(variance, margin, alpha)
    if not math.isfinite(h):
        return math.inf
    return h + NormalDist().inv_cdf(power) * math.sqrt(variance)
