"""The operator verbs on the pure controller and the manager (publisher faked), the notifier's
body and listener rule, and the `rollout status` / `watch` rendering (pure)."""

from __future__ import annotations

import json

import pytest

from collector import ManualClock, NoRollout, PublishError, RollingWindows, RolloutController, load_spec_text
from collector._errors import RolloutFinished, WrongPhase
from collector._manager import RolloutManager
from collector._metrics import CollectorMetrics
from collector._notify import Notifier, notification_body
from collector._settings import NotifySettings, load_settings
from devstack._status import render_status, status_json, status_view
from devstack._watch import BoundsHistory, sparkline
from outrider.v1 import admin_pb2, common_pb2, control_pb2
from tests.unit.test_collector_manager import SPEC_YAML, FlakyPublisher

RUNNING = control_pb2.ROLLOUT_PHASE_RUNNING
HOLD = control_pb2.ROLLOUT_PHASE_HOLD
NO_DATA = control_pb2.ROLLOUT_PHASE_NO_DATA
PROMOTED = control_pb2.ROLLOUT_PHASE_PROMOTED
ROLLED_BACK = control_pb2.ROLLOUT_PHASE_ROLLED_BACK
ABORTED = control_pb2.ROLLOUT_PHASE_ABORTED


def started() -> RolloutController:
    ctl = RolloutController("bot")
    ctl.start(load_spec_text(SPEC_YAML, "spec"), SPEC_YAML, 100.0, "cli:alice")
    return ctl


def test_verb_pause_resume_promote_record_who_and_why() -> None:
    ctl = started()
    held = ctl.propose_pause("looking at a ticket", 101.0, "cli:bob")
    assert held.phase == HOLD and held.decided_by == "cli:bob"
    assert held.reason == "paused by cli:bob: looking at a ticket"
    assert held.release == "an operator's resume"
    assert held.candidate_weight == ctl.state.candidate_weight  # frozen where it was
    ctl.apply(held)
    with pytest.raises(WrongPhase, match="already on HOLD"):
        ctl.propose_pause("again", 102.0, "cli:bob")
    resumed = ctl.propose_resume("fixed", 103.0, "cli:carol")
    assert (
        resumed.phase == RUNNING and resumed.release == "" and "resumed by cli:carol: fixed" in resumed.reason
    )
    ctl.apply(resumed)
    with pytest.raises(WrongPhase, match="not on HOLD"):
        ctl.propose_resume("nothing held", 104.0, "cli:carol")
    promoted = ctl.propose_promote("business call", 105.0, "cli:dave")
    assert promoted.phase == PROMOTED and promoted.candidate_weight == 1.0
    assert promoted.decided_by == "cli:dave" and "operator override" in promoted.reason
    ctl.apply(promoted)
    for verb in (ctl.propose_pause, ctl.propose_resume, ctl.propose_promote, ctl.propose_abort):
        with pytest.raises(RolloutFinished):
            verb("late", 106.0, "cli:eve")
    assert issubclass(RolloutFinished, WrongPhase)


def test_verb_pause_from_no_data_and_no_rollout() -> None:
    ctl = started()
    state = ctl.state
    assert state is not None
    no_data = control_pb2.RolloutState()
    no_data.CopyFrom(state)
    no_data.generation += 1
    no_data.phase = NO_DATA
    ctl.apply(no_data)
    assert ctl.propose_pause("quiet", 110.0, "x").phase == HOLD
    with pytest.raises(NoRollout):
        RolloutController("nobody").propose_pause("x", 1.0, "x")


