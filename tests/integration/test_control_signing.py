"""Forged control records change nothing; an operator's abort always takes effect.

A real collector (signing with the tests' key) and a sidecar in this process, a second
sidecar started afterwards as a real process, and a second collector started after that,
all on one embedded broker. Forged records of every kind (unsigned, another key, a stolen
key id, a tampered value, a signed record moved to another key, a replay of an old signed
state), each with generation and epoch 2^62 and the candidate at 100 %, are rejected by
every reader and counted; the abort that follows wins everywhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

import outrider
from collector import Collector
from devstack.broker import EmbeddedBroker, free_port
from devstack.simprovider import SimProvider
from outrider.v1 import admin_pb2, admin_pb2_grpc, common_pb2, control_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from tests.integration.test_collector_service import settings_for, versions_reported
from tests.integration.test_sidecar_api import API_KEY, sidecar_config, sim_models
from tests.support import TEST_SIGNER, admin_channel, outrider_process, scrape, signed_control, wait_serving

pytestmark = pytest.mark.broker

AGENT = "support-bot"
HUGE = 2**62
SESSIONS = 50


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=5) as provider:
        yield provider


def rollout_spec(stable: str, candidate: str) -> str:
    return yaml.safe_dump(
        {
            "agent": AGENT,
            "stable": stable,
            "candidate": candidate,
            "steps": [{"weight": 10, "min_duration": "10m", "min_samples": 100000}],
            "gates": [],
        }
    )


def forged_state(candidate: str, stable: str) -> control_pb2.ControlMessage:
    return control_pb2.ControlMessage(
        rollout=control_pb2.RolloutState(
            agent=AGENT,
            epoch=HUGE,
            generation=HUGE,
            rollout_id="evil",
            stable_version_id=stable,
            candidate_version_id=candidate,
            candidate_weight=1.0,
            phase=control_pb2.ROLLOUT_PHASE_PROMOTED,
            decided_by="attacker",
        )
    )


def forgeries(
    legit: tuple[bytes, bytes, list[tuple[str, bytes]]], stable: str, candidate: str
) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """Five records no reader may apply."""
    attacker = outrider.SigningKey.generate()
    message = forged_state(candidate, stable)
    unsigned = signed_control(message, None)
    other_key = signed_control(message, attacker)
    key, value, headers = other_key
    stolen_id = (
        key,
        value,
        [(k, TEST_SIGNER.key_id.encode()) if k == "outrider-key-id" else (k, v) for k, v in headers],
    )
    legit_key, legit_value, legit_headers = legit
    tampered_state = outrider.decode_control(legit_value).rollout
    tampered_state.candidate_weight, tampered_state.generation = 1.0, HUGE
    tampered = (
        legit_key,
        control_pb2.ControlMessage(rollout=tampered_state).SerializeToString(),
        legit_headers,
    )
    moved = (outrider.rollout_key("other-bot"), legit_value, legit_headers)
    return [unsigned, other_key, stolen_id, tampered, moved]


async def first_rollout_record(bootstrap: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    consumer = AIOKafkaConsumer(
        outrider.CONTROL_TOPIC, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    if record.key == outrider.rollout_key(AGENT):
                        return record.key, record.value, list(record.headers)
    finally:
        await consumer.stop()
    raise AssertionError("no rollout record on the control topic")


async def eventually(predicate: object, within: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def roles(address: str) -> dict[str, int]:
    counts = {"stable": 0, "canary": 0}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        for i in range(SESSIONS):
            opened = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id=f"user-{i}"))
            assert opened.rollout_id != "evil"
            counts["canary" if opened.role == common_pb2.ROLE_CANARY else "stable"] += 1
    return counts


def metric(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


async def test_forged_records_change_no_routing_and_an_abort_beats_them(
    broker: EmbeddedBroker, sim: SimProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SIM_KEY", API_KEY)
    config = sidecar_config(sim, kafka=broker.bootstrap_servers, metrics_port=None)
    v1, v2 = config.version_ids()["v1"], config.version_ids()["v2"]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        async with (
            Collector(settings_for(broker)) as collector,
            admin_channel(collector.admin_address) as channel,
            Sidecar(config) as running,
        ):
            admin = admin_pb2_grpc.AdminStub(channel)
            await versions_reported(broker, collector, v1, v2, send=False)  # the sidecar's report at start
            started = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=rollout_spec(v1, v2)))
            legit_ordering = (started.state.epoch, started.state.generation)
            await eventually(lambda: running.router.ordering == legit_ordering, what="the legit rollout")
            legit = await first_rollout_record(broker.bootstrap_servers)

            forged = forgeries(legit, v1, v2)
            for key, value, headers in forged:
                await producer.send_and_wait(outrider.CONTROL_TOPIC, value, key=key, headers=headers)
            await eventually(lambda: running.control.rejected >= len(forged), what="the forgeries rejected")
            assert running.router.ordering == legit_ordering
            seen = await roles(running.address)
            assert seen["canary"] < SESSIONS // 2, seen  # 10 %, not the forged 100 %

            # a sidecar started afterwards replays the topic, forgeries included
            data = config.model_dump(mode="json")
            listen, metrics_port = f"127.0.0.1:{free_port()}", free_port()
            data.update(
                listen=listen, metrics_port=metrics_port, telemetry={"spill_dir": str(tmp_path / "b")}
            )
            data["control"] = {"public_keys": [TEST_SIGNER.public_text()], "ready_timeout": "20s"}
            path = tmp_path / "b.yaml"
            path.write_text(yaml.safe_dump(data))
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with outrider_process("sidecar", "--config", str(path), log_path=tmp_path / "b.log") as later:
                await wait_serving(listen, later)  # SERVING only once the replay reached its end
                async with aiohttp.ClientSession() as http:
                    samples = await scrape(http, url)
                    assert metric(samples, "outrider_sidecar_rollout_generation", agent=AGENT) == 1
                    rejected_later = metric(samples, "outrider_control_rejected_total")
                    assert rejected_later >= len(forged), later.output()
                    seen = await roles(listen)
                    assert seen["canary"] < SESSIONS // 2, seen

                    aborted = await admin.AbortRollout(
                        admin_pb2.AbortRolloutRequest(agent=AGENT, reason="forged")
                    )
                    assert aborted.state.phase == control_pb2.ROLLOUT_PHASE_ABORTED
                    # an old signed state replayed after the abort: stale, ignored
                    await producer.send_and_wait(
                        outrider.CONTROL_TOPIC, legit[1], key=legit[0], headers=legit[2]
                    )
                    await eventually(
                        lambda: (
                            running.router.state is not None
                            and running.router.state.phase == control_pb2.ROLLOUT_PHASE_ABORTED
                        ),
                        what="the abort in the running sidecar",
                    )
                    deadline = time.monotonic() + 15
                    while True:
                        samples = await scrape(http, url)
                        if (
                            metric(samples, "outrider_sidecar_rollout_phase", agent=AGENT, phase="aborted")
                            == 1
                        ):
                            break
                        assert time.monotonic() < deadline, "the later sidecar never applied the abort"
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.5)  # the replayed record has arrived by now
                    for address in (running.address, listen):
                        assert (await roles(address)) == {"stable": SESSIONS, "canary": 0}
                    assert running.router.state.phase == control_pb2.ROLLOUT_PHASE_ABORTED
                assert later.stop() == 0, later.output()

        # a collector started afterwards recovers the legit history, not a forgery
        async with (
            Collector(settings_for(broker, group_id="after")) as successor,
            admin_channel(successor.admin_address) as channel,
        ):
            status = await admin_pb2_grpc.AdminStub(channel).GetRollout(
                admin_pb2.GetRolloutRequest(agent=AGENT)
            )
            assert status.state.phase == control_pb2.ROLLOUT_PHASE_ABORTED
            assert status.state.generation == 2 and status.state.rollout_id == started.state.rollout_id
            reasons = {
                s.labels["reason"]: s.value
                for m in successor.metrics.registry.collect()
                for s in m.samples
                if s.name == "outrider_control_rejected_total"
            }
        total = running.control.rejected
        print(
            f"\nforged records rejected: running sidecar {total} (forged {len(forged)} + 1 replay), "
            f"later sidecar {int(rejected_later)}, restarted collector {int(sum(reasons.values()))} {reasons}"
        )
        assert sum(reasons.values()) >= len(forged)
    finally:
        await producer.stop()


async def test_unsigned_records_apply_only_in_warn_mode(broker: EmbeddedBroker, sim: SimProvider) -> None:
    base = sidecar_config(sim, kafka=broker.bootstrap_servers, metrics_port=None)
    v1, v2 = base.version_ids()["v1"], base.version_ids()["v2"]
    warn = sidecar_config(
        sim,
        kafka=broker.bootstrap_servers,
        metrics_port=None,
        control={"verify": "warn", "ready_timeout": "0s"},
    )
    message = control_pb2.ControlMessage(
        rollout=control_pb2.RolloutState(
            agent=AGENT,
            generation=1,
            rollout_id="old",
            stable_version_id=v1,
            candidate_version_id=v2,
            phase=control_pb2.ROLLOUT_PHASE_PROMOTED,
        )
    )
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        # an older collector keyed by agent and signed nothing
        value, headers = outrider.encode_control(message)
        await producer.send_and_wait(
            outrider.CONTROL_TOPIC, value, key=outrider.agent_key(AGENT), headers=headers
        )
        async with Sidecar(base) as enforcing, Sidecar(warn) as warning:
            await eventually(lambda: warning.router.generation == 1, what="warn applies it")
            await eventually(lambda: enforcing.control.rejected == 1, what="enforce rejects it")
            assert enforcing.router.generation == 0
            assert enforcing.router.assign("n").version_id == v1
            assert warning.router.assign("n").version_id == v2
            assert warning.metrics.registry.get_sample_value("outrider_control_unsigned_applied_total") == 1
            assert (
                enforcing.metrics.registry.get_sample_value(
                    "outrider_control_rejected_total", {"reason": "unsigned"}
                )
                == 1
            )
    finally:
        await producer.stop()
