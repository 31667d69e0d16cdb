"""Shadow gates: their verdicts on built evidence, and a fixed-seed decision simulation that
measures the false-stop rate (a candidate exactly at the bound, stopped at most alpha of the
time) and the power, over clustered pairs under two traffic models."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from collector import ShadowEvidence, ShadowGate, ShadowRows
from collector._gates import HARM, NO_HARM, WAITING
from collector._shadow_evidence import AGREE, ERR, FS, JDELTA
from collector._shadow_gates import evaluate_shadow_gate
from tests.unit.rollout_support import CANDIDATE_V, STABLE_V

ALPHA = 0.05  # one gate's share: large enough for a false-stop rate to be measured in 500 runs


def _evidence(values: list[list[float]], family: int) -> ShadowEvidence:
    """Each inner list: the per-pair values of one stable session."""
    ev = ShadowEvidence("r", STABLE_V, CANDIDATE_V)
    rows = ShadowRows()
    for i, session in enumerate(values):
        for v in session:
            rows.append(f"s{i}", {family: v})
    ev.add(rows, 0.0)
    return ev


def test_waiting_until_enough_sessions() -> None:
    gate = ShadowGate(name="t", metric="tool_agreement", min=0.9, min_samples=30)
    result = evaluate_shadow_gate(gate, _evidence([[1.0] * 10] * 29, AGREE), ALPHA)
    assert result.verdict == WAITING and result.kind == "shadow"
    assert result.waiting_for == "pairs from 30 stable sessions (has 29)"


def test_agreement_below_min_is_harm_and_above_passes() -> None:
    gate = ShadowGate(name="t", metric="tool_agreement", min=0.9)
    low = evaluate_shadow_gate(gate, _evidence([[1.0, 0.0]] * 100, AGREE), ALPHA)
    assert low.verdict == HARM and low.estimate == pytest.approx(0.5) and low.upper < 0.9
    assert low.detail.startswith("harm: tool agreement 0.500")
    high = evaluate_shadow_gate(gate, _evidence([[1.0] * 4] * 100, AGREE), ALPHA)
    assert high.verdict == NO_HARM and high.passed and high.lower > 0.9


def test_a_run_of_identical_pairs_is_not_certainty() -> None:
    # 30 sessions of one agreeing pair: the shrunk per-pair variance keeps the bound honest
    gate = ShadowGate(name="t", metric="tool_agreement", min=0.97)
    result = evaluate_shadow_gate(gate, _evidence([[1.0]] * 30, AGREE), ALPHA)
    assert result.verdict != NO_HARM and result.lower < 0.97


def test_clustering_widens_the_bounds() -> None:
    gate = ShadowGate(name="t", metric="tool_agreement", min=0.5)
    spread = evaluate_shadow_gate(gate, _evidence([[1.0, 0.0]] * 200, AGREE), ALPHA)
    clustered = evaluate_shadow_gate(gate, _evidence([[1.0, 1.0]] * 100 + [[0.0, 0.0]] * 100, AGREE), ALPHA)
    assert spread.estimate == clustered.estimate == pytest.approx(0.5)
    assert clustered.upper - clustered.lower > 1.3 * (spread.upper - spread.lower)


def test_judge_score_is_a_paired_drop_against_the_margin() -> None:
    gate = ShadowGate(name="q", metric="judge_score", max_decrease=0.05)
    worse = evaluate_shadow_gate(gate, _evidence([[-0.2, -0.1]] * 60, JDELTA), ALPHA)
    assert worse.verdict == HARM and worse.estimate == pytest.approx(0.15)
    same = evaluate_shadow_gate(gate, _evidence([[0.05, -0.05]] * 400, JDELTA), ALPHA)
    assert same.verdict == NO_HARM and same.upper < 0.05


def test_latency_ratio_reports_ratios() -> None:
    gate = ShadowGate(name="l", metric="latency_ratio", max_ratio=1.2)
    from collector._shadow_evidence import LAT

    slower = evaluate_shadow_gate(gate, _evidence([[math.log(1.5), math.log(1.7)]] * 60, LAT), ALPHA)
    assert (
        slower.verdict == HARM
        and slower.unit == "ratio"
        and slower.estimate == pytest.approx(1.597, abs=0.01)
    )


# -- the decision simulation ------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficModel:
    """Stable sessions and their mirrored pairs. Pairs of one session share a session effect
    (a Beta-distributed rate, or a normal shift), so they are correlated: the test must cluster."""

    name: str
    mean_pairs: float  # pairs per session (1 + Poisson, or 1 + geometric for heavy sessions)
    heavy: bool
    concentration: float  # Beta(κp, κ(1-p)) per session: smaller is more clustered
    session_sd: float  # judge score deltas: the session effect's sd


MODELS = (
    TrafficModel("even", 3.0, heavy=False, concentration=12.0, session_sd=0.08),
    TrafficModel("heavy-sessions", 6.0, heavy=True, concentration=4.0, session_sd=0.15),
)
SESSIONS_PER_LOOK = 15
LOOKS = 40  # about 1,800 to 3,600 pairs by the last look


def _sessions(model: TrafficModel, rng: np.random.Generator, count: int) -> np.ndarray:
    extra = model.mean_pairs - 1
    if model.heavy:
        return 1 + rng.geometric(1 / (1 + extra), count) - 1
    return 1 + rng.poisson(extra, count)


def _values(
    metric: str, truth: float, model: TrafficModel, rng: np.random.Generator, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per session, Σ and Σ² of the per-pair values of the metric's family (true mean `truth`)."""
    count, total = len(sizes), int(sizes.sum())
    session = np.repeat(np.arange(count), sizes)
    if metric == "tool_agreement":
        p = rng.beta(model.concentration * truth, model.concentration * (1 - truth), count)
        values = (rng.random(total) < p[session]).astype(float)
    elif metric == "judge_score":  # candidate - stable score, each in [0, 1]
        # symmetric about 0.5, so clipping keeps the mean difference at `truth` when it is 0
        shift = rng.normal(truth, model.session_sd, count)[session]
        stable = rng.uniform(0.25, 0.75, total)
        values = np.clip(stable + shift + rng.normal(0, 0.15, total), 0, 1) - stable
    else:  # shadow_error_rate: errors of the same call are correlated across the arms
        base = rng.beta(model.concentration * 0.05, model.concentration * 0.95, count)[session]
        stable = rng.random(total) < base
        again = np.where(rng.random(total) < 0.7, stable, rng.random(total) < base)
        values = (again | (rng.random(total) < max(truth, 0.0))).astype(float) - stable
    return np.bincount(session, values, count), np.bincount(session, values * values, count)