async def test_verb_manager_publishes_first_and_tells_the_listener() -> None:
    told: list[tuple[int, int | None]] = []
    publisher = FlakyPublisher()
    manager = RolloutManager(
        publisher,
        RollingWindows(1, 600),
        CollectorMetrics(),
        ManualClock(),
        listener=lambda s, prev: told.append((s.phase, prev.phase if prev else None)),
    )
    with pytest.raises(NoRollout):
        await manager.pause("bot", "x", "cli:a")
    await manager.start(load_spec_text(SPEC_YAML, "spec"), SPEC_YAML, "cli:a")
    publisher.failures = 1
    with pytest.raises(PublishError):
        await manager.pause("bot", "x", "cli:a")
    ctl = manager.get("bot")
    assert ctl is not None and ctl.state is not None and ctl.state.phase == RUNNING
    await manager.pause("bot", "ticket 42", "cli:a")
    await manager.resume("bot", "done", "cli:b")
    await manager.promote("bot", "ship it", "cli:c")
    assert [s.phase for s in publisher.written] == [RUNNING, HOLD, RUNNING, PROMOTED]
    assert told == [(RUNNING, None), (HOLD, RUNNING), (RUNNING, HOLD), (PROMOTED, RUNNING)]
    assert manager.status("bot").state.decided_by == "cli:c"


def test_notify_settings_and_body() -> None:
    settings = load_settings(notify=[{"url": "http://127.0.0.1:9/hook", "timeout": "2s"}])
    assert settings.notify == [NotifySettings(url="http://127.0.0.1:9/hook", timeout=2.0)]
    with pytest.raises(Exception, match="http"):
        load_settings(notify=[{"url": "ftp://x"}])
    ctl = started()
    state = ctl.propose_pause("ticket", 101.0, "cli:bob")
    body = notification_body(state)
    assert body["phase"] == "hold" and body["agent"] == "bot" and body["decided_by"] == "cli:bob"
    assert "HOLD" in body["text"] and "ticket" in body["text"] and body["release"]
    assert body["gates"][0]["name"] == "errors" and body["generation"] == state.generation
    json.dumps(body)  # JSON as it is


def test_notify_listener_queues_only_changes_to_told_phases() -> None:
    metrics = CollectorMetrics()
    notifier = Notifier([NotifySettings(url="http://127.0.0.1:9/")], metrics, queue_size=2)
    ctl = started()
    running = ctl.state
    assert running is not None
    notifier(running, None)  # RUNNING is not told
    held = ctl.propose_pause("x", 101.0, "y")
    notifier(held, running)
    notifier(held, held)  # no change
    assert notifier._queue.qsize() == 1
    notifier(held, running)
    notifier(held, running)  # full: dropped and counted
    assert metrics.notifications.labels("dropped")._value.get() == 1


def _status(phase: int, verdict: str = "undecided", detail: str = "undecided: x") -> admin_pb2.RolloutStatus:
    state = control_pb2.RolloutState(
        agent="bot",
        rollout_id="r1",
        generation=3,
        phase=phase,  # type: ignore[arg-type]
        step_index=0,
        step_count=3,
        candidate_weight=0.1,
        stable_version_id="aaaa",
        candidate_version_id="bbbb",
        started_at_unix_nano=100 * 10**9,
        reason="held at step 1" if phase == HOLD else "started",
        release="an operator's resume" if phase == HOLD else "",
        decided_by="controller",
        gate_results=[
            control_pb2.GateResult(
                name="errors",
                metric="error_rate",
                kind="gate",
                unit="pts",
                verdict=verdict,
                estimate=0.01,
                lower=-0.02,
                upper=0.04,
                margin=0.05,
                candidate_value=0.03,
                baseline_value=0.02,
                candidate_samples=120,
                baseline_samples=900,
                detail=detail,
                waiting_for="more samples: the bounds still straddle 0 or the margin",
                action="rollback",
            ),
            control_pb2.GateResult(
                name="latency",
                metric="latency_p95_ms",
                kind="gate",
                unit="ratio",
                verdict="no_harm",
                estimate=1.01,
                lower=0.95,
                upper=1.08,
                margin=1.5,
                candidate_value=210.0,
                baseline_value=205.0,
            ),
            control_pb2.GateResult(
                name="trigger:error_rate",
                kind="trigger",
                unit="pts",
                verdict="waiting",
                waiting_for="100 samples",
            ),
        ],
    )
    return admin_pb2.RolloutStatus(
        state=state,
        now_unix_nano=160 * 10**9,
        metrics=[
            admin_pb2.VersionMetrics(
                version_id="aaaa",
                role=common_pb2.ROLE_STABLE,
                models=["gpt-4o-mini"],
                last_seen_unix_nano=158 * 10**9,
                window_s=60,
            ),
            admin_pb2.VersionMetrics(version_id="bbbb", role=common_pb2.ROLE_CANARY, window_s=60),
        ],
        warnings=["no sidecar has reported serving the candidate version bbbb since the rollout started"],
        timeline=[admin_pb2.StageRecord(generation=1, phase=RUNNING, reason="started")],
        figure_windows_s={"errors": 0.0, "latency": 0.0, "trigger:error_rate": 300.0},
    )


