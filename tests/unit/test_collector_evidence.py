"""The rollout evidence: cumulative sums by stage and unit, built from real events.

Batches and single events give the same sums and the same decisions (so the simulator may
batch per tick); checkpoints round-trip; strata guard against Simpson's paradox; sessions
are clusters; reliability counts only what the candidate caused; late feedback finds its unit.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import outrider
from collector import (
    EvidenceBook,
    Gate,
    RollingWindows,
    RolloutController,
    RolloutEvidence,
    Rows,
    load_spec_text,
)
from collector._checkpoint import Checkpoint, decode, encode
from collector._evidence import CALL, LAT, NN, REQ, TASK, TOOL, K, N, S
from collector._gates import estimate, evaluate_gate
from collector._ingest import Ingestor
from collector._metrics import CollectorMetrics
from collector.simulate import Traffic, apply_effect
from collector.simulate._traffic import draw_tick, due_rows
from collector.stats import msprt_half_width, proportion_difference_variance, two_proportion_ztest
from outrider.v1 import control_pb2, events_pb2, sidecar_pb2
from tests.unit.rollout_support import (
    AGENT,
    CANDIDATE_V,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    STABLE_V,
    Harness,
    call_event,
    feedback_event,
    jittered,
    new_session,
    safety_event,
    task_event,
    tool_event,
)

T0 = 1_700_000_000.0
SPEC_YAML = f"""
agent: {AGENT}
stable: {STABLE_V}
candidate: {CANDIDATE_V}
look_interval: 10s
steps:
  - {{weight: 10, min_duration: 1m, min_samples: 100}}
  - {{weight: 30, min_duration: 2m, min_samples: 300}}
  - {{weight: 50, min_duration: 2m, max_duration: 1h}}
gates:
  - {{name: errors, metric: error_rate, max_increase: 0.02}}
  - {{name: latency, metric: latency_p95_ms, max_ratio: 1.25}}
  - {{name: task, metric: task_failure_rate, max_increase: 0.05}}
  - {{name: safety, metric: safety_event_rate}}