FAMILY = {"tool_agreement": AGREE, "judge_score": JDELTA, "shadow_error_rate": ERR}
GATES = {
    "tool_agreement": ShadowGate(name="t", metric="tool_agreement", min=0.9),
    "judge_score": ShadowGate(name="q", metric="judge_score", max_decrease=0.05),
    "shadow_error_rate": ShadowGate(name="e", metric="shadow_error_rate", max_increase=0.03),
}


def _run(metric: str, truth: float, model: TrafficModel, seed: int) -> str:
    """One shadow phase looked at every SESSIONS_PER_LOOK sessions: its first verdict
    (harm or no_harm), or "undecided" by the last look."""
    rng = np.random.default_rng(seed)
    gate, family = GATES[metric], FAMILY[metric]
    ev = ShadowEvidence("r", STABLE_V, CANDIDATE_V)
    unit = 0
    for look in range(LOOKS):
        sizes = _sessions(model, rng, SESSIONS_PER_LOOK)
        sums, squares = _values(metric, truth, model, rng, sizes)
        rows = ShadowRows()
        # one row per session, as the simulator of canary decisions adds them
        for n, total, square in zip(sizes.tolist(), sums.tolist(), squares.tolist(), strict=True):
            dn, ds, dq = [0.0] * FS, [0.0] * FS, [0.0] * FS
            dn[family], ds[family], dq[family] = n, total, square
            rows.keys.append(unit)
            rows.dn.append(dn)
            rows.ds.append(ds)
            rows.dq.append(dq)
            unit += 1
        ev.add(rows, float(look))
        verdict = evaluate_shadow_gate(gate, ev, ALPHA).verdict
        if verdict in (HARM, NO_HARM):
            return verdict
    return "undecided"


def _rate(metric: str, truth: float, model: TrafficModel, runs: int, verdict: str, seed: int) -> float:
    return sum(_run(metric, truth, model, seed * 100_000 + i) == verdict for i in range(runs)) / runs


# (metric, the truth at the bound: stopping it is a false stop, a clearly harmful truth)
CELLS = [
    ("tool_agreement", 0.9, 0.85),
    ("judge_score", 0.0, -0.05),  # a paired delta: 0 means the candidate is exactly as good
    ("shadow_error_rate", 0.0, 0.05),
]


@pytest.mark.parametrize("model", MODELS, ids=[m.name for m in MODELS])
def test_shadow_simulation_false_stops_at_most_alpha_and_power(model: TrafficModel) -> None:
    for i, (metric, at_bound, harmful) in enumerate(CELLS):
        false_stop = _rate(metric, at_bound, model, 500, HARM, seed=i)
        assert false_stop <= ALPHA, (model.name, metric, false_stop)
        power = _rate(metric, harmful, model, 100, HARM, seed=50 + i)
        assert power >= 0.9, (model.name, metric, power)


def test_shadow_simulation_passes_a_good_candidate() -> None:
    model = MODELS[0]
    assert _rate("tool_agreement", 0.97, model, 100, NO_HARM, seed=7) >= 0.9
    assert _rate("judge_score", 0.0, model, 100, NO_HARM, seed=8) >= 0.8
