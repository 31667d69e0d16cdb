"""Where the shadow phase shows: the admin status (RolloutStatus.shadow, judge scores per
version), `outrider rollout status`, /metrics and `outrider rollout plan`."""

from __future__ import annotations

from prometheus_client import generate_latest

from collector import ManualClock, RollingWindows, load_spec_text
from collector._manager import RolloutManager
from collector._metrics import CollectorMetrics
from collector.simulate import format_plan, plan
from devstack._status import render_status, status_view
from outrider.v1 import common_pb2, control_pb2
from tests.unit.rollout_support import AGENT, CANDIDATE_V, STABLE_V
from tests.unit.shadow_support import intercepted_write, judge_event, shadow_event
from tests.unit.test_collector_manager import FlakyPublisher
from tests.unit.test_shadow_rollout import PURE, SPEC


async def _manager_with_pairs() -> tuple[RolloutManager, CollectorMetrics, ManualClock]:
    clock, windows, metrics = ManualClock(), RollingWindows(1, 900), CollectorMetrics()
    manager = RolloutManager(FlakyPublisher(), windows, metrics, clock)  # type: ignore[arg-type]
    metrics.watch_shadow(manager.evidence.shadows)
    ctl = await manager.start(load_spec_text(SPEC), SPEC, "alice")
    assert ctl.state is not None
    rid, now = ctl.state.rollout_id, clock.now()
    events = [shadow_event(rid, now, f"s{i}", agree=i % 4 != 0, similarity=0.5 + i / 100) for i in range(40)]
    events += [
        judge_event(rid, now, f"s{i}", score=0.7, stable_score=0.8, preference="stable") for i in range(10)
    ]
    events.append(intercepted_write(rid, now, "shadow-s1"))
    events += [
        judge_event(rid, now, "x", kind="single", score=0.6, version=STABLE_V, role=common_pb2.ROLE_STABLE)
        for _ in range(3)
    ]
    for event in events:
        windows.add_event(event, now)
        metrics.observe_event(event)
    manager.evidence.add_events(events, now)
    return manager, metrics, clock


async def test_status_has_the_shadow_summary_and_judge_scores() -> None:
    manager, _, _ = await _manager_with_pairs()
    await manager.tick()
    status = manager.status(AGENT)
    assert status.state.phase == control_pb2.ROLLOUT_PHASE_SHADOW
    shadow = status.shadow
    assert shadow.candidate_version_id == CANDIDATE_V
    assert (shadow.pairs, shadow.judged, shadow.intercepted_writes) == (40, 10, 1)
    assert shadow.tool_agreement == 0.75 and shadow.prefer_stable == 1.0
    assert shadow.judge_score < shadow.stable_judge_score
    stable = next(m for m in status.metrics if m.role == common_pb2.ROLE_STABLE)
    assert stable.judge_scores == 3 and abs(stable.judge_score - 0.6) < 1e-9
    assert [g.kind for g in status.state.gate_results] == ["shadow"]  # the live evaluation

    view = status_view(status)
    assert view["phase"] == "shadow" and view["shadow_phase"] and view["shadow"]["pairs"] == "40"
    text = "\n".join(render_status(status))
    assert "phase       shadow  shadow phase (25% of calls mirrored)" in text
    assert "shadow      40 pairs of 9f8e7d6c5b4a vs stable: tool agreement 75.0%" in text
    assert "judge: 10 pairs, score 0.700 vs stable 0.800; prefers candidate 0%, stable 100%" in text
    assert "1 intercepted writes" in text
    assert "shadow      tools" in text  # the shadow gate, under its own label
    assert "candidate 0.750 over 40 pairs" in text  # against its bound: no stable side


async def test_metrics_show_the_shadow_figures() -> None:
    _, metrics, _ = await _manager_with_pairs()
    body = generate_latest(metrics.registry).decode()
    labels = f'agent="{AGENT}",version="{CANDIDATE_V}"'
    assert f"outrider_shadow_tool_agreement_ratio{{{labels}}} 0.75" in body
    # the exposition sorts labels by name
    sides = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines() if "side=" in line}
    assert (
        abs(
            sides[f'outrider_shadow_judge_score{{agent="{AGENT}",side="stable",version="{CANDIDATE_V}"}}']
            - 0.8
        )
        < 1e-9
    )
    preferred = f'outrider_shadow_judge_preference_ratio{{agent="{AGENT}",preference="stable",'
    preferred += f'version="{CANDIDATE_V}"}}'
    assert f"{preferred} 1.0" in body
    series = f'agent="{AGENT}",role="shadow",version="{CANDIDATE_V}"'
    assert f"outrider_shadow_pairs_total{{{series}}} 40.0" in body
    assert f"outrider_shadow_tool_disagreements_total{{{series}}} 10.0" in body
    assert f"outrider_shadow_intercepted_writes_total{{{series}}} 1.0" in body
    assert 'outrider_judge_verdicts_total{agent="bot",kind="single",result="parsed",role="stable"' in body
    assert "outrider_judge_cost_usd_total{" in body


def test_plan_shows_the_shadow_phase_before_the_stages() -> None:
    spec = load_spec_text(SPEC)
    result = plan(spec, 10.0)
    assert result.shadow is not None
    assert result.shadow.pairs_per_second == 2.5
    assert result.shadow.judge_scores_per_hour == 2.5 * 3600 * 0.1  # the traffic's judge_share
    assert result.shadow.duration_s is not None and result.shadow.duration_s >= 30
    first = result.stages[0]
    assert first.ends_at_s is not None and first.duration_s is not None
    assert first.ends_at_s == result.shadow.duration_s + first.duration_s  # the stages start after it
    lines = format_plan(result, "r.yaml")
    assert any(
        line.startswith("shadow     25% mirrored: 2.5 pairs/s, ~900 judge scores per hour") for line in lines
    )
    assert any("shadow gate tools" in line and "passes after" in line for line in lines)
    pure = plan(load_spec_text(PURE), 10.0)
    assert pure.stages == () and pure.shadow is not None


def test_status_of_an_ended_pure_shadow_run() -> None:
    from outrider.v1 import admin_pb2

    state = control_pb2.RolloutState(
        agent=AGENT,
        phase=control_pb2.ROLLOUT_PHASE_ABORTED,
        step_count=0,
        reason="shadow run complete: 900 pairs in 700s, every shadow gate passed",
        decided_by="controller",
    )
    text = "\n".join(render_status(admin_pb2.RolloutStatus(state=state)))
    assert "phase       aborted  a pure shadow run" in text and "shadow run complete" in text
