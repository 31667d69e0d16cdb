"""The full gate metric set in the rolling windows and the cumulative totals: every body,
error classes, rates, per-session cost, and a lossless round trip through checkpoint state."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import Ingest, RollingWindows, WindowStats
from collector._errclass import ERROR_CLASSES, classify
from collector._totals import AgentTotals
from outrider.v1 import common_pb2, control_pb2, events_pb2, sidecar_pb2

T0 = 1_700_000_000.0
STABLE = common_pb2.ROLE_STABLE
_n = iter(range(10**9))


def event(t: float = T0, session: str = "s1", version: str = "v1") -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"e{next(_n)}",
        time_unix_nano=int(t * 1e9),
        agent="bot",
        version_id=version,
        role=STABLE,
        session_id=session,
    )


def call(
    latency: float = 100.0,
    error_class: str = "",
    session: str = "s1",
    cost: float = 0.01,
    ttft: float = 0.0,
    tokens: tuple[int, int] = (100, 20),
    tier: int = 0,
    degraded: bool = False,
    quota_wait: float = 0.0,
) -> events_pb2.Event:
    e = event(session=session)
    c = e.call
    c.latency_ms, c.time_to_first_token_ms, c.cost_usd = latency, ttft, cost
    c.input_tokens, c.output_tokens = tokens
    c.outcome = events_pb2.OUTCOME_ERROR if error_class else events_pb2.OUTCOME_OK
    c.error_class, c.fallback_tier, c.degraded, c.quota_wait_ms = error_class, tier, degraded, quota_wait
    return e


def feedback(kind: int, score: float = 0.0) -> events_pb2.Event:
    e = event()
    e.feedback.kind, e.feedback.score = kind, score
    return e


def safety(category: str, count: int = 1, action: str = "flag") -> events_pb2.Event:
    e = event()
    e.safety.category, e.safety.count, e.safety.action = category, count, action
    return e


def breaker(new_state: str) -> events_pb2.Event:
    e = event()
    e.breaker.upstream, e.breaker.old_state, e.breaker.new_state = (
        "provider:openai/gpt-4o",
        "closed",
        new_state,
    )
    return e


def mixed_events() -> list[events_pb2.Event]:
    tool_ok, tool_bad = event(), event()
    tool_ok.tool.tool_name = tool_bad.tool.tool_name = "lookup"
    tool_ok.tool.latency_ms, tool_bad.tool.latency_ms = 20, 40
    tool_ok.tool.outcome, tool_bad.tool.outcome = events_pb2.OUTCOME_OK, events_pb2.OUTCOME_ERROR
    tool_bad.tool.error_class = "timeout"
    return [
        call(latency=100, session="a", cost=0.01, ttft=30, tier=1),
        call(latency=200, session="a", cost=0.03, degraded=True, quota_wait=50),
        call(latency=300, session="b", cost=0.02, error_class="provider_5xx"),
        call(latency=400, session="c", cost=0.0, error_class="quota"),
        call(latency=500, session="c", cost=0.0, error_class="guard_blocked", ttft=90),
        tool_ok,
        tool_bad,
        feedback(sidecar_pb2.FEEDBACK_KIND_THUMBS_UP),
        feedback(sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN),
        feedback(sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN),
        feedback(sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS),
        feedback(sidecar_pb2.FEEDBACK_KIND_SCORE, 0.5),
        feedback(sidecar_pb2.FEEDBACK_KIND_SCORE, 1.0),
        safety("prompt_injection", 1, "block"),
        safety("pii.email", 2, "redact"),
        breaker("open"),
    ]


def test_every_body_lands_in_the_window() -> None:
    w = RollingWindows(bucket_s=5, retention_s=300)
    for e in mixed_events():
        assert w.add_event(e, T0) is Ingest.COUNTED
    s = w.snapshot("bot", "v1", STABLE, 60, T0)
    assert (s.requests, s.calls, s.errors) == (7, 5, 4)
    assert s.errors_by_class == {"provider": 1, "quota": 1, "guard_block": 1, "timeout": 1}
    assert s.error_rate == pytest.approx(4 / 7)
    # DDSketch's rank is floor(q * (n - 1)): the p99 of these 7 latencies is the 6th
    assert s.latency_p99_ms == pytest.approx(400, rel=0.02)
    assert s.latency_p50_ms == pytest.approx(200, rel=0.02)
    assert s.ttft_p50_ms == pytest.approx(30, rel=0.02)
    assert (s.input_tokens, s.output_tokens) == (500, 100)
    assert s.cost_usd == pytest.approx(0.06) and s.cost_per_call == pytest.approx(0.012)
    assert s.sessions == 3
    assert s.cost_per_session == pytest.approx(0.02) and s.cost_per_session_p50 == pytest.approx(0.02)
    assert (s.tool_calls, s.tool_failures, s.tool_failure_rate) == (2, 1, 0.5)
    assert (s.fallbacks, s.fallback_rate, s.degraded, s.degraded_rate) == (1, 0.2, 1, 0.2)
    assert (s.quota_waits, s.quota_wait_ms_mean, s.quota_refusals) == (1, 50.0, 1)
    assert s.safety_events == 3 and s.safety_by_category == {"prompt_injection": 1, "pii.email": 2}
    assert s.safety_event_rate == pytest.approx(3 / 7)
    assert (s.thumbs_up, s.thumbs_down) == (1, 2)
    assert s.thumbs_up_rate == pytest.approx(1 / 3) and s.thumbs_down_rate == pytest.approx(2 / 3)
    assert (s.task_successes, s.task_failures, s.task_success_rate) == (1, 0, 1.0)
    assert (s.scores, s.mean_score) == (2, 0.75)
    assert s.breaker_changes == 1
    assert w.snapshot("bot", "v2", STABLE, 60, T0) == WindowStats()


def test_totals_count_every_family_by_label() -> None:
    totals = AgentTotals()
    for e in mixed_events():
        totals.add_event(e)
    series = ("bot", "v1", "stable")
    assert totals.value("outrider_requests_total", series) == 7
    assert totals.value("outrider_errors_total", (*series, "provider")) == 1
    assert totals.value("outrider_errors_total", (*series, "timeout")) == 1
    assert totals.value("outrider_llm_quota_total", (*series, "refused")) == 1
    assert totals.value("outrider_llm_quota_total", (*series, "waited")) == 1
    assert totals.value("outrider_tool_failures_total", series) == 1
    assert totals.value("outrider_safety_events_total", (*series, "pii.email", "redact")) == 2
    assert totals.value("outrider_feedback_total", (*series, "thumbs_down")) == 2
    assert (
        totals.value("outrider_breaker_transitions_total", (*series, "provider:openai/gpt-4o", "open")) == 1
    )
    assert totals.value("outrider_request_duration_seconds", series) == 7
    assert totals.value("outrider_llm_time_to_first_token_seconds", series) == 2
    by_name = {m.name: m for m in totals.families()}
    duration = by_name["outrider_request_duration_seconds"]
    buckets = {s.labels["le"]: s.value for s in duration.samples if s.name.endswith("_bucket")}
    assert buckets["0.025"] == 1 and buckets["0.1"] == 3 and buckets["+Inf"] == 7
    cost_sum = [s.value for s in by_name["outrider_llm_cost_usd"].samples if s.name.endswith("_sum")]
    assert cost_sum == [pytest.approx(0.06)]
    for m in by_name.values():
        for sample in m.samples:
            assert not {"session", "session_id", "trace_id"} & set(sample.labels)


def test_state_round_trips_through_json() -> None:
    w, totals = RollingWindows(bucket_s=5, retention_s=300), AgentTotals()
    for e in mixed_events():
        w.add_event(e, T0)
        totals.add_event(e)
    w2, totals2 = RollingWindows(bucket_s=5, retention_s=300), AgentTotals()
    w2.load_state(json.loads(json.dumps(w.to_state())))
    totals2.load_state(json.loads(json.dumps(totals.to_state())))
    assert w2.snapshot("bot", "v1", STABLE, 60, T0) == w.snapshot("bot", "v1", STABLE, 60, T0)
    assert [m.samples for m in totals2.families()] == [m.samples for m in totals.families()]
    duplicate = mixed_events()[0]
    assert w.add_event(duplicate, T0) is Ingest.COUNTED
    w3 = RollingWindows(bucket_s=5, retention_s=300)
    w3.load_state(json.loads(json.dumps(w.to_state())))
    assert w3.add_event(duplicate, T0 + 1) is Ingest.DUPLICATE  # the ids travel with the state
    with pytest.raises(ValueError, match="bucket_s"):
        RollingWindows(bucket_s=1, retention_s=300).load_state(w.to_state())


@pytest.mark.parametrize(
    ("label", "tool", "expected"),
    [
        ("provider_5xx", False, "provider"),
        ("provider_429", False, "provider"),
        ("connect", False, "provider"),
        ("connect", True, "tool"),
        ("invalid_response", True, "tool"),
        ("tool_4xx", True, "tool"),
        ("breaker_open", False, "provider"),
        ("timeout", True, "timeout"),
        ("stream_stall", False, "timeout"),
        ("quota", False, "quota"),
        ("guard_blocked", False, "guard_block"),
        ("guard_blocked_input", False, "guard_block"),
        ("guard_blocked_output", False, "guard_output"),
        ("quota_refused", False, "quota"),
        ("canceled", False, "cancelled"),
        ("cancelled", False, "cancelled"),
        ("", False, "provider"),
        ("something_new", False, "other"),
    ],
)
def test_error_classes(label: str, tool: bool, expected: str) -> None:
    assert classify(label, tool=tool) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["call", "tool", "feedback", "safety", "breaker"]),
            st.integers(0, 40),  # id: repeats are redeliveries
            st.floats(0, 120),  # event time offset
            st.text(max_size=12),  # error class
        ),
        max_size=80,
    )
)
def test_windows_and_totals_agree_and_stay_consistent(
    items: list[tuple[str, int, float, str]],
) -> None:
    """Whatever arrives, in any order, with any redeliveries: each id counts once, windows and
    totals agree on requests and errors, and error classes are always known ones."""
    w, totals = RollingWindows(bucket_s=5, retention_s=600), AgentTotals()
    bodies: dict[int, str] = {}
    now = T0 + 200
    for body, ident, offset, error_class in items:
        e = events_pb2.Event(
            event_id=f"id{ident}",
            time_unix_nano=int((T0 + offset) * 1e9),
            agent="bot",
            version_id="v1",
            role=STABLE,
        )
        body = bodies.setdefault(ident, body)  # a redelivery is the same event
        if body == "call":
            e.call.outcome = events_pb2.OUTCOME_ERROR if error_class else events_pb2.OUTCOME_OK
            e.call.error_class = error_class
        elif body == "tool":
            e.tool.outcome = events_pb2.OUTCOME_ERROR if error_class else events_pb2.OUTCOME_OK
            e.tool.error_class = error_class
        elif body == "feedback":
            e.feedback.kind = sidecar_pb2.FEEDBACK_KIND_THUMBS_UP
        elif body == "safety":
            e.safety.category = "secret"
        else:
            e.breaker.new_state = "open"
        if w.add_event(e, now) is Ingest.COUNTED:
            totals.add_event(e)
    s = w.snapshot("bot", "v1", STABLE, 600, now)
    unique = {i: b for i, b in bodies.items()}
    assert s.requests == sum(1 for b in unique.values() if b in ("call", "tool"))
    assert s.requests == totals.value("outrider_requests_total", ("bot", "v1", "stable"))
    assert s.errors == sum(s.errors_by_class.values()) <= s.requests
    assert set(s.errors_by_class) <= set(ERROR_CLASSES)
    assert 0 <= s.error_rate <= 1 and 0 <= s.tool_failure_rate <= 1
    assert s.thumbs_up + s.safety_events + s.breaker_changes == sum(
        1 for b in unique.values() if b in ("feedback", "safety", "breaker")
    )


def test_new_gate_metrics_compare_candidate_to_baseline() -> None:
    from collector import EvidenceBook, load_spec_text
    from collector._gates import evaluate_gate

    spec_yaml = """