"""


def fresh_evidence(stages: int = 3, **kw: object) -> RolloutEvidence:
    return RolloutEvidence("r1", STABLE_V, CANDIDATE_V, T0, stages=stages, **kw)  # type: ignore[arg-type]


def add(evidence: RolloutEvidence, events: list[events_pb2.Event], now: float) -> None:
    rows = Rows()
    for e in events:
        assert evidence.rows_from_event(e, now, rows)
    evidence.add(rows, now)


def assert_same_evidence(a: RolloutEvidence, b: RolloutEvidence) -> None:
    assert a.stage_starts == b.stage_starts
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-9, atol=1e-9)
    assert a.safety_events == b.safety_events and a.critical_events == b.critical_events
    assert a.excluded == b.excluded
    live = sorted(set(a.minutes) & set(b.minutes))
    assert live and all(np.allclose(a.minutes[m], b.minutes[m]) for m in live)


# -- one traffic stream, fed per event and per look ---------------------------------------------


def event_stream(
    rollout_id: str, start: float, seconds: int, share: float, seed: int
) -> list[events_pb2.Event]:
    """Every kind of evidence: sessions of 1-4 calls, tools, task and thumbs feedback (some of it
    late), scores, safety events, calls the version did not cause; a candidate a bit worse."""
    rng = random.Random(seed)
    events = []
    for second in range(seconds):
        for _ in range(rng.randint(1, 4)):
            arm = int(rng.random() < share)
            session, t = new_session(), start + second + rng.random()
            for j in range(rng.randint(1, 4)):
                failed = rng.random() < (0.06 if arm else 0.01)
                events.append(
                    call_event(
                        rollout_id,
                        arm,
                        t + j * 0.01,
                        session,
                        error_class="provider_5xx" if failed else "",
                        latency_ms=jittered(rng, 800 if arm else 700, 0.5),
                        cost_usd=0.003 * math.exp(rng.gauss(0, 0.5)),
                    )
                )
            if rng.random() < 0.2:
                events.append(
                    tool_event(
                        rollout_id, arm, t, session, error_class="tool_5xx" if rng.random() < 0.1 else ""
                    )
                )
            if rng.random() < 0.1:
                events.append(call_event(rollout_id, arm, t, session, error_class="quota_refused"))
            if rng.random() < 0.3:
                events.append(
                    task_event(
                        rollout_id, arm, t + rng.expovariate(1 / 20), session, failed=rng.random() < 0.15
                    )
                )
            if rng.random() < 0.1:
                events.append(
                    feedback_event(
                        rollout_id, arm, t, session, kind=sidecar_pb2.FEEDBACK_KIND_SCORE, score=rng.random()
                    )
                )
            if rng.random() < (0.02 if arm else 0.005):
                events.append(safety_event(rollout_id, arm, t + 0.005, session))  # after its first call
    # events reach the collector in event-time order; feedback comes later than its call
    return sorted(events, key=lambda e: e.time_unix_nano)


def run_stream(events: list[events_pb2.Event], batched: bool) -> tuple[RolloutController, EvidenceBook, list]:
    spec = load_spec_text(SPEC_YAML, "s.yaml")
    ctl, book = RolloutController(AGENT), EvidenceBook()
    state = ctl.start(spec, SPEC_YAML, T0)
    book.sync(state, spec)
    decisions, look, i = [], T0 + spec.look_interval, 0
    rollout_id = state.rollout_id
    for e in events:
        e.rollout_id = rollout_id
    while i < len(events):
        batch = []
        while i < len(events) and events[i].time_unix_nano / 1e9 < look:
            batch.append(events[i])
            i += 1
        if batched:
            book.add_events(batch, look)
        else:
            for e in batch:  # one add per event, each at its arrival
                book.add_events([e], e.time_unix_nano / 1e9)
        evidence = book.get(AGENT)
        assert evidence is not None
        new = ctl.decide(evidence, look)
        if new is not None:
            ctl.apply(new)
            book.sync(new, spec)
            decisions.append((look, new.phase, new.step_index, new.reason))
        look += spec.look_interval
    return ctl, book, decisions


@pytest.mark.parametrize("seed", [1, 2])
def test_batches_and_single_events_give_the_same_sums_and_decisions(seed: int) -> None:
    events = event_stream("", T0, 600, 0.3, seed)
    ctl_a, book_a, decided_a = run_stream(events, batched=True)
    ctl_b, book_b, decided_b = run_stream(events, batched=False)
    assert decided_a == decided_b and decided_a  # the rollout moved, the same way
    assert_same_state(ctl_a.state, ctl_b.state)
    a, b = book_a.get(AGENT), book_b.get(AGENT)
    assert a is not None and b is not None
    assert_same_evidence(a, b)
    assert a.excluded["quota"][0] > 0 and a.excluded["quota"][1] > 0
    assert a.safety_events == b.safety_events and sum(a.safety_events) > 0
    # each safety event's exposure share counts the requests before it, wherever a batch ends
    assert a.safety.e_value == pytest.approx(b.safety.e_value, rel=1e-9)
    assert a.safety.max_e_value == pytest.approx(b.safety.max_e_value, rel=1e-9)


def assert_same_state(a: control_pb2.RolloutState | None, b: control_pb2.RolloutState | None) -> None:
    """Equal but for the last bits of floats summed in another order."""
    assert a is not None and b is not None
    fields = ("generation", "phase", "step_index", "candidate_weight", "reason", "release")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    for ra, rb in zip(a.gate_results, b.gate_results, strict=True):
        assert (ra.name, ra.verdict, ra.candidate_samples, ra.baseline_samples) == (
            rb.name,
            rb.verdict,
            rb.candidate_samples,
            rb.baseline_samples,
        )
        for f in ("estimate", "lower", "upper", "candidate_value", "baseline_value", "e_value"):
            assert getattr(ra, f) == pytest.approx(getattr(rb, f), rel=1e-9, abs=1e-12), (ra.name, f)


@pytest.mark.parametrize("effect", ["", "error_rate=0.05"])
def test_simulator_ticks_decide_as_single_rows(effect: str) -> None:
    """The simulator adds one batch per tick; adding its rows one at a time decides the same."""
    spec = load_spec_text(SPEC_YAML, "s.yaml")
    base = Traffic(feedback_delay_s=30.0, safety_rate=0.001)
    traffic = (base, apply_effect(base, effect) if effect else base)
    rng = np.random.default_rng(5)
    ctls, books = [RolloutController(AGENT), RolloutController(AGENT)], [EvidenceBook(), EvidenceBook()]
    for ctl, book in zip(ctls, books, strict=True):
        book.sync(ctl.start(spec, SPEC_YAML, 0.0), spec)
    pending: list[tuple[float, Rows]] = []
    t, unit, tick, decisions = 0.0, 0, spec.look_interval, []
    while t < 3600 and ctls[0].running:
        weight = ctls[0].state.candidate_weight  # type: ignore[union-attr]
        rows = Rows()
        unit, _ = draw_tick(rng, traffic, weight, t, tick, 10.0, unit, rows, pending)
        pending = due_rows(pending, t + tick, rows)
        t += tick
        a, b = books[0].get(AGENT), books[1].get(AGENT)
        assert a is not None and b is not None
        a.add(rows, t)
        # the same, one row or safety event at a time, in the order of their times
        singles = [(rows.times[i], 1, i) for i in range(len(rows))] + [
            (safety[0], 0, i) for i, safety in enumerate(rows.safety)
        ]
        for _, is_row, i in sorted(singles):
            if is_row:
                one = Rows([rows.keys[i]], [rows.arms[i]], [rows.times[i]], [rows.dn[i]], [rows.ds[i]])
                one.trig.append(rows.trig[i])
                b.add(one, t)
            else:
                b.add(Rows(safety=[rows.safety[i]]), t)
        states = [ctl.decide(e, t) for ctl, e in zip(ctls, (a, b), strict=True)]
        assert (states[0] is None) == (states[1] is None)
        if states[0] is not None:
            assert_same_state(states[0], states[1])
            decisions.append(states[0].phase)
            for ctl, book, state in zip(ctls, books, states, strict=True):
                assert state is not None
                ctl.apply(state)
                book.sync(state, spec)
    assert decisions and decisions[-1] in (PROMOTED, ROLLED_BACK)
    if effect:
        assert decisions[-1] == ROLLED_BACK and "error" in ctls[0].state.reason  # type: ignore[union-attr]
    a, b = books[0].get(AGENT), books[1].get(AGENT)
    assert a is not None and b is not None
    assert_same_evidence(a, b)


BODIES = ("call", "tool", "task", "thumbs", "score", "safety")
ERROR_LABELS = (
    "",
    "",
    "timeout",
    "provider_5xx",
    "quota_refused",
    "guard_blocked_input",
    "guard_blocked_output",
    "cancelled",
)


def any_event(body: str, unit: int, canary: bool, label: str, offset: float) -> events_pb2.Event:
    arm, t, session = int(canary), T0 + offset, f"u{unit}-{int(canary)}"
    if body == "call":
        return call_event("r1", arm, t, session, error_class=label, latency_ms=100 + offset)
    if body == "tool":
        return tool_event("r1", arm, t, session, error_class=label)
    if body == "task":
        return task_event("r1", arm, t, session, failed=bool(label))
    if body == "thumbs":
        kind = sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN if label else sidecar_pb2.FEEDBACK_KIND_THUMBS_UP
        return feedback_event("r1", arm, t, session, kind=kind)
    if body == "score":
        return feedback_event("r1", arm, t, session, kind=sidecar_pb2.FEEDBACK_KIND_SCORE, score=offset / 50)
    return safety_event("r1", arm, t, session, category="secret" if label else "toxicity", direction="output")


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(BODIES),
            st.integers(0, 12),
            st.booleans(),
            st.sampled_from(ERROR_LABELS),
            st.floats(0, 50),
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(1, 40),
)
def test_any_batching_gives_the_same_sums(items: list[tuple[str, int, bool, str, float]], cut: int) -> None:
    """Every body, units recurring inside a batch, in any order: the sums do not depend on the
    batches, and stay consistent (units <= observations, failures <= observations)."""
    events = [any_event(*item) for item in items]
    whole, single, chunked = fresh_evidence(), fresh_evidence(), fresh_evidence()
    now = T0 + 60
    add(whole, events, now)
    for e in events:
        add(single, [e], now)
    for start in range(0, len(events), cut):
        add(chunked, events[start : start + cut], now)
    for other in (single, chunked):
        np.testing.assert_allclose(other.sums, whole.sums, rtol=1e-9, atol=1e-9)
        assert other.excluded == whole.excluded and other.safety_events == whole.safety_events
        assert other.critical_events == whole.critical_events
    k, n, s, nn = (whole.sums[..., i] for i in (K, N, S, NN))
    assert np.all(k <= n) and np.all(nn >= n) and np.all(nn <= n * n)
    for family in (REQ, TOOL, CALL, TASK):
        assert np.all(s[:, :, family] <= n[:, :, family])
    calls = [i for i in items if i[0] == "call"]
    caused = [i for i in calls if i[3] not in ("quota_refused", "guard_blocked_input", "cancelled")]
    assert whole.arm_sums(CALL, 0).n + whole.arm_sums(CALL, 1).n == len(caused)
    assert sum(sum(v) for v in whole.excluded.values()) == sum(
        1
        for i in items
        if i[0] in ("call", "tool") and i[3] in ("quota_refused", "guard_blocked_input", "cancelled")
    )
    assert sum(whole.safety_events) == sum(1 for i in items if i[0] == "safety")


# -- checkpoints ------------------------------------------------------------------------------


def test_evidence_round_trip_keeps_units_and_decisions() -> None:
    h = Harness(SPEC_YAML)
    h.start()
    rng = random.Random(3)
    sessions = {0: [new_session() for _ in range(400)], 1: [new_session() for _ in range(200)]}
    for arm, names in sessions.items():
        h.add(
            [
                call_event(h.state.rollout_id, arm, h.clock.now(), s, latency_ms=jittered(rng, 500))
                for s in names
                for _ in range(2)
            ]
        )
    h.add([safety_event(h.state.rollout_id, 1, h.clock.now())])
    restored = RolloutEvidence.from_state(json.loads(json.dumps(h.evidence.to_state())))
    assert_same_evidence(restored, h.evidence)
    assert restored._slots.keys() == h.evidence._slots.keys()
    assert restored.safety.e_value == h.evidence.safety.e_value
    # what comes next lands on the same units in both (late task feedback of known sessions)
    twin = Harness(SPEC_YAML)  # a restarted collector: its controller and book from checkpoints
    twin.ctl = RolloutController.restore([h.state])
    twin.book.load_state(json.loads(json.dumps(h.book.to_state())))
    twin.clock.set(h.clock.now())
    restored = twin.evidence
    for harness in (h, twin):
        later = [
            task_event(h.state.rollout_id, arm, harness.clock.now(), s, failed=(arm == 1 and i % 3 == 0))
            for arm, names in sessions.items()
            for i, s in enumerate(names)
        ]
        harness.add(later)
    assert_same_evidence(restored, h.evidence)
    assert len(restored._slots) == len(h.evidence._slots) == 600  # the old units, no new ones
    assert restored.arm_sums(TASK, 1).n == 200 and restored.arm_sums(TASK, 1).s == 67
    assert restored.arm_sums(REQ, 1).k == 200 and restored.arm_sums(REQ, 1).nn == 200 * 4
    decisions = [[], []]
    for _ in range(30):
        for harness, out in zip((h, twin), decisions, strict=True):
            harness.feed(20, canary=False)
            harness.feed(10, canary=True)
            out.append(harness.tick(10))
    assert decisions[0] == decisions[1] and any(decisions[0])
    assert [r.verdict for r in h.ctl.evaluation] == [r.verdict for r in twin.ctl.evaluation]


def test_book_round_trip_and_format_check() -> None:
    h = Harness(SPEC_YAML)
    h.start()
    h.feed(50, canary=False, error_every=5)
    h.feed(50, canary=True, error_every=2)
    state = h.book.to_state()
    book = EvidenceBook()
    book.load_state(json.loads(json.dumps(state)))
    loaded = book.get(AGENT)
    assert loaded is not None and loaded.rollout_id == h.state.rollout_id
    assert_same_evidence(loaded, h.evidence)
    assert json.loads(json.dumps(book.to_state())) == json.loads(json.dumps(state))
    # a restarted collector's book takes the next events of the same rollout
    assert book.add_events([call_event(h.state.rollout_id, 1, h.clock.now())], h.clock.now()) == 1
    assert loaded.arm_sums(REQ, 1).n == 51
    with pytest.raises(ValueError, match="format"):
        EvidenceBook().load_state({**state, "format": 99})
    with pytest.raises(ValueError, match="format"):
        RolloutEvidence.from_state({**state["agents"][AGENT], "format": 0})


def test_sync_starts_a_new_rollout_empty_and_ignores_other_events() -> None:
    h = Harness(SPEC_YAML)
    first = h.start()
    h.feed(10, canary=True)
    other = call_event(first.rollout_id, 1, h.clock.now())
    other.rollout_id = "another"
    stranger = call_event(first.rollout_id, 1, h.clock.now())
    stranger.agent = "someone-else"
    wrong_role = call_event(first.rollout_id, 1, h.clock.now())
    wrong_role.version_id = STABLE_V  # the stable version serving as canary: not this rollout's arm
    assert h.add([other, stranger, wrong_role]) == 0
    h.ctl.abort("x", h.clock.now(), "ops")
    second = h.start()
    assert h.evidence.rollout_id == second.rollout_id and h.evidence.arm_sums(REQ, 1).n == 0


def test_forgotten_units_keep_their_sums() -> None:
    evidence = fresh_evidence(max_units=64)
    events = [call_event("r1", i % 2, T0 + i, f"u{i}") for i in range(300)]
    for start in range(0, 300, 10):
        add(evidence, events[start : start + 10], T0 + start + 10)
    assert evidence.forgotten_units > 0 and len(evidence._slots) <= 64
    assert evidence.arm_sums(REQ, 0).n + evidence.arm_sums(REQ, 1).n == 300
    assert evidence.arm_sums(REQ, 0).k + evidence.arm_sums(REQ, 1).k == 300
    restored = RolloutEvidence.from_state(json.loads(json.dumps(evidence.to_state())))
    assert restored.forgotten_units == evidence.forgotten_units
    assert_same_evidence(restored, evidence)


# -- strata ----------------------------------------------------------------------------------


def test_traffic_drift_between_stages_is_not_harm() -> None:
    """Simpson's paradox: both versions fail 1 % in stage 1 and 10 % in stage 2, while the
    candidate's share rises from 10 % to 50 %. Pooled, the candidate looks far worse."""
    h = Harness(SPEC_YAML.replace("min_samples: 300", "min_samples: 3000").replace("max_duration: 1h", ""))
    h.start()
    h.feed(9000, canary=False, error_every=100)
    h.feed(1000, canary=True, error_every=100)
    state = h.tick(60)
    assert state is not None and state.step_index == 1 and state.phase == RUNNING
    h.feed(7000, canary=False, error_every=10)
    h.feed(3000, canary=True, error_every=10)
    assert h.tick(10) is None  # no harm: the strata compare like with like
    errors = h.ctl.evaluation[0]
    assert errors.name == "errors" and errors.verdict != "harm"
    assert errors.estimate == pytest.approx(0.0, abs=1e-9)
    # the error-rate trigger sees 10 % on the candidate, but stable is beyond the limit too
    trigger = next(r for r in h.ctl.evaluation if r.name == "trigger:error_rate")
    assert trigger.verdict != "harm" and "suppressed" in trigger.detail
    # what an unstratified comparison of the same evidence would say
    ev = h.evidence
    y0, n0 = ev.arm_sums(REQ, 0).s, ev.arm_sums(REQ, 0).n
    y1, n1 = ev.arm_sums(REQ, 1).s, ev.arm_sums(REQ, 1).n
    pooled = y1 / n1 - y0 / n0
    assert (n0, n1) == (16_000, 4_000) and pooled > 0.025
    h_pooled = msprt_half_width(proportion_difference_variance(y0, n0, y1, n1), 0.02, errors.alpha)
    assert pooled - h_pooled > 0  # the pooled test would have rolled back an identical candidate
    z, p = two_proportion_ztest(int(y0), int(n0), int(y1), int(n1))
    assert z > 0 and p < 1e-9


