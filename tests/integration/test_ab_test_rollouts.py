"""A/B tests end to end: a real sidecar and a real collector on the embedded broker, the
simulated provider answering both versions, and agents driving sessions over gRPC: open a
session (a new user each), one chat turn, then the user's task feedback. The agents' users
succeed more often with one model than the other (the driver sends FEEDBACK_KIND_TASK_SUCCESS
or _FAILURE per session by the model that served it), so the primary metric differs by variant.

One stack, two tests in turn (compressed: looks every 200 ms, effects of 20+ points):

1. sequential, B's model far better: the controller stops early with winner B and promotes it
   (the router's PROMOTED path then serves B to every new session);
2. fixed horizon, the two equal: at the planned sample, no winner; the control stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import yaml

from collector import Collector
from devstack.broker import EmbeddedBroker
from devstack.simprovider import SimProvider
from outrider.v1 import admin_pb2, common_pb2, control_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from tests.integration.test_collector_service import admin_client, settings_for, versions_reported
from tests.integration.test_shadow_rollouts import AGENT, shadow_sidecar, sim, until_phase

pytestmark = pytest.mark.broker
__all__ = ["sim"]  # the simulated provider's fixture

RUNNING = control_pb2.ROLLOUT_PHASE_RUNNING
PROMOTED, ABORTED = control_pb2.ROLLOUT_PHASE_PROMOTED, control_pb2.ROLLOUT_PHASE_ABORTED
ROLLED_BACK = control_pb2.ROLLOUT_PHASE_ROLLED_BACK
SUCCESS, FAILURE = sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS, sidecar_pb2.FEEDBACK_KIND_TASK_FAILURE


async def agent(
    address: str, worker: int, stop: asyncio.Event, success: dict[str, float], seen: dict[str, int]
) -> None:
    """New users until `stop`: a session, a chat turn, the task feedback by the version served.

    The k-th user a version serves succeeds when floor((k + 1) * rate) > floor(k * rate): each
    version's success rate is its `rate` to within 1/k, so equal rates never differ by chance
    (the "no winner" test cannot be a false positive) and the better one is better throughout.
    """
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        n = 0
        while not stop.is_set():
            n += 1
            with contextlib.suppress(grpc.aio.AioRpcError):
                opened = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id=f"w{worker}-u{n}"))
                messages = [common_pb2.ChatMessage(role="user", content=f"where is order {n}?")]
                reply = await stub.Chat(
                    sidecar_pb2.ChatRequest(session_id=opened.session_id, messages=messages)
                )
                k = seen.get(reply.version_id, 0)
                seen[reply.version_id] = k + 1
                rate = success[reply.version_id]
                kind = SUCCESS if math.floor((k + 1) * rate) > math.floor(k * rate) else FAILURE
                await stub.Feedback(sidecar_pb2.FeedbackRequest(session_id=opened.session_id, kind=kind))
                key = f"{common_pb2.Role.Name(opened.role)}:{reply.version_id}"
                seen[key] = seen.get(key, 0) + 1


@contextlib.asynccontextmanager
async def users(address: str, success: dict[str, float], workers: int = 4) -> AsyncIterator[dict[str, int]]:
    stop, seen = asyncio.Event(), {}
    tasks = [asyncio.create_task(agent(address, w, stop, success, seen)) for w in range(workers)]
    try:
        yield seen
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def ab_body(control: str, other: str, **ab: Any) -> str:
    return yaml.safe_dump(
        {
            "agent": AGENT,
            "strategy": "ab_test",
            "look_interval": "200ms",
            "alpha": 0.01,
            "ab": {
                "variants": [
                    {"name": "A", "version": control, "weight": 50},
                    {"name": "B", "version": other, "weight": 50},
                ],
                "primary": {"metric": "task_success", "min_detectable_effect": 0.25, "baseline": 0.6},
                **ab,
            },
            "gates": [
                {
                    "name": "errors",
                    "metric": "error_rate",
                    "max_increase": 0.05,
                    "min_samples": 8,
                    "window": "30s",
                }
            ],
        }
    )


async def test_ab_test_finds_the_better_variant_then_none(broker: EmbeddedBroker, sim: SimProvider) -> None:
    async with (
        Sidecar(shadow_sidecar(sim, broker, stable="sim-good", candidate="sim-fast")) as sidecar,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        ids = sidecar.config.version_ids()
        v1, v2 = ids["v1"], ids["v2"]
        await versions_reported(broker, collector, v1, v2, send=False)

        # 1. B (v2) is far better: the sequential test stops with winner B and promotes it
        started = await admin.StartRollout(
            admin_pb2.StartRolloutRequest(spec_yaml=ab_body(v1, v2, analysis="sequential"))
        )
        assert (
            started.state.phase == RUNNING and started.state.strategy == control_pb2.ROLLOUT_STRATEGY_AB_TEST
        )
        async with users(sidecar.address, {v1: 0.55, v2: 0.95}) as seen:
            done = await until_phase(admin, PROMOTED, ABORTED, ROLLED_BACK)
            served = dict(seen)
        assert done.state.phase == PROMOTED, done.state.reason
        assert done.state.candidate_version_id == v2 and done.state.ab.winner == "B", done.state.ab
        assert "winner B promoted" in done.state.reason
        # while it ran, A's users got v1 as stable and B's v2 as a variant; after it, v2 as stable
        roles = {key for key in served if ":" in key} - {f"ROLE_STABLE:{v2}"}
        assert roles == {f"ROLE_STABLE:{v1}", f"ROLE_VARIANT:{v2}"}, served
        (cmp,) = done.state.ab.comparisons
        assert cmp.significant and cmp.effect < 0 and cmp.upper < 0  # A - B: B better
        assert {m.version_id: m.role for m in done.metrics} == {
            v1: common_pb2.ROLE_STABLE,
            v2: common_pb2.ROLE_VARIANT,
        }
        record = await admin.GetDeployment(admin_pb2.GetDeploymentRequest(rollout_id=done.state.rollout_id))
        assert record.ab.winner == "B" and record.outcome == PROMOTED

        # 2. the promoted v2 is the control; v1 now does as well: no winner at the fixed horizon
        await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=ab_body(v2, v1, analysis="fixed")))
        async with users(sidecar.address, {v1: 0.8, v2: 0.8}):
            ended = await until_phase(admin, PROMOTED, ABORTED, ROLLED_BACK)
        assert ended.state.phase == ABORTED, ended.state.reason
        assert ended.state.ab.verdict == "no_winner" and "the control stays" in ended.state.reason
        assert min(v.samples for v in ended.state.ab.variants) >= ended.state.ab.planned_units
        # the control keeps every new session
        deadline = time.monotonic() + 10
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            while True:
                opened = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id="after"))
                if opened.version_id == v2 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        assert opened.version_id == v2
