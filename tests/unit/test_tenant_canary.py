"""Per-tenant canaries, pure: the spec's tenant lists, the router's groups, the session token's
group, the evidence that compares only the randomized split, status's per-group figures, and
time_scale on states, status, records and the collector's gauge."""

from __future__ import annotations

import base64
import json

import pytest

from collector import EvidenceBook, load_spec_text
from collector._config_errors import SpecError
from collector._deployments import build_record
from collector._evidence import REQ
from collector._metrics import CollectorMetrics
from collector._rollout_state import stage_record
from devstack._history_cli import show_lines
from devstack._status import render_status, status_view
from outrider.v1 import admin_pb2, common_pb2, control_pb2, events_pb2
from sidecar import ManualClock, Router, SessionCodec
from sidecar.routing._tenants import EXCLUDED, OPT_IN, SPLIT
from tests.unit.rollout_support import (
    AGENT,
    CANDIDATE_V,
    RUNNING,
    STABLE_V,
    Harness,
    call_event,
    new_session,
)

HEAD = f"agent: {AGENT}\nstable: {STABLE_V}\ncandidate: {CANDIDATE_V}\n"
TENANTS = "opt_in_tenants: [acme, globex]\nexclude_tenants: [initech]\n"
SPEC = (
    HEAD
    + TENANTS
    + "look_interval: 10s\nsticky_by: tenant\nsteps:\n"
    + "  - {weight: 1, min_duration: 1m, min_samples: 20}\n"
    + "  - {weight: 50, min_duration: 1m, max_duration: 1h}\n"
    + "gates:\n  - {name: errors, metric: error_rate, max_increase: 0.02, min_samples: 10}\n"
)
SPLIT_PHASES = (RUNNING, control_pb2.ROLLOUT_PHASE_HOLD, control_pb2.ROLLOUT_PHASE_NO_DATA)
TENANT_IDS = [f"t{i}" for i in range(2000)]


# -- the spec ---------------------------------------------------------------------------------


def test_tenant_canary_spec_lists_reach_the_state_at_start() -> None:
    h = Harness(SPEC + "time_scale: 0.01\n")
    assert h.spec.opt_in_tenants == ("acme", "globex") and h.spec.exclude_tenants == ("initech",)
    state = h.start()
    assert list(state.opt_in_tenants) == ["acme", "globex"] and list(state.exclude_tenants) == ["initech"]
    assert state.time_scale == pytest.approx(0.01)
    # every later state is a copy of the one before: the lists stay while the rollout runs
    h.clock.advance(3600)
    assert h.ctl.abort("test", h.clock.now(), "test").opt_in_tenants == ["acme", "globex"]
    assert Harness(HEAD + "steps:\n  - {weight: 5}\n").start().time_scale == 1.0


@pytest.mark.parametrize(
    ("lists", "message"),
    [
        (
            "opt_in_tenants: [acme, initech]\nexclude_tenants: [initech]\n",
            "exclude_tenants: tenant 'initech' is also in opt_in_tenants",
        ),
        ("opt_in_tenants: [acme, acme]\n", "opt_in_tenants: .*tenant 'acme' is listed twice"),
        ("exclude_tenants: ['']\n", "exclude_tenants: .*empty"),
        ("opt_in_tenants: acme\n", "opt_in_tenants: "),
        ("exclude_tenants: [{a: 1}]\n", r"exclude_tenants\[0\]: "),
    ],
)
def test_tenant_canary_spec_errors_name_the_field_and_tenant(lists: str, message: str) -> None:
    with pytest.raises(SpecError, match=r"^r\.yaml: " + message):
        load_spec_text(HEAD + lists + "steps:\n  - {weight: 5}\n", "r.yaml")