# -- clusters --------------------------------------------------------------------------------


def test_correlated_sessions_widen_the_interval() -> None:
    """The same 10 % errors in 2,000 calls: in 200 sessions of 10 calls where a tenth of the
    sessions fail every call, or in independent calls. Clustering must show in the variance."""
    gate = Gate(name="errors", metric="error_rate", max_increase=0.05)
    clustered, independent = fresh_evidence(), fresh_evidence()
    for arm in (0, 1):
        # a tenth of the sessions fail all their calls / a tenth of the calls fail
        def failing(u: int) -> str:
            return "timeout" if u % 10 == 0 else ""

        add(
            clustered,
            [
                call_event("r1", arm, T0, f"c{arm}-{u}", error_class=failing(u))
                for u in range(200)
                for _ in range(10)
            ],
            T0,
        )
        add(
            independent,
            [call_event("r1", arm, T0, f"i{arm}-{u}", error_class=failing(u)) for u in range(2000)],
            T0,
        )
    for ev in (clustered, independent):
        assert ev.arm_sums(REQ, 1).n == 2000 and ev.arm_sums(REQ, 1).s == 200
    assert clustered.arm_sums(REQ, 1).k == 200 and independent.arm_sums(REQ, 1).k == 2000
    v_clustered, v_independent = (
        estimate(gate, clustered, 0.01).variance,
        estimate(gate, independent, 0.01).variance,
    )
    assert 5 < v_clustered / v_independent <= 20  # a design effect of about 1 + (10 - 1)·1
    wide, narrow = evaluate_gate(gate, clustered, 0.005), evaluate_gate(gate, independent, 0.005)
    assert wide.upper - wide.lower > 2 * (narrow.upper - narrow.lower)
    assert narrow.verdict == "no_harm" and wide.verdict == "undecided"


