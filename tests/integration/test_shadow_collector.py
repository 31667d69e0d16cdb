"""The shadow phase against the embedded broker: ShadowRecord and JudgeRecord events in, SHADOW
-> RUNNING (or a rollback naming the shadow gate) out on `outrider.control`, the admin API's
shadow summary, and the shadow metrics on /metrics."""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from collector import Collector
from devstack._status import render_status
from devstack.broker import EmbeddedBroker
from outrider.v1 import admin_pb2, common_pb2, control_pb2, events_pb2
from tests.integration.test_collector_service import (
    AGENT,
    CANDIDATE_V,
    STABLE_V,
    admin_client,
    control_states,
    ended_with,
    producer,
    send,
    settings_for,
    versions_reported,
)

pytestmark = pytest.mark.broker

SHADOW = control_pb2.ROLLOUT_PHASE_SHADOW
RUNNING = control_pb2.ROLLOUT_PHASE_RUNNING
_ids = itertools.count()


def shadow_spec(min_pairs: int = 60, judge_gate: bool = True) -> str:
    quality = {"name": "quality", "metric": "judge_score", "max_decrease": 0.2, "min_samples": 20}
    return yaml.safe_dump(
        {
            "agent": AGENT,
            "stable": STABLE_V,
            "candidate": CANDIDATE_V,
            "look_interval": "100ms",
            "shadow": {
                "sample": 50,
                "min_duration": "0.3s",
                "min_pairs": min_pairs,
                "gates": [
                    {"name": "tools", "metric": "tool_agreement", "min": 0.8, "min_samples": 20},
                    *([quality] if judge_gate else []),
                ],
            },
            "steps": [{"weight": 10, "min_duration": "10m"}],
        }
    )


def pair(rollout_id: str, session: str, agree: bool) -> list[events_pb2.Event]:
    """One mirrored call of stable session `session` and its judge verdict."""
    n = next(_ids)
    common = {
        "time_unix_nano": time.time_ns(),
        "agent": AGENT,
        "version_id": CANDIDATE_V,
        "role": common_pb2.ROLE_SHADOW,
        "session_id": session,
        "rollout_id": rollout_id,
    }
    shadow = events_pb2.Event(event_id=f"sh-{n}", **common)  # type: ignore[arg-type]
    s = shadow.shadow
    s.stable_version_id, s.operation, s.pair_id = STABLE_V, "chat", f"p{n}"
    s.outcome = s.stable_outcome = events_pb2.OUTCOME_OK
    s.tools_agree, s.text_similarity = agree, 0.9 if agree else 0.4
    s.stable_latency_ms, s.candidate_latency_ms = 100.0, 110.0
    s.stable_cost_usd, s.candidate_cost_usd = 0.002, 0.0021
    judge = events_pb2.Event(event_id=f"j-{n}", **common)  # type: ignore[arg-type]
    j = judge.judge
    j.kind, j.judge, j.parsed, j.pair_id, j.cost_usd = "pair", "openai/judge", True, f"p{n}", 0.0005
    j.score, j.stable_score, j.preference = (0.8, 0.8, "tie") if agree else (0.3, 0.8, "stable")
    return [shadow, judge]


async def produce_pairs(p: AIOKafkaProducer, rollout_id: str, sessions: int, agree_every: int) -> None:
    """Two pairs in each of `sessions` stable sessions; pairs agree unless i % agree_every != 0."""
    for i in range(sessions):
        session = f"stable-{next(_ids)}"
        for k in range(2):
            for event in pair(rollout_id, session, agree=(2 * i + k) % agree_every == 0):
                await send(p, event)


async def test_agreeing_shadow_pairs_open_the_first_step(broker: EmbeddedBroker) -> None:
    async with (
        producer(broker) as p,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        await versions_reported(broker, collector)
        started = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=shadow_spec()))
        state = started.state
        assert state.phase == SHADOW and state.candidate_weight == 0 and state.shadow_sample == 0.5
        await produce_pairs(p, state.rollout_id, 40, agree_every=1)
        states = await control_states(broker, ended_with(RUNNING))
        assert [s.phase for s in states] == [SHADOW, RUNNING]
        opened = states[-1]
        assert opened.step_index == 0 and opened.candidate_weight == pytest.approx(0.1)
        assert opened.shadow_sample == 0 and "shadow phase passed" in opened.reason
        assert {g.name: g.verdict for g in opened.gate_results} == {"tools": "no_harm", "quality": "no_harm"}

        # the phase opens once `min_pairs` (60) are in, and the rest may still be on their way:
        # every pair sent is counted, once
        request = admin_pb2.GetRolloutRequest(agent=AGENT)
        status, deadline = await admin.GetRollout(request), time.monotonic() + 30
        while min(status.shadow.pairs, status.shadow.judged) < 80 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            status = await admin.GetRollout(request)
        assert status.shadow.pairs == 80 and status.shadow.judged == 80
        assert status.shadow.tool_agreement == 1.0 and status.shadow.judge_cost_usd == pytest.approx(0.04)
        assert [s.phase for s in status.timeline] == [SHADOW, RUNNING]
        text = "\n".join(render_status(status))
        assert "shadow      80 pairs" in text and "tool agreement 100.0%" in text

        assert collector.metrics_port is not None
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{collector.metrics_port}/metrics") as response,
        ):
            body = await response.text()
        series = f'agent="{AGENT}",role="shadow",version="{CANDIDATE_V}"'
        assert f"outrider_shadow_pairs_total{{{series}}} 80.0" in body
        assert f'outrider_shadow_tool_agreement_ratio{{agent="{AGENT}",version="{CANDIDATE_V}"}} 1.0' in body
        assert "outrider_judge_cost_usd_total{" in body


async def test_disagreeing_tool_decisions_stop_the_rollout_in_shadow(broker: EmbeddedBroker) -> None:
    async with (
        producer(broker) as p,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        await versions_reported(broker, collector)
        started = await admin.StartRollout(
            admin_pb2.StartRolloutRequest(spec_yaml=shadow_spec(min_pairs=10_000, judge_gate=False))
        )
        # every other pair disagrees: 50 % agreement against a min of 80 %
        await produce_pairs(p, started.state.rollout_id, 60, agree_every=2)
        states = await control_states(broker, ended_with(control_pb2.ROLLOUT_PHASE_ROLLED_BACK))
        assert [s.phase for s in states] == [SHADOW, control_pb2.ROLLOUT_PHASE_ROLLED_BACK]
        stopped = states[-1]
        assert (
            stopped.reason.startswith("shadow gate ") and "found harm in the shadow phase" in stopped.reason
        )
        assert stopped.candidate_weight == 0 and stopped.decided_by == "controller"
        assert [(g.name, g.kind, g.verdict) for g in stopped.gate_results] == [("tools", "shadow", "harm")]
        status = await admin.GetRollout(admin_pb2.GetRolloutRequest(agent=AGENT))
        assert status.shadow.tool_agreement == pytest.approx(0.5, abs=0.1)