def test_tenant_canary_spec_lists_fit_on_every_state() -> None:
    """The lists travel on every rollout state: too many ids, or too many bytes of them, are refused."""
    steps = "steps:\n  - {weight: 5}\n"
    many = json.dumps([f"t{i}" for i in range(2001)])
    with pytest.raises(SpecError, match=r"^r\.yaml: opt_in_tenants: .*at most 2000"):
        load_spec_text(HEAD + f"opt_in_tenants: {many}\n" + steps, "r.yaml")
    long_ids = json.dumps([f"{i:04d}" + "x" * 200 for i in range(200)])
    short = json.dumps([f"{i:04d}" + "y" * 200 for i in range(200)])
    with pytest.raises(SpecError, match=r"^r\.yaml: opt_in_tenants: with exclude_tenants, 81600 bytes"):
        load_spec_text(HEAD + f"opt_in_tenants: {long_ids}\nexclude_tenants: {short}\n" + steps, "r.yaml")
    spec = load_spec_text(HEAD + f"opt_in_tenants: {long_ids}\n" + steps, "r.yaml")
    state = Harness(HEAD + f"opt_in_tenants: {long_ids}\n" + steps).start()
    assert len(spec.opt_in_tenants) == 200 and state.ByteSize() < 128 * 1024
    # status names a few and counts the rest
    (line,) = [x for x in render_status(admin_pb2.RolloutStatus(state=state)) if x.startswith("tenants ")]
    assert line.count("x" * 200) == 5 and "0004x" in line and "0005x" not in line
    assert "and 195 more (always the candidate)" in line


# -- the router -------------------------------------------------------------------------------


def rollout_state(phase: int = RUNNING, weight: float = 0.01, **over: object) -> control_pb2.RolloutState:
    fields: dict[str, object] = {
        "agent": AGENT,
        "generation": 1,
        "rollout_id": "r1",
        "stable_version_id": STABLE_V,
        "candidate_version_id": CANDIDATE_V,
        "candidate_weight": weight,
        "phase": phase,
        "sticky_by": common_pb2.STICKY_BY_TENANT,
        "opt_in_tenants": ["acme", "globex"],
        "exclude_tenants": ["initech"],
        **over,
    }
    return control_pb2.RolloutState(**fields)  # type: ignore[arg-type]


def router_with(state: control_pb2.RolloutState) -> Router:
    router = Router(AGENT, STABLE_V, (STABLE_V, CANDIDATE_V))
    assert router.apply(state)
    return router


@pytest.mark.parametrize("phase", SPLIT_PHASES)
def test_tenant_canary_router_opt_in_always_candidate_excluded_never(phase: int) -> None:
    # opt-in at a 1 % step and excluded at the 95 % confirmation step: the weights do not matter
    for weight in (0.01, 0.95):
        router = router_with(rollout_state(phase, weight))
        for n in range(200):
            for tenant in ("acme", "globex"):
                a = router.assign(f"n{n}", f"u{n}", tenant)
                assert (a.version_id, a.role, a.cohort) == (CANDIDATE_V, common_pb2.ROLE_CANARY, OPT_IN)
            a = router.assign(f"n{n}", f"u{n}", "initech")
            assert (a.version_id, a.role, a.cohort) == (STABLE_V, common_pb2.ROLE_STABLE, EXCLUDED)


def test_tenant_canary_router_the_rest_follow_the_weights_and_stick() -> None:
    router = router_with(rollout_state(weight=0.2))
    first = {t: router.assign(f"n-{t}", "", t) for t in TENANT_IDS}
    assert {a.cohort for a in first.values()} == {SPLIT}
    share = sum(a.version_id == CANDIDATE_V for a in first.values()) / len(TENANT_IDS)
    assert 0.16 < share < 0.24  # 2000 tenants at 20 %: 4 standard errors either side
    # sticky by tenant: a tenant's every new session gets the version its first one got
    for t in TENANT_IDS[:300]:
        assert router.assign(f"again-{t}", "other-user", t).version_id == first[t].version_id
    # no tenant id at all: split by the session nonce, like every other session
    assert router.assign("n-none", "", "").cohort == SPLIT


def test_tenant_canary_router_no_lists_no_group_and_no_candidate_outside_the_split() -> None:
    plain = router_with(rollout_state(opt_in_tenants=[], exclude_tenants=[]))
    assert plain.assign("n", "u", "acme").cohort == ""
    # a shadow phase, running or held: the candidate serves no user, opt-in tenants included
    for phase, sample in ((control_pb2.ROLLOUT_PHASE_SHADOW, 0.2), (control_pb2.ROLLOUT_PHASE_HOLD, 0.2)):
        a = router_with(rollout_state(phase, 0.0, shadow_sample=sample)).assign("n", "u", "acme")
        assert (a.version_id, a.cohort) == (STABLE_V, "")
    promoted = router_with(rollout_state(control_pb2.ROLLOUT_PHASE_PROMOTED)).assign("n", "u", "initech")
    assert (promoted.version_id, promoted.role, promoted.cohort) == (CANDIDATE_V, common_pb2.ROLE_STABLE, "")
    back = router_with(rollout_state(control_pb2.ROLLOUT_PHASE_ROLLED_BACK)).assign("n", "u", "acme")
    assert (back.version_id, back.cohort) == (STABLE_V, "")