# -- what reliability counts -----------------------------------------------------------------


def test_reliability_counts_only_what_the_candidate_caused() -> None:
    ev = fresh_evidence()
    events = [
        call_event("r1", 1, T0, error_class=label)
        for label in (
            "quota_refused",
            "rate_limited",
            "guard_blocked_input",
            "cancelled",
            "canceled",
            "guard_blocked_output",
            "provider_5xx",
            "timeout",
            "",
        )
    ]
    events += [
        tool_event("r1", 1, T0, error_class="quota"),
        tool_event("r1", 1, T0, error_class="tool_5xx"),
        call_event("r1", 0, T0, error_class="quota_refused"),
    ]
    intercepted = tool_event("r1", 1, T0)
    intercepted.tool.intercepted = True
    add(ev, [*events, intercepted], T0)
    assert ev.excluded == {"quota": [1, 3], "guard_block": [0, 1], "cancelled": [0, 2]}
    requests = ev.arm_sums(REQ, 1)
    assert (requests.n, requests.s) == (5, 4)  # output block, 5xx, timeout, ok call; tool 5xx
    assert (ev.arm_sums(CALL, 1).n, ev.arm_sums(TOOL, 1).n, ev.arm_sums(TOOL, 1).s) == (4, 1, 1)
    assert ev.arm_sums(REQ, 0).n == 0


