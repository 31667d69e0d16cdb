"""An empty broker swapped in under load, and a sidecar restarted while Kafka is down.

Real processes (collector, sidecars) on the embedded broker. The broker is replaced by an
empty one on the same port while a sidecar is under load and the collector lags behind
(SIGSTOP, so what the old broker held unread is lost with it):

- the collector notices (its incarnation marker is gone), re-creates its topics and
  republishes the rollout from its state copy;
- a sidecar started after the swap routes by the last decision;
- the collector goes on counting and deciding: the candidate starts failing after the swap
  and the gate rolls it back, in both sidecars;
- the gap counter shows what was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiokafka import AIOKafkaConsumer

import outrider
from collector import Collector
from devstack.broker import EmbeddedBroker, free_port
from devstack.simprovider import ModelBehavior, SimProvider
from outrider.v1 import admin_pb2, admin_pb2_grpc, control_pb2, sidecar_pb2, sidecar_pb2_grpc
from tests.integration.test_collector_service import settings_for, versions_reported
from tests.integration.test_collector_service import spec_yaml as collector_spec_yaml
from tests.integration.test_sidecar_api import API_KEY, USER, sidecar_config, sim_models
from tests.support import (
    SECURE_COLLECTOR,
    TEST_SIGNER,
    Proc,
    admin_channel,
    outrider_process,
    report_versions,
    scrape,
    wait_serving,
)

pytestmark = pytest.mark.broker

AGENT = "support-bot"


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=11) as provider:
        yield provider


def write_sidecar(
    tmp_path: Path, name: str, sim: SimProvider, kafka: str, **control: Any
) -> tuple[Path, str, str]:
    data = sidecar_config(sim, kafka=kafka, metrics_port=None).model_dump(mode="json")
    listen, metrics = f"127.0.0.1:{free_port()}", free_port()
    data.update(
        listen=listen,
        metrics_port=metrics,
        shutdown_grace="2s",
        telemetry={"spill_dir": str(tmp_path / name / "spill")},
        control={"public_keys": [TEST_SIGNER.public_text()], "ready_timeout": "15s", **control},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, listen, f"http://127.0.0.1:{metrics}/metrics"


def write_collector(tmp_path: Path, kafka: str) -> tuple[Path, str, str]:
    admin, metrics = f"127.0.0.1:{free_port()}", free_port()
    path = tmp_path / "collector.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kafka_bootstrap": kafka,
                "admin_listen": admin,
                "metrics_port": metrics,
                "tick_interval_s": 0.2,
                "bucket_s": 1,
                "recovery_idle_s": 0.3,
                "state_dir": str(tmp_path / "collector-state"),
                "checkpoint_interval_s": 1.0,
                "broker_check_interval_s": 0.5,
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
                **SECURE_COLLECTOR,
            }
        )
    )
    return path, admin, f"http://127.0.0.1:{metrics}/metrics"


def spec(stable: str, candidate: str) -> str:
    return yaml.safe_dump(
        {
            "agent": AGENT,
            "stable": stable,
            "candidate": candidate,
            "steps": [{"weight": 50, "min_duration": "10m", "min_samples": 100000}],
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


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


async def phase(http: aiohttp.ClientSession, url: str) -> str | None:
    with contextlib.suppress(aiohttp.ClientError):
        for name, labels, v in await scrape(http, url):
            if name == "outrider_sidecar_rollout_phase" and labels.get("agent") == AGENT and v == 1:
                return labels["phase"]
    return None


async def until_phase(http: aiohttp.ClientSession, url: str, want: str, proc: Proc, within: float) -> float:
    deadline = time.monotonic() + within
    while (await phase(http, url)) != want:
        assert time.monotonic() < deadline, f"never {want}:\n{proc.output()[-4000:]}"
        await asyncio.sleep(0.05)
    return time.monotonic()


async def load(address: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        while not stop.is_set():
            opened = await stub.OpenSession(sidecar_pb2.OpenSessionRequest())
            try:
                await stub.Chat(
                    sidecar_pb2.ChatRequest(session_id=opened.session_id, messages=USER), timeout=10
                )
                counts["ok"] += 1
            except grpc.aio.AioRpcError:
                counts["failed"] += 1


async def test_empty_broker_swapped_in_under_load_loses_no_decision(
    sim: SimProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SIM_KEY", API_KEY)
    port = free_port()
    broker = EmbeddedBroker(port=port)
    broker.start()
    kafka = broker.bootstrap_servers
    collector_yaml, admin_addr, collector_url = write_collector(tmp_path, kafka)
    a_yaml, a_addr, a_url = write_sidecar(tmp_path, "a", sim, kafka)
    b_yaml, b_addr, b_url = write_sidecar(tmp_path, "b", sim, kafka)
    ids = sidecar_config(sim).version_ids()
    stop = asyncio.Event()
    counts = {"ok": 0, "failed": 0}
    loaders: list[asyncio.Task[None]] = []
    http = aiohttp.ClientSession()
    try:
        with (
            outrider_process(
                "collector", "--config", str(collector_yaml), log_path=tmp_path / "c.log"
            ) as collector,
            outrider_process("sidecar", "--config", str(a_yaml), log_path=tmp_path / "a.log") as a,
        ):
            await wait_serving(admin_addr, collector)
            await wait_serving(a_addr, a)
            # the sidecar's report of its versions, which `rollout start` checks
            await report_versions(kafka, AGENT, ids["v1"], ids["v2"], admin=admin_addr, send=False)
            async with admin_channel(admin_addr) as channel:
                admin = admin_pb2_grpc.AdminStub(channel)
                started = await admin.StartRollout(
                    admin_pb2.StartRolloutRequest(spec_yaml=spec(ids["v1"], ids["v2"]))
                )
            await until_phase(http, a_url, "running", a, 20)
            loaders = [asyncio.create_task(load(a_addr, stop, counts)) for _ in range(4)]
            await asyncio.sleep(2.0)

            # the collector lags; then the broker is replaced by an empty one on the same port
            os.kill(collector.pid, signal.SIGSTOP)
            await asyncio.sleep(1.0)
            broker.stop()
            swapped_at = time.monotonic()
            broker = EmbeddedBroker(port=port)
            broker.start()
            os.kill(collector.pid, signal.SIGCONT)

            with outrider_process("sidecar", "--config", str(b_yaml), log_path=tmp_path / "b.log") as b:
                # a sidecar started on the new broker routes by the last decision
                restored_at = await until_phase(http, b_url, "running", b, 30)
                restore_s = restored_at - swapped_at
                loaders.append(asyncio.create_task(load(b_addr, stop, counts)))

                samples = await scrape(http, collector_url)
                assert value(samples, "outrider_collector_new_broker_total") >= 1, collector.output()[-4000:]

                # the collector keeps counting and deciding: the candidate fails from now on
                sim.set_model("sim-bad", ModelBehavior(error_rate=0.6))
                rolled_at = await until_phase(http, a_url, "rolled_back", a, 60)
                await until_phase(http, b_url, "rolled_back", b, 15)
                stop.set()
                await asyncio.gather(*loaders)

                samples = await scrape(http, collector_url)
                missing = value(samples, "outrider_events_missing_total")
                async with admin_channel(admin_addr) as channel:
                    status = await admin_pb2_grpc.AdminStub(channel).GetRollout(
                        admin_pb2.GetRolloutRequest(agent=AGENT)
                    )
                print(
                    f"\nempty broker: routing restored in a new sidecar {restore_s:.2f} s after the swap; "
                    f"rolled back {rolled_at - swapped_at:.2f} s after it; {int(missing)} events missing "
                    f"(status says {status.events_missing}); calls {counts}"
                )
                assert status.state.rollout_id == started.state.rollout_id
                assert status.state.generation > started.state.generation
                assert missing > 0, collector.output()[-4000:]
                assert status.events_missing == missing
                assert b.stop() == 0
            assert a.stop() == 0
            assert collector.stop() == 0, collector.output()[-4000:]
    finally:
        stop.set()
        for task in loaders:
            task.cancel()
        await http.close()
        broker.stop()


@pytest.mark.parametrize("broker_state", ["gone", "new_broker"])
async def test_collector_sigterm_ends_within_its_grace_whatever_the_broker(
    tmp_path: Path, broker_state: str
) -> None:
    port = free_port()
    broker = EmbeddedBroker(port=port)
    broker.start()
    try:
        config, admin_addr, _ = write_collector(tmp_path, broker.bootstrap_servers)
        data = yaml.safe_load(config.read_text())
        data["shutdown_grace_s"] = 4.0
        config.write_text(yaml.safe_dump(data))
        collector = Proc("collector", "--config", str(config), log_path=tmp_path / "c.log")
        try:
            await wait_serving(admin_addr, collector)
            broker.stop()
            if broker_state == "new_broker":
                broker = EmbeddedBroker(port=port)
                broker.start()
            await asyncio.sleep(1.5)  # it is failing to commit and fetch by now
            began = time.monotonic()
            collector.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(collector.proc.wait, 15)
            took = time.monotonic() - began
        finally:
            collector.stop(signal.SIGKILL)
        assert took < 4.0 + 2.0, f"SIGTERM took {took:.1f}s:\n{collector.output()[-3000:]}"
        assert code in (0, 1), collector.output()[-3000:]
    finally:
        broker.stop()


async def cleanup_policy(bootstrap: str) -> str:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, outrider.CONTROL_TOPIC)]
        )
    finally:
        await admin.close()
    entries = [entry for r in responses for res in r.resources for entry in res[4]]
    return next(str(e[1]) for e in entries if e[0] == "cleanup.policy")


async def test_new_broker_a_restarted_collector_restores_rollouts_from_its_copy(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with EmbeddedBroker() as first:
        async with (
            Collector(settings_for(first, state_dir=state_dir)) as collector,
            admin_channel(collector.admin_address) as channel,
        ):
            await versions_reported(first, collector)
            started = await admin_pb2_grpc.AdminStub(channel).StartRollout(
                admin_pb2.StartRolloutRequest(spec_yaml=collector_spec_yaml(min_duration="10m"))
            )
    assert (state_dir / "outrider-collector.control.json").exists()
    with EmbeddedBroker() as second:  # empty: no topics, no history (and another port)
        async with (
            Collector(settings_for(second, state_dir=state_dir)) as collector,
            admin_channel(collector.admin_address) as channel,
        ):
            status = await admin_pb2_grpc.AdminStub(channel).GetRollout(
                admin_pb2.GetRolloutRequest(agent=AGENT)
            )
            # not NOT_FOUND: the same published state (its gate results are the live evaluation)
            published = control_pb2.RolloutState()
            published.CopyFrom(status.state)
            del published.gate_results[:]
            published.gate_results.extend(started.state.gate_results)
            assert published == started.state
            assert (
                collector.metrics.registry.get_sample_value("outrider_collector_control_republished_total")
                >= 1
            )
            consumer = AIOKafkaConsumer(
                outrider.CONTROL_TOPIC,
                bootstrap_servers=second.bootstrap_servers,
                group_id=None,
                auto_offset_reset="earliest",
            )
            await consumer.start()
            try:
                found = None
                deadline = time.monotonic() + 10
                while found is None and time.monotonic() < deadline:
                    for records in (await consumer.getmany(timeout_ms=200)).values():
                        found = next((r for r in records if r.key == outrider.rollout_key(AGENT)), found)
            finally:
                await consumer.stop()
            assert found is not None, "the rollout was not republished on the new broker"
            assert await cleanup_policy(second.bootstrap_servers) == "compact"
            verdict, message = outrider.open_control(
                outrider.Verifier([TEST_SIGNER.public]), found.key, found.value, found.headers
            )
            assert verdict.ok and message is not None and message.rollout == started.state
