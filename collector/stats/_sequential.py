"""Always-valid (sequential) inference for the rollout gates.

The collector looks at every gate continuously, so a fixed-horizon test would be peeked at
thousands of times. Everything here stays valid under continuous monitoring:

- the normal-mixture mSPRT confidence sequence (Johari, Pekelis, Walsh 2017) for a difference
  of means or proportions, with the variance helpers that feed it;
- a count e-process for rare safety events, valid by Ville's inequality.

Scalar paths use `math` only (numpy scalars are slow and leak into JSON); numpy is used only to
vectorise a batch of safety events.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_RATIOS: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
_MAX_EXP = 709.0  # math.exp overflows just above this
_CHUNK = 65_536  # events per vectorised block, bounds the (grid x events) working array


def _check_tau_alpha(tau: float, alpha: float) -> None:
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be finite and > 0, got {tau!r}")
    if not (0 < alpha < 1):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _check_probability(name: str, value: float) -> None:
    if not (0 < value < 1):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def msprt_half_width(variance: float, tau: float, alpha: float) -> float:
    """Half-width h of the normal-mixture mSPRT confidence sequence at variance V.

    h = sqrt(2V(V+τ²)/τ² · (ln(1/alpha) + ½ ln((V+τ²)/V))): the set {d : mixture LR < 1/alpha},
    so {d ± h} covers the true difference at every look at once with probability ≥ 1 - alpha.
    A variance that is <= 0, nan or inf means "no usable evidence" and gives inf (a zero
    variance would otherwise make any difference significant).
    """
    _check_tau_alpha(tau, alpha)
    if not (math.isfinite(variance) and variance > 0):
        return math.inf
    t2 = tau * tau
    ratio = t2 / variance
    # ln((V+tau²)/V), accurate for large V and finite even when tau²/V overflows (subnormal V)
    log_ratio = math.log1p(ratio) if math.isfinite(ratio) else math.log(t2) - math.log(variance)
    return math.sqrt(2.0 * variance * (1.0 + 1.0 / ratio) * (-math.log(alpha) + 0.5 * log_ratio))


@dataclass(frozen=True)
class Interval:
    """A two-sided interval around a point estimate (lower may be -inf, upper +inf)."""

    estimate: float
    lower: float
    upper: float

    def contains(self, x: float) -> bool:
        """True when x is inside the closed interval (so the data cannot rule it out)."""
        return self.lower <= x <= self.upper


def confidence_sequence(estimate: float, variance: float, tau: float, alpha: float) -> Interval:
    """The always-valid interval estimate ± h(V, τ, alpha).

    A nan or infinite estimate gives the unbounded interval: no decision can be taken on it.
    """
    h = msprt_half_width(variance, tau, alpha)
    if not math.isfinite(estimate):
        return Interval(estimate, -math.inf, math.inf)
    return Interval(estimate, estimate - h, estimate + h)


def proportion_difference_variance(
    y0: float, n0: float, y1: float, n1: float, deff: float = 1.0, prior: float = 1.0
) -> float:
    """Variance of p1 - p0 under "no difference", with a lightly shrunk pooled proportion.

    p̃ = (y0 + y1 + ½·prior) / (n0 + n1 + prior) keeps V > 0 when no event has been seen yet
    (otherwise zero successes on both arms would give V = 0 and an instant decision).
    V = p̃(1 - p̃)(1/n0 + 1/n1)·deff, where deff > 0 is a design effect for clustered data
    (e.g. calls within sessions). inf when either arm has no observations.
    """
    if not (math.isfinite(deff) and deff > 0):
        raise ValueError(f"deff must be finite and > 0, got {deff!r}")
    if not (math.isfinite(prior) and prior >= 0):
        raise ValueError(f"prior must be finite and >= 0, got {prior!r}")
    if not (n0 > 0 and n1 > 0 and math.isfinite(n0) and math.isfinite(n1)):
        return math.inf
    if not (0 <= y0 <= n0):
        raise ValueError(f"y0 must be in [0, n0={n0!r}], got {y0!r}")
    if not (0 <= y1 <= n1):
        raise ValueError(f"y1 must be in [0, n1={n1!r}], got {y1!r}")
    p = (y0 + y1 + 0.5 * prior) / (n0 + n1 + prior)
    return p * (1.0 - p) * (1.0 / n0 + 1.0 / n1) * deff


def ratio_mean_variance(k: int, n: float, s: float, nn: float, ss: float, ns: float) -> float:
    """Cluster-robust (sandwich) variance of the ratio estimator m = s/n over K units.

    Units (e.g. sessions) have counts n_i and sums s_i; observations within a unit are
    correlated, so the naive per-observation variance is too small. From the running sums
    n = Σn_i, s = Σs_i, nn = Σn_i², ss = Σs_i², ns = Σn_i·s_i:
    V = K/(K-1) · Σ(s_i - m·n_i)² / n², with Σ(s_i - m·n_i)² = ss - 2m·ns + m²·nn (clipped
    at 0 against rounding). inf when k < 2 or n <= 0 (no spread can be estimated).
    """
    if k < 2 or not (n > 0) or not math.isfinite(n):
        return math.inf
    m = s / n
    resid = max(0.0, ss - 2.0 * m * ns + m * m * nn)
    return k / (k - 1) * resid / (n * n)


def normal_mixture_detectable_effect(variance: float, tau: float, alpha: float, power: float) -> float:
    """Smallest true difference δ that one look at variance V detects with the given power.

    δ = h(V, τ, alpha) + z_power·√V: then d - h > 0 with probability ≥ power. It is a single-look
    bound: the continuous procedure also gets every earlier look, so its power is at least this
    (the bound is conservative). inf when V is not usable.
    """
    _check_tau_alpha(tau, alpha)
    _check_probability("power", power)
    h = msprt_half_width(variance, tau, alpha)
    if not math.isfinite(h):
        return math.inf
    return h + NormalDist().inv_cdf(power) * math.sqrt(variance)


def samples_to_detect(unit_variance: float, delta: float, tau: float, alpha: float, power: float) -> int:
    """Per-arm sample size at which a single look detects `delta` (V = unit_variance / n).

    Stage sizing: no test can decide without the data, so a stage must be long enough to
    reach this n. unit_variance is the variance of d for n = 1 (e.g. 2sigma² for two arms).
    """
    if not (math.isfinite(unit_variance) and unit_variance > 0):
        raise ValueError(f"unit_variance must be finite and > 0, got {unit_variance!r}")
    if not (math.isfinite(delta) and delta != 0):
        raise ValueError(f"delta must be finite and non-zero, got {delta!r}")
    target = abs(delta)

    def ok(n: int) -> bool:
        return normal_mixture_detectable_effect(unit_variance / n, tau, alpha, power) <= target

    hi = 1
    while not ok(hi):  # the detectable effect decreases to 0 as n grows, so this ends
        hi *= 2
    lo = hi // 2  # ok(hi) holds; ok(lo) fails unless lo == 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _log_weighted_sum_exp(weights: Sequence[float], logs: Sequence[float]) -> float:
    """log Σ w_j·exp(l_j), shifted by the largest l_j so that nothing overflows."""
    top = max(logs)
    return top + math.log(math.fsum(w * math.exp(v - top) for w, v in zip(weights, logs, strict=True)))


def _safe_exp(x: float) -> float:
    return math.inf if x > _MAX_EXP else math.exp(x)


class CountEProcess:
    """Safety e-process: are rare events over-represented on the candidate?

    Under "no difference" each event comes from the candidate with probability π, its exposure
    share at the event's time. If the candidate's rate is r times stable's, that probability is
    rπ/(rπ + 1 - π), so each event multiplies the likelihood ratio for r by r/(1 + (r-1)π)
    (candidate) or 1/(1 + (r-1)π) (stable). Each product is a test martingale under the null
    whatever π does (π must be known before the event), and so is their mixture over a grid of
    r. By Ville's inequality P(sup_t E_t ≥ 1/alpha) ≤ alpha, so rolling back the first time E ≥ 1/alpha
    keeps the false-rollback rate ≤ alpha with continuous monitoring.

    Events with π = 0 or π = 1 carry no information (the null fixes their source) and are
    ignored. Log-likelihoods are kept per grid point for numeric stability.
    """

    def __init__(
        self, ratios: Sequence[float] = DEFAULT_RATIOS, weights: Sequence[float] | None = None
    ) -> None:
        ratios = [float(r) for r in ratios]
        if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
            raise ValueError(f"ratios must be a non-empty sequence of finite values > 0, got {ratios!r}")
        if weights is None:
            weights = [1.0] * len(ratios)
        weights = [float(w) for w in weights]
        if len(weights) != len(ratios) or not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"weights must be one finite value > 0 per ratio, got {weights!r}")
        self._ratios = tuple(ratios)
        self._weights = tuple(weights)  # kept as given: uniform weights then give E_0 = 1 exactly
        self._log_total = math.log(math.fsum(weights))
        self._log_ratios = tuple(math.log(r) for r in ratios)
        self._log_lr = [0.0] * len(ratios)
        self._peak = 0.0  # the running max of log E (E_0 = 1)
        self._events = 0

    @property
    def ratios(self) -> tuple[float, ...]:
        return self._ratios

    @property
    def events(self) -> int:
        """Informative events seen so far (those with 0 < π < 1)."""
        return self._events

    @property
    def log_e_value(self) -> float:
        return _log_weighted_sum_exp(self._weights, self._log_lr) - self._log_total

    @property
    def e_value(self) -> float:
        """The current e-value (inf if it overflows a float)."""
        return _safe_exp(self.log_e_value)

    @property
    def max_e_value(self) -> float:
        """The largest e-value seen at any event so far."""
        return _safe_exp(self._peak)

    def harm_detected(self, alpha: float) -> bool:
        """True once the e-value has reached 1/alpha at any event (sticky, as Ville allows).

        Sticky so that a batch passed to `update_many` decides exactly as one-by-one updates
        would: a crossing inside the batch is not lost if the e-value later falls back.
        """
        _check_probability("alpha", alpha)
        return self._peak >= -math.log(alpha)

    def update(self, from_candidate: bool, share: float) -> float:
        """Add one event (its source, and the candidate's exposure share then); return E."""
        if not (0 <= share <= 1):
            raise ValueError(f"share must be in [0, 1], got {share!r}")
        if 0 < share < 1:
            for j, lr in enumerate(self._log_ratios):
                step = -math.log1p((self._ratios[j] - 1.0) * share)
                self._log_lr[j] += step + lr if from_candidate else step
            self._events += 1
        log_e = self.log_e_value
        self._peak = max(self._peak, log_e)
        return _safe_exp(log_e)

    def update_many(
        self,
        from_candidate: Sequence[bool] | npt.NDArray[np.bool_],
        shares: Sequence[float] | npt.NDArray[np.floating[Any]],
    ) -> float:
        """Add events in order, vectorised; the same result as calling `update` on each."""
        x = np.asarray(from_candidate, dtype=bool).ravel()
        pi = np.asarray(shares, dtype=float).ravel()
        if x.shape != pi.shape:
            raise ValueError(f"from_candidate and shares differ in length: {x.size} != {pi.size}")
        if pi.size and not bool(np.all((pi >= 0) & (pi <= 1))):
            raise ValueError("shares must all be in [0, 1]")
        keep = (pi > 0) & (pi < 1)
        x, pi = x[keep], pi[keep]
        ratios = np.asarray(self._ratios)[:, None]
        log_ratios = np.asarray(self._log_ratios)[:, None]
        log_w = np.log(np.asarray(self._weights))[:, None]
        for start in range(0, pi.size, _CHUNK):
            xs, ps = x[start : start + _CHUNK], pi[start : start + _CHUNK]
            steps = np.where(xs[None, :], log_ratios, 0.0) - np.log1p((ratios - 1.0) * ps[None, :])
            paths = np.asarray(self._log_lr)[:, None] + np.cumsum(steps, axis=1)
            log_e = np.logaddexp.reduce(paths + log_w, axis=0) - self._log_total
            self._peak = max(self._peak, float(log_e.max()))
            self._log_lr = [float(v) for v in paths[:, -1]]
            self._events += int(ps.size)
        return self.e_value

    def to_state(self) -> dict[str, Any]:
        """Plain JSON values, for checkpoints."""
        return {
            "ratios": list(self._ratios),
            "weights": list(self._weights),
            "log_lr": list(self._log_lr),
            "peak_log_e": self._peak,
            "events": self._events,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CountEProcess:
        """Rebuild from `to_state` output."""
        proc = cls(state["ratios"], state["weights"])
        log_lr = [float(v) for v in state["log_lr"]]
        if len(log_lr) != len(proc._ratios) or not all(math.isfinite(v) for v in log_lr):
            raise ValueError("state['log_lr'] must hold one finite value per ratio")
        proc._log_lr = log_lr
        proc._peak = max(float(state["peak_log_e"]), proc.log_e_value)
        proc._events = int(state["events"])
        return proc
