"""Blue-green rollouts end to end: a real sidecar (running the smoke tests) and a real collector
on the embedded broker, the simulated provider answering blue (v1) and green (v2), agents
driving sessions over gRPC, and the CLI's `rollout switch-back` against the collector's admin API.

- green's model never calls the tool a smoke test expects: rolled back in SMOKE_TEST, naming the
  test, and no user ever got green; then a blue-green whose smoke tests pass is switched back
  from the CLI (and a second switch-back is refused naming the phase);
- green passes its smoke tests, takes every new session, then fails: the error-rate trigger
  switches back to blue while blue is warm.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from collector import Collector
from devstack.broker import EmbeddedBroker
from devstack.cli import main
from devstack.simprovider import ModelBehavior, SimProvider
from outrider.v1 import admin_pb2, control_pb2
from sidecar import Sidecar
from tests.integration.test_collector_service import admin_client, settings_for, versions_reported
from tests.integration.test_shadow_rollouts import AGENT, shadow_sidecar, traffic, until_phase
from tests.integration.test_sidecar_api import API_KEY
from tests.support import ADMIN_TOKEN

pytestmark = pytest.mark.broker

SMOKE_TEST = control_pb2.ROLLOUT_PHASE_SMOKE_TEST
SWITCHED = control_pb2.ROLLOUT_PHASE_SWITCHED
PROMOTED, ROLLED_BACK = control_pb2.ROLLOUT_PHASE_PROMOTED, control_pb2.ROLLOUT_PHASE_ROLLED_BACK
TOOL_TEST = {
    "name": "order-lookup",
    "prompt": '/tool lookup_order {"order_id": "7"}',
    "expect_tools": ["lookup_order"],
}
TEXT_TEST = {"name": "greeting", "prompt": "hello there", "expect_content": ".", "max_latency": "5s"}


@pytest.fixture(autouse=True)
def _operator_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTRIDER_ADMIN_TOKEN", ADMIN_TOKEN)


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    models = {
        "sim-fast": ModelBehavior(latency_ms=2),
        "sim-green": ModelBehavior(latency_ms=2),
        "sim-divergent": ModelBehavior(latency_ms=2, tool_rename={"lookup_order": "search_orders"}),
    }
    async with SimProvider(models, api_key=API_KEY, seed=7) as provider:
        yield provider


def bg_spec(sidecar: Sidecar, tests: list[dict[str, Any]], **fields: Any) -> str:
    ids = sidecar.config.version_ids()
    body = {
        "agent": AGENT,
        "stable": ids["v1"],
        "candidate": ids["v2"],
        "strategy": "blue_green",
        "look_interval": "200ms",
        "drain_timeout": "1s",
        "blue_green": {"smoke_tests": tests, "smoke_timeout": "20s", "keep_warm": "10m"},
        **fields,
    }
    return yaml.safe_dump(body)


async def cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), catch_exceptions=False)


async def test_blue_green_failing_smoke_tests_roll_back_and_cli_switch_back(
    broker: EmbeddedBroker, sim: SimProvider
) -> None:
    async with (
        Sidecar(shadow_sidecar(sim, broker, stable="sim-fast", candidate="sim-divergent")) as sidecar,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        ids = sidecar.config.version_ids()
        await versions_reported(broker, collector, *ids.values(), send=False)
        body = bg_spec(sidecar, [TEXT_TEST, TOOL_TEST])
        started = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=body))
        assert started.state.phase == SMOKE_TEST and started.state.candidate_weight == 0.0
        async with traffic(sidecar.address, workers=2) as seen:
            done = await until_phase(admin, SWITCHED, ROLLED_BACK, within=30)
            served = dict(seen)
        assert done.state.phase == ROLLED_BACK, done.state.reason
        assert "smoke test 'order-lookup' failed" in done.state.reason, done.state.reason
        assert "expected tool lookup_order, got search_orders" in done.state.reason
        assert served and set(served) == {f"ROLE_STABLE:{ids['v1']}"}, served  # green served no user
        smoke = {r.name: r.verdict for r in done.state.gate_results if r.kind == "smoke"}
        assert smoke == {"greeting": "no_harm", "order-lookup": "harm"}, smoke
        assert sidecar.smoke is not None and sidecar.smoke.runs == 1

        # the same green without the tool test passes: switched, then switched back from the CLI
        await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=bg_spec(sidecar, [TEXT_TEST])))
        switched = await until_phase(admin, SWITCHED, ROLLED_BACK, within=30)
        assert switched.state.phase == SWITCHED, switched.state.reason
        addr = ["--admin", collector.admin_address]
        back = await cli("rollout", "switch-back", AGENT, "--reason", "ticket 7", *addr)
        assert back.exit_code == 0, back.output
        assert "rolled back" in back.output and "ticket 7" in back.output, back.output
        status = await admin.GetRollout(admin_pb2.GetRolloutRequest(agent=AGENT))
        assert status.state.phase == ROLLED_BACK and status.state.decided_by == "token:ci"
        assert [e.version_id for e in status.state.retired][:1] == [ids["v2"]]
        again = await cli("rollout", "switch-back", AGENT, *addr)
        assert again.exit_code != 0 and "ROLLOUT_PHASE_ROLLED_BACK" in again.output, again.output


async def test_blue_green_switches_then_switches_back_on_a_trigger(
    broker: EmbeddedBroker, sim: SimProvider
) -> None:
    async with (
        Sidecar(shadow_sidecar(sim, broker, stable="sim-fast", candidate="sim-green")) as sidecar,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        ids = sidecar.config.version_ids()
        await versions_reported(broker, collector, *ids.values(), send=False)
        triggers = {"error_rate": {"limit": 0.05, "min_samples": 20, "window": "30s"}}
        body = bg_spec(sidecar, [TOOL_TEST, TEXT_TEST], triggers=triggers)
        await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=body))
        async with traffic(sidecar.address, workers=2) as seen:
            switched = await until_phase(admin, SWITCHED, ROLLED_BACK, within=30)
            assert switched.state.phase == SWITCHED, switched.state.reason
            assert "passed all 2 smoke tests" in switched.state.reason
            green = f"ROLE_CANARY:{ids['v2']}"
            for _ in range(100):  # every new session goes to green now
                if seen.get(green, 0) >= 5:
                    break
                await asyncio.sleep(0.1)
            assert seen.get(green, 0) >= 5, seen
            sim.set_model("sim-green", ModelBehavior(error_rate=1.0))  # green breaks while blue is warm
            # the trigger needs 20 samples in its window and enough failures to clear 5%, then a
            # look: on a loaded machine (a full CI run) that has taken more than 30 s
            done = await until_phase(admin, PROMOTED, ROLLED_BACK, within=90)
            await asyncio.sleep(0.5)  # sessions opened before the switch-back reached the sidecar end
            seen.clear()
            await asyncio.sleep(1.0)
            after = dict(seen)
        assert done.state.phase == ROLLED_BACK, done.state.reason
        assert done.state.reason.startswith("switched back: trigger:error_rate"), done.state.reason
        assert [s.phase for s in done.timeline] == [SMOKE_TEST, SWITCHED, ROLLED_BACK]
        # after the switch-back new sessions are blue's again
        assert after and set(after) == {f"ROLE_STABLE:{ids['v1']}"}, after
