"""Per-tenant canaries and risk tiers end to end: a real sidecar and collector on the embedded
broker, the simulated provider answering, agents of three kinds of tenant driving sessions over
gRPC, and the rollout started and read through the real CLI (click's runner, in a thread).

- at a 1 % first step, every session of the opt-in tenant gets the candidate, no session of
  the excluded tenant does, and the rest follow the weight; `outrider rollout status` shows
  the groups apart and says the rollout is a scaled demo; the gates' evidence holds only the
  split sessions;
- a spec of each risk tier with no steps is accepted by the collector's StartRollout and
  starts the tier's plan (the shadow phase for medium and above).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yaml
from click.testing import CliRunner, Result

from collector import Collector
from collector._evidence import REQ
from collector._risk import RISK_TIERS
from devstack.broker import EmbeddedBroker
from devstack.cli import main
from devstack.simprovider import ModelBehavior, SimProvider
from outrider.v1 import admin_pb2, common_pb2, control_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from tests.integration.test_collector_service import admin_client, settings_for, versions_reported
from tests.integration.test_shadow_rollouts import shadow_sidecar
from tests.integration.test_sidecar_api import API_KEY
from tests.support import ADMIN_TOKEN

pytestmark = pytest.mark.broker

AGENT = "support-bot"
RISK_AGENT = "risk-bot"
OPT_IN, EXCLUDED = "acme", "initech"
RUNNING, SHADOW = control_pb2.ROLLOUT_PHASE_RUNNING, control_pb2.ROLLOUT_PHASE_SHADOW


@pytest.fixture(autouse=True)
def _operator_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTRIDER_ADMIN_TOKEN", ADMIN_TOKEN)


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider({"sim-good": ModelBehavior(latency_ms=2)}, api_key=API_KEY, seed=3) as provider:
        yield provider


async def cli(*args: str) -> Result:
    """`outrider ARGS` in a worker thread, so the collector's loop keeps serving meanwhile."""
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), catch_exceptions=False)


async def tenant_agent(
    address: str, tenant: str | None, stop: asyncio.Event, served: dict[str, list[str]]
) -> None:
    """Sessions of `tenant` (None: a new tenant each time, the split) with one chat each;
    `served[kind]` gets "ROLE:version" of every answered chat."""
    kind = tenant or "split"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        n = 0
        while not stop.is_set():
            n += 1
            opened = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(tenant_id=tenant or f"t-{n}"))
            messages = [common_pb2.ChatMessage(role="user", content=f"where is order {n}?")]
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Chat(
                    sidecar_pb2.ChatRequest(session_id=opened.session_id, messages=messages)
                )
                served[kind].append(f"{common_pb2.Role.Name(opened.role)}:{reply.version_id}")


