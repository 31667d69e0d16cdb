"""Blue-green on the sidecar's side, pure: the router's answers per phase, the smoke assertions,
and how status words a blue-green."""

from __future__ import annotations

from devstack._status import render_status
from devstack._watch import BoundsHistory
from outrider.v1 import admin_pb2, common_pb2, control_pb2
from sidecar import Router
from sidecar._smoke import SmokeRunner, _check

BLUE, GREEN = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
BG = control_pb2.ROLLOUT_STRATEGY_BLUE_GREEN


def bg_state(generation: int, phase: int, weight: float, **fields: object) -> control_pb2.RolloutState:
    return control_pb2.RolloutState(
        agent="bot",
        generation=generation,
        rollout_id="r1",
        stable_version_id=BLUE,
        candidate_version_id=GREEN,
        candidate_weight=weight,
        phase=phase,  # type: ignore[arg-type]
        strategy=BG,
        **fields,  # type: ignore[arg-type]
    )


def test_blue_green_router_smoke_test_blue_switched_green_switch_back_blue() -> None:
    router = Router("bot", BLUE, (BLUE, GREEN))
    router.apply(bg_state(1, control_pb2.ROLLOUT_PHASE_SMOKE_TEST, 0.0))
    answers = {(a.version_id, a.role, a.rollout_id) for a in (router.assign(f"n{i}") for i in range(50))}
    assert answers == {(BLUE, common_pb2.ROLE_STABLE, "r1")}
    router.apply(bg_state(2, control_pb2.ROLLOUT_PHASE_SWITCHED, 1.0))
    answers = {(a.version_id, a.role) for a in (router.assign(f"n{i}", f"u{i}", "t") for i in range(50))}
    assert answers == {(GREEN, common_pb2.ROLE_CANARY)}
    router.apply(bg_state(3, control_pb2.ROLLOUT_PHASE_ROLLED_BACK, 0.0))
    assert router.assign("n").version_id == BLUE


def test_blue_green_router_without_green_serves_the_configured_stable() -> None:
    router = Router("bot", BLUE, (BLUE,))
    router.apply(bg_state(1, control_pb2.ROLLOUT_PHASE_SWITCHED, 1.0))
    assert router.assign("n").version_id == BLUE and router.unknown_version_states == 1
    router.learn(GREEN)  # the registry brings green: the switch takes effect
    assert router.assign("n").version_id == GREEN


def test_blue_green_smoke_assertions_name_what_failed() -> None:
    test = control_pb2.SmokeTest(
        name="t", expect_tools=["lookup_order"], expect_content_pattern=r"order \d+", max_latency_ms=100
    )
    called = common_pb2.ChatMessage(
        content="your order 42", tool_calls=[common_pb2.ToolCall(name="lookup_order")]
    )
    assert _check(test, called, 50) == ""
    other = common_pb2.ChatMessage(content="order 1", tool_calls=[common_pb2.ToolCall(name="search_orders")])
    assert _check(test, other, 50) == "expected tool lookup_order, got search_orders"
    assert (
        _check(test, common_pb2.ChatMessage(content="order 1"), 50) == "expected tool lookup_order, got none"
    )
    words = common_pb2.ChatMessage(content="secret prompt words", tool_calls=called.tool_calls)
    failure = _check(test, words, 50)
    assert failure == r"content did not match /order \d+/" and "secret" not in failure
    assert _check(test, called, 250) == "latency 250 ms above max_latency 100 ms"


def test_blue_green_status_shows_smoke_results_and_blue_warm_until() -> None:
    smoke = bg_state(
        1,
        control_pb2.ROLLOUT_PHASE_SMOKE_TEST,
        0.0,
        started_at_unix_nano=0,
        smoke=control_pb2.SmokePlan(timeout_s=120, tests=[control_pb2.SmokeTest(name="lookup")]),
        gate_results=[
            control_pb2.GateResult(
                name="lookup",
                kind="smoke",
                verdict="harm",
                detail="failed on sidecar s1: expected tool x, got none",
            )
        ],
    )
    text = "\n".join(render_status(admin_pb2.RolloutStatus(state=smoke, now_unix_nano=20 * 10**9)))
    assert "phase       smoke test  blue-green: smoke tests against green (1, 100s left)" in text, text
    assert "smoke       lookup           FAILED     failed on sidecar s1: expected tool x, got none" in text
    no_baseline = control_pb2.GateResult(
        name="errors", kind="gate", verdict="undecided", detail="no baseline snapshot"
    )
    switched = bg_state(
        2,
        control_pb2.ROLLOUT_PHASE_SWITCHED,
        1.0,
        switched_at_unix_nano=0,
        keep_warm_s=1800,
        gate_results=[no_baseline],
    )
    text = "\n".join(render_status(admin_pb2.RolloutStatus(state=switched, now_unix_nano=600 * 10**9)))
    assert (
        "phase       switched  blue-green: green serves new sessions, blue warm until 1970-01-01 00:30:00 UTC"
        in text
    )
    assert "(20m00s)" in text and "baseline    no baseline snapshot" in text, text
    passed = smoke.gate_results[0]
    passed.verdict, passed.detail = "no_harm", "passed in 5 ms"
    text = "\n".join(render_status(admin_pb2.RolloutStatus(state=smoke)))
    assert "smoke       lookup           PASSED     passed in 5 ms" in text, text


def test_blue_green_smoke_runner_runs_each_rollout_once_when_green_is_here() -> None:
    router = Router("bot", BLUE, (BLUE,))
    runner = SmokeRunner(pipeline=None, router=router, recorder=None)  # type: ignore[arg-type]
    router.apply(bg_state(1, control_pb2.ROLLOUT_PHASE_SMOKE_TEST, 0.0))
    assert runner.due() is None  # green not known here (yet)
    router.learn(GREEN)
    due = runner.due()
    assert due is not None and due.rollout_id == "r1"
    runner._done.append("r1")  # what the loop does before it runs them
    assert runner.due() is None
    router.apply(bg_state(2, control_pb2.ROLLOUT_PHASE_SWITCHED, 1.0))
    assert runner.due() is None
    canary = control_pb2.RolloutState(
        agent="bot",
        generation=3,
        rollout_id="r2",
        stable_version_id=BLUE,
        candidate_version_id=GREEN,
        phase=control_pb2.ROLLOUT_PHASE_SMOKE_TEST,
    )
    router.apply(canary)  # not a blue-green: nothing to run
    assert runner.due() is None


def test_blue_green_watch_charts_no_bounds_for_smoke_tests() -> None:
    state = bg_state(
        1,
        control_pb2.ROLLOUT_PHASE_SMOKE_TEST,
        0.0,
        gate_results=[control_pb2.GateResult(name="lookup", kind="smoke", verdict="no_harm", unit="ms")],
    )
    history = BoundsHistory()
    history.add(admin_pb2.RolloutStatus(state=state))
    assert history.chart() == []