def test_tenant_canary_session_token_carries_the_group_and_old_tokens_verify() -> None:
    codec = SessionCodec(b"k" * 32, ManualClock(1_700_000_000.0), ttl_s=3600)
    token, session = codec.issue(
        nonce="n1", version_id=CANDIDATE_V, role=2, rollout_id="r1", tenant_id="acme", cohort=OPT_IN
    )
    assert session.cohort == OPT_IN and codec.decode(token).cohort == OPT_IN
    # a token without a group (no tenant lists, or issued before groups) has no "c" and reads ""
    plain, _ = codec.issue(nonce="n2", version_id=STABLE_V, role=1, rollout_id="r1")
    payload = json.loads(base64.urlsafe_b64decode(plain.partition(".")[0] + "=="))
    assert "c" not in payload and codec.decode(plain).cohort == ""


# -- the evidence -----------------------------------------------------------------------------


def grouped(
    cohort: str, arm: int, t: float, *, error: bool = False, latency_ms: float = 100.0
) -> events_pb2.Event:
    event = call_event(
        "", arm, t, new_session(), error_class="provider_5xx" if error else "", latency_ms=latency_ms
    )
    event.cohort = cohort
    return event


def test_tenant_canary_evidence_takes_only_the_split() -> None:
    h = Harness(SPEC)
    rid = h.start().rollout_id
    t = h.clock.now()
    events = [grouped(c, arm, t) for c in (OPT_IN, EXCLUDED, SPLIT, "") for arm in (0, 1) for _ in range(3)]
    for e in events:
        e.rollout_id = rid
    assert h.add(events) == 12  # split and "" (an old sidecar), both arms, 3 each
    assert h.evidence.arm_sums(REQ, 1).n == 6 and h.evidence.arm_sums(REQ, 0).n == 6


def test_tenant_canary_opt_in_errors_do_not_bias_the_gates() -> None:
    """Opt-in tenants on a broken candidate and the split healthy: no gate sees harm. (Were the
    opt-in sessions compared, 300 candidate errors against none would roll back at once.)"""
    h = Harness(SPEC)
    rid = h.start().rollout_id
    for _ in range(12):
        h.clock.advance(10)
        t = h.clock.now()
        batch = [grouped(OPT_IN, 1, t, error=True) for _ in range(25)]
        batch += [grouped(SPLIT, arm, t) for arm in (0, 1) for _ in range(10)]
        batch += [grouped(EXCLUDED, 0, t, error=True) for _ in range(5)]
        for e in batch:
            e.rollout_id = rid
        h.add(batch)
        h.tick(0)
    assert h.state.phase not in (control_pb2.ROLLOUT_PHASE_ROLLED_BACK,), h.state.reason
    errors = next(g for g in (h.ctl.evaluation or h.state.gate_results) if g.name == "errors")
    assert errors.candidate_samples <= 120 and errors.verdict != "harm"
    # ... and status still shows what the opt-in tenants got
    tally = h.book.groups.get(AGENT, rid)
    assert tally is not None
    by_group = {(g.cohort, g.version_id): g for g in tally.metrics()}
    assert (
        by_group[(OPT_IN, CANDIDATE_V)].error_rate == 1.0 and by_group[(OPT_IN, CANDIDATE_V)].requests == 300
    )
    assert by_group[(SPLIT, CANDIDATE_V)].errors == 0 and by_group[(EXCLUDED, STABLE_V)].requests == 60
    # ... and warns that the opt-in tenants' errors are beyond the error_rate trigger, unacted on
    (warning,) = tally.warnings(h.spec, CANDIDATE_V)
    assert warning.startswith("opt-in tenants see 100.00% errors on the candidate over 300 requests")
    assert "limit is 2.00%" in warning
    healthy = Harness(SPEC)
    hid = healthy.start().rollout_id
    batch = [grouped(OPT_IN, 1, healthy.clock.now(), error=i < 2) for i in range(200)]
    for e in batch:
        e.rollout_id = hid
    healthy.add(batch)
    quiet = healthy.book.groups.get(AGENT, hid)
    assert quiet is not None and quiet.warnings(healthy.spec, CANDIDATE_V) == []  # 1 %: below the limit


