"""A feature flag end to end: a real sidecar and a real collector on the embedded broker, the
simulated provider answering, agents over gRPC, and the `outrider flag` CLI (click's runner, in
a thread) against the collector's admin API.

The flag gates the `lookup_order` tool, off by default. Before it is set, no session can call the
tool (FAILED_PRECONDITION naming the flag), Chat does not offer it to the model and GetVersion
says it is off; `outrider flag set
--share 10% --sticky-by tenant` turns it on mid-run, the sidecar applies the signed record
without a restart, and then ~10 % of tenants have it (the same tenants in every session, the
ones the sticky hash picks); every event carries the flags, so `outrider flag list` shows the
on arm against the off arm. `outrider flag clear` puts the default back, and a restarted
collector reads the flag's state back from the compacted control topic.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from collector import Collector
from devstack.broker import EmbeddedBroker
from devstack.cli import main
from devstack.simprovider import ModelBehavior, SimProvider
from outrider import FLAG_OFF
from outrider.v1 import admin_pb2, common_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from sidecar.routing._router import sticky_fraction
from tests.integration.test_collector_service import admin_client, settings_for
from tests.integration.test_drain import error_info
from tests.integration.test_sidecar_api import API_KEY, sidecar_config
from tests.support import ADMIN_TOKEN, VIEWER_TOKEN

pytestmark = pytest.mark.broker

AGENT = "support-bot"
FLAG = "order-lookup"
TENANTS_BEFORE, TENANTS_AFTER = 40, 200


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    behaviors = {"sim-good": ModelBehavior(latency_ms=1), "sim-bad": ModelBehavior(latency_ms=1)}
    async with SimProvider(behaviors, api_key=API_KEY, seed=3) as provider:
        yield provider


def flagged_sidecar(sim: SimProvider, broker: EmbeddedBroker) -> Any:
    config = sidecar_config(sim, kafka=broker.bootstrap_servers)
    data = config.model_dump(mode="json")
    data["telemetry"] = {"spill_dir": None}
    for version in data["versions"].values():  # the flagged tool alone: off, no tool is offered
        version["tools"] = [t for t in version["tools"] if t["name"] == "lookup_order"]
    data["flags"] = [
        {"name": FLAG, "kind": "tool", "target": "lookup_order", "default": {"share": 0}},
        {"name": "concise", "kind": "prompt", "prompt": "Be brief.", "default": {"tenants": ["acme"]}},
    ]
    return type(config).model_validate(data).load_secrets({"TEST_SIM_KEY": API_KEY})


async def cli(*args: str, token: str = ADMIN_TOKEN) -> Result:
    """`outrider ARGS` in a worker thread, so the loop keeps serving the collector and sidecar."""
    runner = CliRunner(env={"OUTRIDER_ADMIN_TOKEN": token})
    return await asyncio.to_thread(runner.invoke, main, list(args), catch_exceptions=False)


async def session_of(stub: sidecar_pb2_grpc.SidecarStub, tenant: str) -> tuple[bool, bool]:
    """One session of `tenant`: a chat turn and a tool call; (GetVersion says on, the tool ran)."""
    opened = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id=f"u-{tenant}", tenant_id=tenant))
    info = await stub.GetVersion(sidecar_pb2.GetVersionRequest(session_id=opened.session_id))
    flags = {f.name: f for f in info.flags}
    assert (
        set(flags) == {FLAG, "concise"}
        and flags[FLAG].kind == "tool"
        and flags[FLAG].target == "lookup_order"
    )
    # the simulator calls a tool it is asked to only when the request offers tools
    messages = [common_pb2.ChatMessage(role="user", content='/tool lookup_order {"order_id": "7"}')]
    reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=opened.session_id, messages=messages))
    offered = [call.name for call in reply.message.tool_calls] == ["lookup_order"]
    assert offered == flags[FLAG].on, (tenant, reply.finish_reason, flags[FLAG].on)
    request = sidecar_pb2.CallToolRequest(
        session_id=opened.session_id, tool_name="lookup_order", arguments_json='{"order_id": "7"}'
    )
    try:
        await stub.CallTool(request)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
        assert f"feature flag {FLAG!r}" in (exc.details() or ""), exc.details()
        info_ = error_info(exc)
        assert info_.reason == FLAG_OFF and info_.metadata["flag"] == FLAG
        ran = False
    else:
        ran = True
    assert ran == flags[FLAG].on, (tenant, ran, flags[FLAG].on)  # GetVersion tells what CallTool does
    return flags[FLAG].on, ran


async def sessions(stub: sidecar_pb2_grpc.SidecarStub, tenants: list[str]) -> dict[str, bool]:
    results: dict[str, bool] = {}
    for chunk in range(0, len(tenants), 20):
        batch = tenants[chunk : chunk + 20]
        answers = await asyncio.gather(*(session_of(stub, t) for t in batch))
        results.update({t: ran for t, (_, ran) in zip(batch, answers, strict=True)})
    return results


async def flag_list(admin: str) -> dict[str, Any]:
    result = await cli("flag", "list", AGENT, "--admin", admin, "--json", token=VIEWER_TOKEN)
    assert result.exit_code == 0, result.output
    return {f["state"]["name"]: f for f in json.loads(result.output)["flags"]}


async def test_feature_flag_turned_on_mid_run_for_ten_percent_of_tenants(
    broker: EmbeddedBroker, sim: SimProvider
) -> None:
    async with (
        Sidecar(flagged_sidecar(sim, broker)) as sidecar,
        Collector(settings_for(broker)) as collector,
        grpc.aio.insecure_channel(sidecar.address) as channel,
    ):
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        admin = collector.admin_address
        tenants = [f"tenant-{i:03d}" for i in range(TENANTS_AFTER)]
        before = await sessions(stub, tenants[:TENANTS_BEFORE])
        assert not any(before.values()), "the tool ran before the flag was set"

        # a viewer may list but not set; an operator sets it at run time
        refused = await cli(
            "flag", "set", AGENT, FLAG, "--share", "10%", "--admin", admin, token=VIEWER_TOKEN
        )
        assert refused.exit_code != 0 and "PERMISSION_DENIED" in refused.output, refused.output
        result = await cli(
            "flag", "set", AGENT, FLAG, "--share", "10%", "--sticky-by", "tenant",
            "--reason", "beta for a tenth of tenants", "--admin", admin,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "10% of tenants" in result.output and "generation 1, by token:ci" in result.output, (
            result.output
        )
        deadline = time.monotonic() + 20
        while (state := sidecar.flags.state(FLAG)) is None:  # the signed record reaches the sidecar
            assert time.monotonic() < deadline, "the sidecar never applied the flag"
            await asyncio.sleep(0.05)
        assert state.share == pytest.approx(0.1) and state.generation == 1 and state.set_by == "token:ci"

        after = await sessions(stub, tenants)
        again = await sessions(stub, tenants[:60])  # new sessions, same tenants: sticky
        assert all(again[t] == after[t] for t in again)
        on = sorted(t for t, ran in after.items() if ran)
        expected = sorted(t for t in tenants if sticky_fraction(f"flag/{FLAG}", "t:" + t) < 0.1)
        assert on == expected, (on, expected)
        assert 0.06 <= len(on) / len(tenants) <= 0.14, len(on)

        # every event carries the session's flags: the collector splits them on against off
        on_again = sum(1 for t in again if again[t])
        deadline = time.monotonic() + 20
        while True:
            listed = await flag_list(admin)
            arms = {arm["on"]: arm for arm in listed[FLAG]["arms"]}
            # a session's chat and its tool call are two events: wait for both of the last one
            on_sessions = len(on) + on_again
            if int(arms[True]["sessions"]) >= on_sessions and int(arms[True]["requests"]) >= 2 * on_sessions:
                break
            assert time.monotonic() < deadline, listed
            await asyncio.sleep(0.2)
        assert int(arms[True]["sessions"]) == len(on) + on_again
        # each on session made a chat and a tool call; off sessions only the chat
        assert int(arms[True]["requests"]) == 2 * (len(on) + on_again)
        assert int(arms[False]["sessions"]) >= (len(tenants) - len(on)) + (len(again) - on_again)
        assert int(arms[True]["errors"]) == 0 and float(arms[True]["latency_p95_ms"]) > 0
        assert listed[FLAG]["state"]["share"] == pytest.approx(0.1)
        assert "concise" in listed  # seen in the events, never set: the config default
        text = await cli("flag", "list", AGENT, "--admin", admin)
        assert f"{FLAG}: 10% of tenants" in text.output and "concise: config default" in text.output, (
            text.output
        )

        cleared = await cli("flag", "clear", AGENT, FLAG, "--reason", "done", "--admin", admin)
        assert cleared.exit_code == 0 and "config default (cleared)" in cleared.output, cleared.output
        deadline = time.monotonic() + 20
        while not (sidecar.flags.state(FLAG) or state).cleared:
            assert time.monotonic() < deadline, "the sidecar never applied the clear"
            await asyncio.sleep(0.05)
        assert not any((await sessions(stub, on)).values())  # back to the default: off for all

    # the flag's record is on the compacted control topic: a restarted collector carries on from
    # it (in a group of its own, so it need not wait for the old member to time out)
    async with (
        Collector(settings_for(broker, group_id="outrider-collector-restarted")) as restarted,
        admin_client(restarted) as stub_admin,
    ):
        listed_again = await stub_admin.ListFlags(admin_pb2.ListFlagsRequest(agent=AGENT))
        states = {f.state.name: f.state for f in listed_again.flags}
        assert (states[FLAG].generation, states[FLAG].cleared) == (2, True), listed_again
        request = admin_pb2.SetFlagRequest(
            agent=AGENT, name=FLAG, share=0.5, sticky_by=common_pb2.STICKY_BY_USER
        )
        assert (await stub_admin.SetFlag(request)).state.generation == 3
