"""Synthetic agent traffic for the decisions simulator: parameters and one tick of draws.

`--baseline` and `--effect` take `key=value` lists. Rates are per call (`error_rate`,
`tool_failure_rate`, `safety_rate`, `critical_safety_rate`) or per feedback (`task_success`,
`thumbs_down_rate`); `feedback_share` of calls get task and thumbs feedback after an
exponential delay of mean `feedback_delay_s`; latency is lognormal (`latency_p50_ms`,
`latency_sigma`), cost too with the same sigma (`cost_per_call_usd` is its median);
`judge_share` of calls get a Beta judge score of mean `judge_score`, sd `judge_sd`; sessions
have 1 + Poisson(`session_calls` - 1) calls and a per-session random effect of sd
`session_effect_sd` on the log-odds of errors and of task success. An effect adds to a rate or
score, or multiplies when written `xF`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from collector._evidence import (
    CALL,
    COST,
    LAT,
    REQ,
    SCORE,
    SPEND,
    T_CALLS,
    T_ERR,
    T_REQ,
    T_SCORE,
    T_SCORE2,
    T_SCORES,
    T_SLOW,
    T_SPEND,
    T_SPEND2,
    TASK,
    TCOLS,
    THUMB,
    TOOL,
    Rows,
)
from collector._evidence import F as FAMILIES_N

SLOW_MS = 10_000.0


@dataclass(frozen=True)
class Traffic:
    error_rate: float = 0.01
    tool_failure_rate: float = 0.0
    safety_rate: float = 0.0
    critical_safety_rate: float = 0.0
    task_success: float = 0.85
    thumbs_down_rate: float = 0.10
    feedback_share: float = 0.3
    feedback_delay_s: float = 0.0
    latency_p50_ms: float = 800.0
    latency_sigma: float = 0.5
    cost_per_call_usd: float = 0.003
    judge_score: float = 0.8
    judge_sd: float = 0.2
    judge_share: float = 0.1
    session_calls: float = 3.0
    session_effect_sd: float = 0.3

    def validate(self) -> None:
        for name in (
            "error_rate",
            "tool_failure_rate",
            "safety_rate",
            "critical_safety_rate",
            "thumbs_down_rate",
            "feedback_share",
            "judge_share",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)!r}")
        if not 0 < self.task_success < 1:
            raise ValueError(f"task_success: must be in (0, 1), got {self.task_success!r}")
        if not 0 < self.judge_score < 1:
            raise ValueError(f"judge_score: must be in (0, 1), got {self.judge_score!r}")
        if not 0 < self.judge_sd < math.sqrt(self.judge_score * (1 - self.judge_score)):
            raise ValueError("judge_sd: must be in (0, sqrt(m(1-m))) for a Beta of mean judge_score")
        for name in ("latency_p50_ms", "latency_sigma", "cost_per_call_usd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.session_calls < 1:
            raise ValueError("session_calls: must be >= 1")
        if self.feedback_delay_s < 0 or self.session_effect_sd < 0:
            raise ValueError("feedback_delay_s and session_effect_sd: must be >= 0")


KEYS = tuple(f.name for f in fields(Traffic))


def parse_pairs(text: str, option: str) -> dict[str, str]:
    """ "a=1,b=x1.2" -> {"a": "1", "b": "x1.2"}; ValueError naming the option and the key."""
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise ValueError(f"{option}: {part!r} is not key=value")
        pairs[key] = value.strip()
    return pairs


def baseline_from(text: str) -> Traffic:
    values: dict[str, float] = {}
    for key, value in parse_pairs(text, "--baseline").items():
        if key not in KEYS:
            raise ValueError(f"--baseline: unknown key {key!r} (known: {', '.join(KEYS)})")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"--baseline: {key}={value!r} is not a number") from None
    traffic = replace(Traffic(), **values)
    traffic.validate()
    return traffic


def apply_effect(base: Traffic, text: str, option: str = "--effect") -> Traffic:
    """The candidate's traffic: each key adds to the baseline, or multiplies it when `xF`."""
    values: dict[str, float] = {}
    for key, value in parse_pairs(text, option).items():
        if key not in KEYS:
            raise ValueError(f"{option}: unknown key {key!r} (known: {', '.join(KEYS)})")
        try:
            if value.startswith(("x", "*")):
                values[key] = getattr(base, key) * float(value[1:])
            else:
                values[key] = getattr(base, key) + float(value)
        except ValueError:
            raise ValueError(f"{option}: {key}={value!r} is not a number or xF") from None
    traffic = replace(base, **values)
    try:
        traffic.validate()
    except ValueError as exc:
        raise ValueError(f"{option}: the candidate's {exc}") from None
    return traffic


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _expit(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


@dataclass
class Drawn:
    """One tick of one arm: the rows for the evidence and what the oracle and baseline need."""

    calls: int
    errors: np.ndarray  # per call, 0/1
    log_latency: np.ndarray
    log_cost: np.ndarray
    tasks: np.ndarray  # task failures, per feedback delivered now
    scores: np.ndarray
    safety: int


def draw_tick(
    rng: np.random.Generator,
    traffic: tuple[Traffic, Traffic],
    weight: float,
    start: float,
    length: float,
    calls_per_second: float,
    next_unit: int,
    rows: Rows,
    pending: list[tuple[float, Rows]],
) -> tuple[int, tuple[Drawn, Drawn]]:
    """Sessions that start in [start, start + length): their calls now, their feedback when due.

    Appends to `rows` (and to `pending`, rows due later); returns the next unit id and the
    candidate's and stable's draws (index 0 stable, 1 candidate).
    """
    base = traffic[0]
    sessions = int(rng.poisson(calls_per_second * length / base.session_calls))
    drawn: list[Drawn] = []
    arms = (rng.random(sessions) < weight).astype(np.int64)
    for arm in (0, 1):
        t = traffic[arm]
        count = int((arms == arm).sum())
        k = 1 + rng.poisson(max(t.session_calls - 1, 0.0), size=count)
        units = np.arange(next_unit, next_unit + count)
        next_unit += count
        times = start + rng.random(count) * length
        calls = int(k.sum())
        owner = np.repeat(np.arange(count), k)
        u_err = rng.normal(0.0, t.session_effect_sd, size=count)
        u_task = rng.normal(0.0, t.session_effect_sd, size=count)
        errors = (rng.random(calls) < _expit(_logit(t.error_rate) + u_err[owner])).astype(np.float64)
        tool_fail = None
        if traffic[0].tool_failure_rate or traffic[1].tool_failure_rate:  # both arms call tools, or neither
            tool_fail = (rng.random(calls) < t.tool_failure_rate).astype(np.float64)
        log_lat = rng.normal(math.log(t.latency_p50_ms), t.latency_sigma, size=calls)
        log_cost = rng.normal(math.log(t.cost_per_call_usd), t.latency_sigma, size=calls)
        cost = np.exp(log_cost)
        dn = np.zeros((count, FAMILIES_N))
        ds = np.zeros((count, FAMILIES_N))
        trig = np.zeros((count, TCOLS))
        per = np.bincount
        dn[:, REQ] = k + (k if tool_fail is not None else 0)
        err_sum = per(owner, errors, count) + (per(owner, tool_fail, count) if tool_fail is not None else 0)
        ds[:, REQ] = err_sum
        if tool_fail is not None:
            dn[:, TOOL], ds[:, TOOL] = k, per(owner, tool_fail, count)
        dn[:, CALL] = k
        dn[:, LAT], ds[:, LAT] = k, per(owner, log_lat, count)
        dn[:, COST], ds[:, COST] = k, per(owner, log_cost, count)
        dn[:, SPEND], ds[:, SPEND] = k, per(owner, cost, count)
        trig[:, T_REQ], trig[:, T_ERR], trig[:, T_CALLS] = dn[:, REQ], err_sum, k
        trig[:, T_SLOW] = per(owner, (log_lat > math.log(SLOW_MS)).astype(np.float64), count)
        trig[:, T_SPEND], trig[:, T_SPEND2] = ds[:, SPEND], per(owner, cost * cost, count)
        # safety events at their session's time: the e-process weighs each by the exposure before it
        hit = rng.random(calls) < t.safety_rate if t.safety_rate else np.zeros(calls, dtype=bool)
        crit = (
            rng.random(calls) < t.critical_safety_rate
            if t.critical_safety_rate
            else np.zeros(calls, dtype=bool)
        )
        safety = int(hit.sum())
        for when in times[owner[hit]].tolist():
            rows.safety.append((when, arm, 1, False))
        for when in times[owner[crit]].tolist():
            rows.safety.append((when, arm, 1, True))
        # feedback: task and thumbs on feedback_share of calls, a judge score on judge_share
        fb = rng.random(calls) < t.feedback_share
        fb_owner = owner[fb]
        p_task_fail = 1.0 - _expit(_logit(t.task_success) + u_task[fb_owner])
        task_fail = (rng.random(len(fb_owner)) < p_task_fail).astype(np.float64)
        thumbs_down = (rng.random(len(fb_owner)) < t.thumbs_down_rate).astype(np.float64)
        judged = rng.random(calls) < t.judge_share
        sc_owner = owner[judged]
        kappa = t.judge_score * (1 - t.judge_score) / t.judge_sd**2 - 1
        scores = rng.beta(t.judge_score * kappa, (1 - t.judge_score) * kappa, size=len(sc_owner))
        fdn = np.zeros((len(fb_owner) + len(sc_owner), FAMILIES_N))
        fds = np.zeros_like(fdn)
        ftrig = np.zeros((len(fdn), TCOLS))
        nf = len(fb_owner)
        fdn[:nf, TASK], fds[:nf, TASK] = 1.0, task_fail
        fdn[:nf, THUMB], fds[:nf, THUMB] = 1.0, thumbs_down
        fdn[nf:, SCORE], fds[nf:, SCORE] = 1.0, scores
        ftrig[nf:, T_SCORES], ftrig[nf:, T_SCORE], ftrig[nf:, T_SCORE2] = 1.0, scores, scores * scores
        f_owner = np.concatenate([fb_owner, sc_owner])
        f_times = times[f_owner]
        if t.feedback_delay_s > 0:  # each feedback a row of its own, when it arrives
            _extend(rows, units, arm, times, dn, ds, trig)
            f_times = f_times + rng.exponential(t.feedback_delay_s, size=len(f_owner))
            mask = f_times < start + length
            for i in np.flatnonzero(~mask).tolist():
                later = Rows()
                _extend(
                    later,
                    units[f_owner[i : i + 1]],
                    arm,
                    f_times[i : i + 1],
                    fdn[i : i + 1],
                    fds[i : i + 1],
                    ftrig[i : i + 1],
                )
                pending.append((float(f_times[i]), later))
            _extend(rows, units[f_owner[mask]], arm, f_times[mask], fdn[mask], fds[mask], ftrig[mask])
        else:  # feedback at once: one row per session (the same sums, fewer rows)
            for col in (TASK, THUMB, SCORE):
                dn[:, col] = per(f_owner, fdn[:, col], count)
                ds[:, col] = per(f_owner, fds[:, col], count)
            for col in (T_SCORES, T_SCORE, T_SCORE2):
                trig[:, col] = per(f_owner, ftrig[:, col], count)
            _extend(rows, units, arm, times, dn, ds, trig)
        drawn.append(Drawn(calls, errors, log_lat, log_cost, task_fail, scores, safety))
    return next_unit, (drawn[0], drawn[1])


def due_rows(pending: list[tuple[float, Rows]], until: float, into: Rows) -> list[tuple[float, Rows]]:
    """Move the pending rows due before `until` into `into`; the rest stay pending."""
    keep = []
    for t, rows in pending:
        if t < until:
            into.keys.extend(rows.keys)
            into.arms.extend(rows.arms)
            into.times.extend(rows.times)
            into.dn.extend(rows.dn)
            into.ds.extend(rows.ds)
            into.trig.extend(rows.trig)
        else:
            keep.append((t, rows))
    return keep


def _extend(
    rows: Rows,
    units: np.ndarray,
    arm: int,
    times: np.ndarray,
    dn: np.ndarray,
    ds: np.ndarray,
    trig: np.ndarray,
) -> None:
    rows.keys.extend(units.tolist())
    rows.arms.extend([arm] * len(units))
    rows.times.extend(times.tolist())
    rows.dn.extend(dn.tolist())
    rows.ds.extend(ds.tolist())
    rows.trig.extend(trig.tolist())