def test_refusals_do_not_roll_back_but_blocked_output_does() -> None:
    for label, harmful in (
        ("quota_refused", False),
        ("guard_blocked_input", False),
        ("cancelled", False),
        ("guard_blocked_output", True),
    ):
        h = Harness(SPEC_YAML)
        h.start()
        h.feed(400, canary=False)
        h.feed(200, canary=True, error_every=2, error_class=label)
        state = h.tick(10)
        if harmful:
            assert state is not None and state.phase == ROLLED_BACK and "gate errors" in state.reason
        else:
            assert state is None, state
            assert h.evidence.arm_sums(REQ, 1).n == 100 and h.evidence.excluded


# -- late feedback ---------------------------------------------------------------------------


def test_late_feedback_counts_for_the_units_version_and_stage() -> None:
    h = Harness(SPEC_YAML.replace("max_duration: 1h", "max_duration: 12h"))
    first = h.start()
    early = {arm: [new_session() for _ in range(150)] for arm in (0, 1)}
    for arm, names in early.items():
        h.add([call_event(first.rollout_id, arm, h.clock.now(), s) for s in names])
    assert h.tick(60) is not None and h.state.step_index == 1
    h.feed(400, canary=True)
    assert h.tick(120) is not None and h.state.step_index == 2
    h.clock.advance(3 * 3600)
    sent = h.clock.now() - 1  # hours after the session's first call
    late = [
        task_event(first.rollout_id, arm, sent, s, failed=arm == 1)
        for arm, names in early.items()
        for s in names
    ]
    assert h.add(late) == 300
    ev = h.evidence
    assert ev.arm_sums(TASK, 1, stratum=0).n == 150 and ev.arm_sums(TASK, 1, stratum=0).s == 150
    assert ev.arm_sums(TASK, 0, stratum=0).n == 150 and ev.arm_sums(TASK, 0, stratum=0).s == 0
    assert ev.arm_sums(TASK, 1, stratum=2).n == 0
    assert ev.arm_sums(TASK, 1).k == 150  # the sessions' own units: no new ones
    # and the task gate sees it
    state = h.tick(10)
    assert state is not None and state.phase == ROLLED_BACK and "gate task" in state.reason


