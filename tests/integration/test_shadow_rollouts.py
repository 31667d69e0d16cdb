"""Shadow rollouts end to end: a real sidecar and a real collector on the embedded broker, the
simulated provider answering both versions and judging, and an agent driving sessions (a
tool turn, then a text turn) over gRPC.

- a good candidate goes shadow -> canary -> promoted, by the controller alone;
- a candidate that picks other tools is stopped in its shadow phase, naming the gate, and no
  user ever got one of its answers;
- the judge's scores of production answers reach a canary's quality gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import yaml

from collector import Collector
from devstack.broker import EmbeddedBroker
from devstack.simprovider import ModelBehavior, SimProvider
from outrider.v1 import admin_pb2, common_pb2, control_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from tests.integration.test_collector_service import admin_client, settings_for, versions_reported
from tests.integration.test_sidecar_api import API_KEY, sidecar_config

pytestmark = pytest.mark.broker

AGENT = "support-bot"
SHADOW, RUNNING = control_pb2.ROLLOUT_PHASE_SHADOW, control_pb2.ROLLOUT_PHASE_RUNNING
PROMOTED, ROLLED_BACK = control_pb2.ROLLOUT_PHASE_PROMOTED, control_pb2.ROLLOUT_PHASE_ROLLED_BACK


def models() -> dict[str, ModelBehavior]:
    return {
        "sim-fast": ModelBehavior(latency_ms=2),
        "sim-good": ModelBehavior(latency_ms=2),
        "sim-bad": ModelBehavior(),
        "sim-divergent": ModelBehavior(
            latency_ms=2, tool_rename={"lookup_order": "search_orders"}, reply_style="reworded"
        ),
        "sim-judge": ModelBehavior(judge=True, judge_scores={"sim-fast": 0.8, "sim-divergent": 0.3}),
    }


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(models(), api_key=API_KEY, seed=5) as provider:
        yield provider


def shadow_sidecar(
    sim: SimProvider, broker: EmbeddedBroker, *, stable: str, candidate: str, **over: Any
) -> Any:
    """v1 on `stable`, v2 on `candidate`, with prompts of the same length (so the same cost)."""
    config = sidecar_config(sim, kafka=broker.bootstrap_servers, good=stable, bad=candidate)
    data = config.model_dump(mode="json")
    data["versions"]["v2"]["system_prompt"] = "You are a friendly support agent."
    data["versions"]["v1"]["system_prompt"] = "You are a helpful support agent."
    data["telemetry"] = {"spill_dir": None}
    # the sidecar shares this test's event loop with the collector and the agents, so the loop
    # is busy for reasons no production sidecar has: no shedding for a busy loop here
    data["shadow"] = {"max_busy": 1.0, **over.pop("shadow", {})}
    data.update(over)
    return type(config).model_validate(data).load_secrets({"TEST_SIM_KEY": API_KEY})


def spec(sidecar: Sidecar, **fields: Any) -> str:
    ids = sidecar.config.version_ids()
    return yaml.safe_dump({"agent": AGENT, "stable": ids["v1"], "candidate": ids["v2"], **fields})


async def agent(address: str, stop: asyncio.Event, seen: dict[str, int]) -> None:
    """Sessions of a tool turn and a text turn, until `stop`; counts the roles and versions served."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        n = 0
        while not stop.is_set():
            n += 1
            opened = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id=f"u{n}"))
            role = common_pb2.Role.Name(opened.role)
            for text in (f'/tool lookup_order {{"order_id": "{n}"}}', f"where is order {n}?"):
                messages = [common_pb2.ChatMessage(role="user", content=text)]
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Chat(
                        sidecar_pb2.ChatRequest(session_id=opened.session_id, messages=messages)
                    )
                    key = f"{role}:{reply.version_id}"
                    seen[key] = seen.get(key, 0) + 1


@contextlib.asynccontextmanager
async def traffic(address: str, workers: int = 4) -> AsyncIterator[dict[str, int]]:
    stop, seen = asyncio.Event(), {}
    tasks = [asyncio.create_task(agent(address, stop, seen)) for _ in range(workers)]
    try:
        yield seen
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_phase(admin: Any, *phases: int, within: float = 60) -> admin_pb2.RolloutStatus:
    deadline = time.monotonic() + within
    while True:
        status = await admin.GetRollout(admin_pb2.GetRolloutRequest(agent=AGENT))
        if status.state.phase in phases:
            return status
        assert time.monotonic() < deadline, f"still {status.state.phase}: {status.state.reason}"
        await asyncio.sleep(0.2)


WINDOW = {"window": "30s"}  # within the test collector's retention
SHADOW_PHASE = {
    "sample": 100,
    "min_pairs": 30,
    "gates": [
        {"name": "tools", "metric": "tool_agreement", "min": 0.9, "min_samples": 8},
        {"name": "similarity", "metric": "text_similarity", "min": 0.6, "min_samples": 8},
    ],
}


