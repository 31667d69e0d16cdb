"""End to end: a bad candidate is rolled back by the controller on its own.

Real at every joint: a gRPC agent client -> the sidecar process -> the simulated provider
over HTTP; events through the embedded broker to the collector process; the rollback
decision back through `outrider.control` to the sidecar, which moves new sessions to stable.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml

from devstack.broker import EmbeddedBroker, free_port
from devstack.simprovider import ModelBehavior, SimProvider
from outrider.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    control_pb2,
    sidecar_pb2,
    sidecar_pb2_grpc,
)
from sidecar import load_config
from tests.support import (
    SECURE_COLLECTOR,
    TEST_PUBLIC_KEY_FILE,
    admin_channel,
    outrider_process,
    report_versions,
    scrape,
    wait_serving,
)

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

AGENT = "support-bot"
CONCURRENCY = 8


def _write_configs(tmp_path: Path, provider: SimProvider, kafka: str) -> tuple[Path, Path]:
    def version(model: str) -> dict[str, object]:
        return {
            "provider": {"name": "openai", "base_url": provider.base_url},
            "model": model,
            "system_prompt": "You are a support agent.",
            "parameters": {"temperature": 0.2, "max_tokens": 64},
            "request_timeout": "5s",
            "tools": [
                {
                    "name": "lookup_order",
                    "endpoint": provider.tool_url("lookup_order"),
                    "timeout": "2s",
                    "side_effects": "read",
                    "idempotent": True,
                }
            ],
        }

    sidecar_yaml = tmp_path / "sidecar.yaml"
    sidecar_yaml.write_text(
        yaml.safe_dump(
            {
                "agent": AGENT,
                "stable": "v1",
                "listen": f"127.0.0.1:{free_port()}",
                "metrics_port": free_port(),
                "kafka": {"bootstrap_servers": kafka},
                "shutdown_grace": "5s",
                "telemetry": {"spill_dir": str(tmp_path / "spill")},  # never the cwd's
                "control": {"public_keys": [str(TEST_PUBLIC_KEY_FILE)]},
                "versions": {"v1": version("sim-good"), "v2": version("sim-bad")},
            }
        )
    )
    collector_yaml = tmp_path / "collector.yaml"
    collector_yaml.write_text(
        yaml.safe_dump(
            {
                "kafka_bootstrap": kafka,
                "admin_listen": f"127.0.0.1:{free_port()}",
                "metrics_port": free_port(),
                "tick_interval_s": 0.2,
                "bucket_s": 1.0,
                "state_dir": str(tmp_path / "collector-state"),
                **SECURE_COLLECTOR,
            }
        )
    )
    return sidecar_yaml, collector_yaml


def _spec(stable: str, candidate: str) -> str:
    return yaml.safe_dump(
        {
            "agent": AGENT,
            "stable": stable,
            "candidate": candidate,
            "sticky_by": "session",
            "look_interval": "1s",
            # one long first step: only a gate can end this rollout within the test
            "steps": [
                {"weight": 50, "min_duration": "10m", "min_samples": 100000},
                {"weight": 100, "min_duration": "10m", "min_samples": 100000},
            ],
            "gates": [
                {
                    "name": "errors",
                    "metric": "error_rate",
                    "max_increase": 0.05,
                    "window": "30s",
                    "min_samples": 20,
                    "on_failure": "rollback",
                }
            ],
        }
    )


async def _phase_applied(http: aiohttp.ClientSession, metrics_url: str) -> str | None:
    for name, labels, value in await scrape(http, metrics_url):
        if name == "outrider_sidecar_rollout_phase" and labels.get("agent") == AGENT and value == 1:
            return labels.get("phase", "").lower()
    return None


async def test_bad_candidate_is_rolled_back(tmp_path: Path) -> None:
    async with (
        EmbeddedBroker() as broker,
        SimProvider(
            {"sim-good": ModelBehavior(latency_ms=5), "sim-bad": ModelBehavior(latency_ms=5, error_rate=0.3)},
            seed=7,
        ) as provider,
    ):
        sidecar_yaml, collector_yaml = _write_configs(tmp_path, provider, broker.bootstrap_servers)
        config = load_config(sidecar_yaml)
        ids = config.version_ids()
        stable_id, candidate_id = ids["v1"], ids["v2"]
        collector_cfg = yaml.safe_load(collector_yaml.read_text())
        sidecar_addr = config.listen
        metrics_url = f"http://127.0.0.1:{config.metrics_port}/metrics"

        with (
            outrider_process(
                "collector", "--config", str(collector_yaml), log_path=tmp_path / "collector.log"
            ) as collector,
            outrider_process(
                "sidecar", "--config", str(sidecar_yaml), log_path=tmp_path / "sidecar.log"
            ) as sidecar,
        ):
            await wait_serving(collector_cfg["admin_listen"], collector)
            await wait_serving(sidecar_addr, sidecar)

            async with (
                admin_channel(collector_cfg["admin_listen"]) as admin_ch,
                grpc.aio.insecure_channel(sidecar_addr) as channel,
                aiohttp.ClientSession() as http,
            ):
                admin = admin_pb2_grpc.AdminStub(admin_ch)
                agent = sidecar_pb2_grpc.SidecarStub(channel)
                # the sidecar reports its versions at start; `rollout start` checks them
                await report_versions(
                    broker.bootstrap_servers,
                    config.agent,
                    stable_id,
                    candidate_id,
                    admin=collector_cfg["admin_listen"],
                    send=False,
                )
                started = await admin.StartRollout(
                    admin_pb2.StartRolloutRequest(
                        spec_yaml=_spec(stable_id, candidate_id), source_name="e2e.yaml", requested_by="e2e"
                    )
                )
                assert started.state.phase == control_pb2.ROLLOUT_PHASE_RUNNING

                # Wait until the sidecar applies the rollout, so candidate traffic flows.
                deadline = time.monotonic() + 20
                while await _phase_applied(http, metrics_url) != "running":
                    assert time.monotonic() < deadline, "sidecar never applied the running rollout"
                    await asyncio.sleep(0.05)

                first_candidate_failure: float | None = None
                first_candidate_call: float | None = None
                rolled_back_at: float | None = None
                canary_sessions: list[str] = []
                calls = {"stable": 0, "canary": 0, "canary_failed": 0}
                stop = asyncio.Event()

                async def agent_loop(worker: int) -> None:
                    nonlocal first_candidate_failure, first_candidate_call
                    rng = random.Random(worker)
                    while not stop.is_set():
                        opened = await agent.OpenSession(
                            sidecar_pb2.OpenSessionRequest(
                                agent=AGENT, user_id=f"user-{rng.randrange(10**9)}"
                            )
                        )
                        canary = opened.role == common_pb2.ROLE_CANARY
                        if canary:
                            canary_sessions.append(opened.session_id)
                            if first_candidate_call is None:
                                first_candidate_call = time.monotonic()
                        calls["canary" if canary else "stable"] += 1
                        request = sidecar_pb2.ChatRequest(
                            session_id=opened.session_id,
                            messages=[common_pb2.ChatMessage(role="user", content="Where is my order?")],
                        )
                        try:
                            reply = await agent.Chat(request, timeout=10)
                            assert reply.version_id == (candidate_id if canary else stable_id)
                        except grpc.aio.AioRpcError as exc:
                            assert canary, f"stable call failed: {exc.code()} {exc.details()}"
                            calls["canary_failed"] += 1
                            if first_candidate_failure is None:
                                first_candidate_failure = time.monotonic()

                async def watch_sidecar() -> None:
                    nonlocal rolled_back_at
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        if await _phase_applied(http, metrics_url) == "rolled_back":
                            rolled_back_at = time.monotonic()
                            break
                        await asyncio.sleep(0.02)
                    stop.set()

                await asyncio.gather(watch_sidecar(), *(agent_loop(w) for w in range(CONCURRENCY)))

                # retries and fallback hide most of the candidate's upstream failures from the agent,
                # but not from the reliability gate: the rollback may come before the agent sees one
                assert first_candidate_call is not None, f"no candidate call: {calls}"
                assert rolled_back_at is not None, f"sidecar never applied the rollback: {calls}"
                since_call = rolled_back_at - first_candidate_call
                since_failure = (
                    f"{rolled_back_at - first_candidate_failure:.2f} s"
                    if first_candidate_failure is not None
                    else "none seen"
                )
                print(
                    f"\ntime to rollback: {since_call:.2f} s from the first candidate call to the sidecar "
                    f"applying it (from the first failure the agent saw: {since_failure}) ({calls})"
                )

                status = await admin.GetRollout(admin_pb2.GetRolloutRequest(agent=AGENT))
                assert status.state.phase == control_pb2.ROLLOUT_PHASE_ROLLED_BACK
                assert status.state.decided_by == "controller"
                assert "errors" in status.state.reason
                assert status.state.generation > started.state.generation

                # New sessions land on stable; a session pinned to the candidate keeps its pin.
                for i in range(50):
                    opened = await agent.OpenSession(
                        sidecar_pb2.OpenSessionRequest(agent=AGENT, user_id=f"after-{i}")
                    )
                    assert (opened.role, opened.version_id) == (common_pb2.ROLE_STABLE, stable_id)
                pinned = await agent.GetVersion(sidecar_pb2.GetVersionRequest(session_id=canary_sessions[0]))
                assert pinned.version_id == candidate_id

            assert sidecar.stop() == 0, sidecar.output()
            assert collector.stop() == 0, collector.output()