def test_event_times_are_clamped_to_now_and_missing_times_are_now() -> None:
    ev = fresh_evidence()
    future = call_event("r1", 1, T0 + 3600, "u1")
    untimed = call_event("r1", 1, T0, "u2")
    untimed.time_unix_nano = 0
    rows = Rows()
    assert ev.rows_from_event(future, T0, rows) and ev.rows_from_event(untimed, T0, rows)
    assert rows.times == [T0, T0]


def test_unit_id_is_the_cluster_when_set() -> None:
    ev = fresh_evidence()
    events = [call_event("r1", 1, T0, f"s{i}") for i in range(6)]
    for e in events:
        e.unit_id = "user-7"  # sticky by user: every session of the user is one unit
    add(ev, events, T0)
    assert (ev.arm_sums(REQ, 1).k, ev.arm_sums(REQ, 1).n, ev.arm_sums(REQ, 1).nn) == (1, 6, 36)
    assert ev.arm_sums(LAT, 1).n == 6 and ev.sums[0, 1, REQ, K] == 1 and ev.sums[0, 1, REQ, S] == 0
    assert ev.sums[0, 1, REQ, N] == 6


# -- the collector's path: ingest, dedupe, checkpoint ----------------------------------------


@dataclass
class Record:
    """The fields of an aiokafka ConsumerRecord the ingest step reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def test_ingest_counts_each_event_once_and_the_checkpoint_carries_the_evidence() -> None:
    h = Harness(SPEC_YAML)
    h.start()
    windows = RollingWindows(bucket_s=1, retention_s=900)
    ingestor = Ingestor(windows, CollectorMetrics(), evidence=h.book)
    rid, now = h.state.rollout_id, h.clock.now()
    events = [call_event(rid, i % 2, now, error_class="timeout" if i % 5 == 0 else "") for i in range(40)]
    events.append(task_event(rid, 1, now, events[1].session_id, failed=True))
    records = []
    for offset, e in enumerate([*events, *events[:10]]):  # ten redeliveries
        value, headers = outrider.encode_event(e)
        records.append(Record("outrider.events", 0, offset, e.agent.encode(), value, headers))
    assert ingestor.apply(records, now) == []
    ev = h.evidence
    assert ev.arm_sums(REQ, 0).n + ev.arm_sums(REQ, 1).n == 40
    assert (ev.arm_sums(REQ, 0).s, ev.arm_sums(REQ, 1).s) == (4, 4)
    assert ev.arm_sums(TASK, 1).n == 1 and ev.arm_sums(TASK, 1).k == 1
    snapshot = Checkpoint(
        offsets=ingestor.positions,
        windows=windows.to_state(),
        totals={},
        extra={"evidence": h.book.to_state()},
    )
    restored = decode(encode(snapshot))
    book = EvidenceBook()
    book.load_state(restored.extra["evidence"])
    again = book.get(AGENT)
    assert again is not None
    assert_same_evidence(again, ev)
    assert restored.offsets == {("outrider.events", 0): len(records)}


def test_a_unit_that_moves_to_the_candidate_counts_for_the_candidate() -> None:
    ev = fresh_evidence()
    before = call_event("r1", 0, T0, "s1")
    before.unit_id = "user-7"  # sticky by user: stable while its hash is above the weight
    add(ev, [before], T0)
    ev.begin_stage(1, T0 + 60)
    after = [call_event("r1", 1, T0 + 61, f"s{i}", error_class="timeout") for i in range(2, 6)]
    for e in after:
        e.unit_id = "user-7"  # the weight rose past its hash: its new sessions go to the candidate
    add(ev, after, T0 + 61)
    assert (ev.arm_sums(REQ, 0).n, ev.arm_sums(REQ, 1).n) == (1, 4)
    assert ev.arm_sums(REQ, 1).s == 4 and ev.candidate_requests(1) == 4