async def test_shadow_good_candidate_goes_shadow_then_canary_then_promoted(
    broker: EmbeddedBroker, sim: SimProvider
) -> None:
    async with (
        Sidecar(shadow_sidecar(sim, broker, stable="sim-good", candidate="sim-good")) as sidecar,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        ids = sidecar.config.version_ids()
        await versions_reported(broker, collector, *ids.values(), send=False)
        body = spec(
            sidecar,
            look_interval="200ms",
            shadow=SHADOW_PHASE,
            steps=[{"weight": 100, "min_samples": 20}],
            gates=[
                {
                    "name": "errors",
                    "metric": "error_rate",
                    "max_increase": 0.05,
                    "min_samples": 8,
                    "window": "30s",
                }
            ],
        )
        started = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=body))
        assert started.state.phase == SHADOW and started.state.shadow_sample == 1.0
        async with traffic(sidecar.address) as seen:
            # what users got while the collector still said SHADOW (the sidecar follows it, so
            # it cannot have been further along)
            shadow_served: dict[str, int] = {}
            deadline = time.monotonic() + 60
            while (
                status := await admin.GetRollout(admin_pb2.GetRolloutRequest(agent=AGENT))
            ).state.phase == SHADOW:
                shadow_served = dict(seen)
                assert time.monotonic() < deadline, status.state.reason
                await asyncio.sleep(0.1)
            assert status.state.phase == RUNNING, status.state.reason
            assert "shadow phase passed" in status.state.reason
            done = await until_phase(admin, PROMOTED, ROLLED_BACK)
        assert done.state.phase == PROMOTED, done.state.reason
    assert [s.phase for s in done.timeline][:3] == [SHADOW, RUNNING, PROMOTED]
    summary = done.shadow
    assert summary.pairs >= 30 and summary.tool_agreement == 1.0 and summary.similarity_p50 > 0.9
    assert shadow_served and all(k.startswith("ROLE_STABLE:") for k in shadow_served), shadow_served


async def test_shadow_candidate_with_other_tools_is_stopped_in_shadow(
    broker: EmbeddedBroker, sim: SimProvider
) -> None:
    async with (
        Sidecar(shadow_sidecar(sim, broker, stable="sim-good", candidate="sim-divergent")) as sidecar,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        ids = sidecar.config.version_ids()
        await versions_reported(broker, collector, *ids.values(), send=False)
        body = spec(
            sidecar,
            look_interval="200ms",
            shadow=SHADOW_PHASE,
            steps=[{"weight": 50, "min_samples": 20}],
        )
        await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=body))
        async with traffic(sidecar.address) as seen:
            done = await until_phase(admin, RUNNING, ROLLED_BACK, PROMOTED)
        served = dict(seen)
    assert done.state.phase == ROLLED_BACK, done.state.reason
    assert "tools" in done.state.reason and "shadow" in done.state.reason, done.state.reason
    assert done.shadow.pairs > 0 and done.shadow.tool_agreement < 0.9
    # the candidate answered only mirrored calls: every user answer came from v1
    assert served and set(served) == {f"ROLE_STABLE:{ids['v1']}"}, served
    stats = sim.stats
    assert stats["models"]["sim-divergent"]["requests"] > 0, stats


async def test_judge_scores_reach_the_canary_quality_gate(
    broker: EmbeddedBroker, sim: SimProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    monkeypatch.setenv("TEST_JUDGE_KEY", API_KEY)
    judge = {
        "base_url": sim.base_url,
        "model": "sim-judge",
        "api_key_env": "TEST_JUDGE_KEY",
        "pair_sample": 0.0,
        "evaluation_share": 1.0,
        "max_calls_per_minute": 6000,
    }
    config = shadow_sidecar(
        sim, broker, stable="sim-fast", candidate="sim-divergent", shadow={"judge": judge, "queue_size": 256}
    )
    async with (
        Sidecar(config) as sidecar,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        ids = sidecar.config.version_ids()
        await versions_reported(broker, collector, *ids.values(), send=False)
        body = spec(
            sidecar,
            look_interval="200ms",
            steps=[{"weight": 50, "min_samples": 100000}],
            gates=[
                {
                    "name": "quality",
                    "metric": "judge_score",
                    "max_decrease": 0.1,
                    "min_samples": 10,
                    "window": "30s",
                }
            ],
        )
        await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=body))
        async with traffic(sidecar.address):
            done = await until_phase(admin, ROLLED_BACK, PROMOTED)
    assert done.state.phase == ROLLED_BACK and "gate quality found harm" in done.state.reason, (
        done.state.reason
    )
    quality = next(g for g in done.state.gate_results if g.name == "quality")
    # the scripted judge: 0.8 for sim-fast's text, 0.3 for sim-divergent's, 0.5 for a tool call
    # (no model named in it); half the answers are each
    assert 0.5 < quality.baseline_value < 0.8 and 0.3 < quality.candidate_value < 0.5, quality
    assert quality.baseline_value - quality.candidate_value > 0.1, quality
    by_version = {m.version_id: m for m in done.metrics}
    assert by_version[ids["v2"]].judge_scores > 0