def test_status_text_units_windows_versions_and_warning() -> None:
    text = "\n".join(render_status(_status(RUNNING)))
    assert "phase       running  step 1/3" in text
    assert "+1.00 [-2.00, +4.00] % points, margin 5.00 % points" in text
    assert "\u00d71.010 [\u00d70.950, \u00d71.080], margin \u00d71.500" in text
    assert "candidate 210 ms (n=0)" in text and "candidate 3.00% (n=120)  stable 2.00% (n=900)" in text
    assert "window: since the rollout started 60s ago" in text and "window: the last 5m" in text
    assert "UNDECIDED" in text and "NO HARM" in text and "WAITING" in text and "waits for 100 samples" in text
    assert "aaaa  (gpt-4o-mini; last event 2s ago)" in text and "never seen" in text
    assert "WARNING     no sidecar has reported serving the candidate version bbbb" in text
    labelled = "\n".join(render_status(_status(RUNNING), labels={"aaaa": "v1", "bbbb": "v2"}))
    assert "stable      aaaa v1  (gpt-4o-mini" in labelled and "candidate   bbbb v2  (" in labelled


def test_status_words_rolled_back_and_promoted_only_once_ended() -> None:
    sneaky = "undecided: would be rolled back or promoted"
    for phase in (RUNNING, HOLD, NO_DATA):
        text = "\n".join(render_status(_status(phase, detail=sneaky))).lower()
        assert "rolled back" not in text and "promoted" not in text, phase
        assert "rolled_back" not in json.dumps(status_view(_status(phase, detail=sneaky))).lower()
    held = "\n".join(render_status(_status(HOLD)))
    assert "phase       on hold" in held and "released by an operator's resume" in held
    assert "phase       rolled back" in "\n".join(render_status(_status(ROLLED_BACK)))
    assert "phase       promoted" in "\n".join(render_status(_status(PROMOTED)))


def test_status_json_keeps_the_api_answer_and_adds_the_view() -> None:
    data = status_json(_status(RUNNING))
    assert data["state"]["agent"] == "bot" and data["state"]["gate_results"][0]["name"] == "errors"
    view = data["view"]
    assert view["phase"] == "running" and view["ended"] is False
    gate = view["gates"][0]
    assert (
        gate["verdict"] == "undecided" and gate["unit"] == "% points" and gate["candidate"]["samples"] == 120
    )
    assert view["versions"][0]["models"] == ["gpt-4o-mini"] and view["warnings"]
    json.dumps(data)


def test_watch_sparkline_and_history() -> None:
    assert sparkline([0.0, 0.5, 1.0, float("nan")], 0.0, 1.0) == "▁▅█ "
    assert sparkline([3.0], 3.0, 3.0) == "▅"
    history = BoundsHistory(size=3)
    for _ in range(5):
        history.add(_status(RUNNING))
    chart = history.chart()
    assert any(line.startswith("errors") and "upper" in line for line in chart)
    assert any("waiting for data" in line for line in chart)  # the trigger
    assert len(chart[0].split("upper ")[1].split()[0]) == 3  # bounded to `size`