# -- status, records, metrics ----------------------------------------------------------------


def test_tenant_canary_status_groups_are_tallied_checkpointed_and_printed() -> None:
    h = Harness(SPEC + "time_scale: 0.01\n")
    state = h.start()
    t = h.clock.now()
    events = [grouped(OPT_IN, 1, t, latency_ms=200.0) for _ in range(20)]
    events += [grouped(OPT_IN, 1, t, error=True, latency_ms=200.0) for _ in range(5)]
    events += [grouped("", 0, t, latency_ms=50.0) for _ in range(40)]  # an old sidecar: split
    events += [grouped(EXCLUDED, 0, t) for _ in range(8)]
    events += [grouped(SPLIT, 1, t, latency_ms=80.0) for _ in range(2)]
    other = grouped(OPT_IN, 1, t)
    for e in events:
        e.rollout_id = state.rollout_id
    other.rollout_id = "another-rollout"  # not this rollout's: not counted
    h.add([*events, other])
    # the tally is checkpointed with the evidence (as JSON), and survives the round trip
    restored = EvidenceBook()
    restored.load_state(json.loads(json.dumps(h.book.to_state())))
    tally = restored.groups.get(AGENT, state.rollout_id)
    assert tally is not None and restored.groups.get(AGENT, "another-rollout") is None
    groups = tally.metrics()
    assert [(g.cohort, g.version_id, g.requests, g.errors) for g in groups] == [
        (OPT_IN, CANDIDATE_V, 25, 5),
        (SPLIT, STABLE_V, 40, 0),
        (SPLIT, CANDIDATE_V, 2, 0),
        (EXCLUDED, STABLE_V, 8, 0),
    ]
    assert groups[0].error_rate == pytest.approx(0.2) and groups[0].latency_p95_ms == pytest.approx(
        200, rel=0.02
    )
    status = admin_pb2.RolloutStatus(state=state, groups=groups, now_unix_nano=round(t * 1e9))
    lines = render_status(status)
    assert lines[0] == "*** time_scale 0.01: a scaled demo, durations are 1/100 of the plan ***"
    text = "\n".join(lines)
    assert "tenants     opt-in acme, globex (always the candidate); excluded initech (never)" in text
    assert f"group       opt-in    candidate {CANDIDATE_V}  25 requests, 20.00% errors, p95 " in text
    assert f"group       excluded  stable    {STABLE_V}  8 requests, 0.00% errors" in text
    view = status_view(status)
    assert view["time_scale"] == pytest.approx(0.01) and len(view["groups"]) == 4
    # an old checkpoint without tallies loads, with none
    old = h.book.to_state()
    del old["groups"]
    fresh = EvidenceBook()
    fresh.load_state(old)
    assert fresh.groups.get(AGENT, state.rollout_id) is None


def test_tenant_canary_real_rollouts_say_nothing_of_scale_or_groups() -> None:
    state = Harness(HEAD + "steps:\n  - {weight: 5}\n").start()
    text = "\n".join(render_status(admin_pb2.RolloutStatus(state=state)))
    assert "time_scale" not in text and "group " not in text and "tenants " not in text


def test_tenant_canary_time_scale_in_records_show_and_metrics() -> None:
    h = Harness(SPEC + "time_scale: 0.001\n")
    started = h.start()
    h.clock.advance(5)
    ended = h.ctl.abort("demo over", h.clock.now(), "test")
    record = build_record(ended, [stage_record(started), stage_record(ended)], 0.0, h.clock.now())
    assert record.time_scale == pytest.approx(0.001)
    assert (
        show_lines(record)[0] == "*** time_scale 0.001: a scaled demo, durations are 1/1000 of the plan ***"
    )
    metrics = CollectorMetrics()
    metrics.observe_state(ended)
    assert metrics.registry.get_sample_value("outrider_rollout_time_scale", {"agent": AGENT}) == 0.001
    real = Harness(HEAD + "steps:\n  - {weight: 5}\n")
    metrics.observe_state(real.start())
    assert metrics.registry.get_sample_value("outrider_rollout_time_scale", {"agent": AGENT}) == 1.0
    real_end = real.ctl.abort("done", real.clock.now(), "test")
    real_record = build_record(real_end, [stage_record(real_end)], 0.0, real.clock.now())
    assert real_record.time_scale == 1.0 and not show_lines(real_record)[0].startswith("***")