async def test_tenant_canary_opt_in_gets_the_candidate_excluded_never_status_shows_groups(
    broker: EmbeddedBroker, sim: SimProvider, tmp_path: Path
) -> None:
    async with (
        Sidecar(shadow_sidecar(sim, broker, stable="sim-good", candidate="sim-good")) as sidecar,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        ids = sidecar.config.version_ids()
        stable, candidate = ids["v1"], ids["v2"]
        await versions_reported(broker, collector, stable, candidate, send=False)
        path = tmp_path / "tenants.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "agent": AGENT,
                    "stable": stable,
                    "candidate": candidate,
                    "sticky_by": "tenant",
                    "time_scale": 0.01,  # 2 h shows as 72 s: the rollout stays at its 1 % step
                    "look_interval": "200ms",
                    "opt_in_tenants": [OPT_IN],
                    "exclude_tenants": [EXCLUDED],
                    "steps": [{"weight": 1, "min_duration": "2h"}, {"weight": 50, "min_duration": "2h"}],
                    "gates": [
                        {"name": "errors", "metric": "error_rate", "max_increase": 0.05, "window": "30s"}
                    ],
                }
            ),
            encoding="utf-8",
        )
        admin_flag = ["--admin", collector.admin_address]
        started = await cli("rollout", "start", str(path), *admin_flag)
        assert started.exit_code == 0, started.output
        status = await admin.GetRollout(admin_pb2.GetRolloutRequest(agent=AGENT))
        assert list(status.state.opt_in_tenants) == [OPT_IN] and status.state.time_scale == pytest.approx(
            0.01
        )
        # the sidecar follows the state from outrider.control
        deadline = time.monotonic() + 60  # a loaded CI machine
        while sidecar.router.generation < status.state.generation:
            assert time.monotonic() < deadline, "the sidecar never took the rollout state"
            await asyncio.sleep(0.05)

        stop = asyncio.Event()
        served: dict[str, list[str]] = {OPT_IN: [], EXCLUDED: [], "split": []}
        kinds = (OPT_IN, EXCLUDED, None, None)
        tasks = [asyncio.create_task(tenant_agent(sidecar.address, k, stop, served)) for k in kinds]
        deadline = time.monotonic() + 60  # a loaded CI machine
        while min(len(v) for v in served.values()) < 40:
            assert time.monotonic() < deadline, {k: len(v) for k, v in served.items()}
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)
        total = sum(len(v) for v in served.values())

        # the collector counted every chat into its group (events carry the cohort)
        deadline = time.monotonic() + 60  # a loaded CI machine
        while True:
            status = await admin.GetRollout(admin_pb2.GetRolloutRequest(agent=AGENT))
            if sum(g.requests for g in status.groups) >= total:
                break
            assert time.monotonic() < deadline, list(status.groups)
            await asyncio.sleep(0.1)
        text = await cli("rollout", "status", AGENT, *admin_flag)
        # the evidence, read while nothing more arrives: only the split's sessions
        evidence = collector.rollouts.evidence.get(AGENT)
        assert evidence is not None
        evidence_n = (evidence.arm_sums(REQ, 0).n, evidence.arm_sums(REQ, 1).n)

    assert set(served[OPT_IN]) == {f"ROLE_CANARY:{candidate}"}, served[OPT_IN]
    assert set(served[EXCLUDED]) == {f"ROLE_STABLE:{stable}"}, served[EXCLUDED]
    split_candidate = served["split"].count(f"ROLE_CANARY:{candidate}")
    split_stable = served["split"].count(f"ROLE_STABLE:{stable}")
    assert split_candidate + split_stable == len(served["split"])
    assert split_candidate <= max(3, 0.1 * len(served["split"]))  # 1 % of new tenants
    assert status.state.phase == RUNNING and status.state.step_index == 0, status.state.reason
    groups = {(g.cohort, g.version_id): g.requests for g in status.groups}
    expected = {
        ("opt_in", candidate): len(served[OPT_IN]),
        ("excluded", stable): len(served[EXCLUDED]),
        ("split", stable): split_stable,
    }
    if split_candidate:
        expected[("split", candidate)] = split_candidate
    assert groups == expected
    assert evidence_n == (split_stable, split_candidate)  # opt-in and excluded are no evidence
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0] == "*** time_scale 0.01: a scaled demo, durations are 1/100 of the plan ***"
    assert any(
        line.startswith(f"group       opt-in    candidate {candidate}  {len(served[OPT_IN])} requests")
        for line in lines
    ), text.output
    assert any(
        line.startswith(f"group       excluded  stable    {stable}  {len(served[EXCLUDED])} requests")
        for line in lines
    ), text.output
    assert any(
        line.startswith(f"group       split     stable    {stable}  {split_stable} requests")
        for line in lines
    ), text.output


async def test_risk_tier_specs_without_steps_start_on_a_real_collector(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """`outrider rollout start` of `risk: TIER` and no steps, for every tier: the collector
    accepts it and publishes the tier's first stage; `outrider rollout abort` ends each."""
    stable, candidate = "1a2b3c4d5e6f", "9f8e7d6c5b4a"
    async with Collector(settings_for(broker)) as collector, admin_client(collector) as admin:
        await versions_reported(broker, collector, stable, candidate, agent=RISK_AGENT)
        admin_flag = ["--admin", collector.admin_address]
        for tier in RISK_TIERS:
            path = tmp_path / f"{tier}.yaml"
            path.write_text(
                f"agent: {RISK_AGENT}\nstable: {stable}\ncandidate: {candidate}\nrisk: {tier}\n",
                encoding="utf-8",
            )
            started = await cli("rollout", "start", str(path), *admin_flag)
            assert started.exit_code == 0, (tier, started.output)
            state = (await admin.GetRollout(admin_pb2.GetRolloutRequest(agent=RISK_AGENT))).state
            assert state.step_count == (3 if tier == "low" else 5), tier
            if tier == "low":
                assert (state.phase, state.candidate_weight) == (RUNNING, pytest.approx(0.01))
            else:
                assert (state.phase, state.shadow_sample) == (SHADOW, pytest.approx(0.1)), tier
            assert state.time_scale == 1.0
            aborted = await cli("rollout", "abort", RISK_AGENT, *admin_flag)
            assert aborted.exit_code == 0, (tier, aborted.output)