agent: bot
stable: aaaaaaaaaaaa
candidate: bbbbbbbbbbbb
steps: [{weight: 10}]
gates:
  - {name: unhappy, metric: thumbs_down_rate, max_increase: 0.1, window: 1m, min_samples: 3}
  - {name: spend, metric: cost_per_call, max_ratio: 1.5, window: 1m, min_samples: 2}
  - {name: tail, metric: latency_p99_ms, max_ratio: 2, window: 1m, min_samples: 2}
"""
    spec = load_spec_text(spec_yaml, "g.yaml")
    book = EvidenceBook()
    state = control_pb2.RolloutState(
        agent="bot",
        rollout_id="r1",
        stable_version_id="aaaaaaaaaaaa",
        candidate_version_id="bbbbbbbbbbbb",
        started_at_unix_nano=int(T0 * 1e9),
        step_started_at_unix_nano=int(T0 * 1e9),
    )
    evidence = book.sync(state, spec)
    assert evidence is not None
    events = []
    for version, role, down_every in (
        ("aaaaaaaaaaaa", STABLE, 0),
        ("bbbbbbbbbbbb", common_pb2.ROLE_CANARY, 2),  # half thumbs down against none
    ):
        for i in range(200):
            kind = sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN if down_every and i % down_every == 0 else 1
            for e in (feedback(kind), call(cost=0.01 * (1 + i % 5), latency=100.0 * (1 + i % 7))):
                e.version_id, e.role, e.rollout_id, e.session_id = version, role, "r1", f"{version}{i}"
                events.append(e)
    assert book.add_events(events, T0) == len(events)
    unhappy, spend, tail = (evaluate_gate(g, evidence, 0.01) for g in spec.gates)
    assert unhappy.ready and not unhappy.passed and unhappy.verdict == "harm"
    assert unhappy.candidate_value == 0.5 and unhappy.baseline_value == 0.0
    assert (unhappy.candidate_samples, unhappy.baseline_samples) == (200, 200)
    assert unhappy.estimate == pytest.approx(0.5) and unhappy.lower > 0 and unhappy.unit == "pts"
    # the same spend and latency on both sides: no harm beyond the ratios
    assert spend.ready and spend.passed and spend.verdict == "no_harm" and spend.limit == pytest.approx(1.5)
    assert spend.estimate == pytest.approx(1.0) and spend.lower < 1 < spend.upper < 1.5
    assert spend.candidate_value == pytest.approx(spend.baseline_value)
    assert tail.ready and tail.passed and tail.verdict == "no_harm" and tail.unit == "ratio"
    with pytest.raises(Exception, match="max_increase: required for metric thumbs_down_rate"):
        load_spec_text(
            "agent: b\nstable: a1\ncandidate: b1\nsteps: [{weight: 5}]\n"
            "gates: [{name: x, metric: thumbs_down_rate, max_ratio: 2}]",
            "x.yaml",
        )
