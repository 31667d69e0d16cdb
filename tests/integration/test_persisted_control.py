"""A sidecar keeps the last verified control state on disk and routes by it at start.

- restarted (a real process) while Kafka is down: routes by the persisted state and says
  SERVING at once;
- started with no state while Kafka is down: NOT_SERVING until `control.ready_timeout`,
  serving calls meanwhile, then SERVING with the wait counted;
- an empty topic (a new broker) never overrides the persisted state; a tampered file is
  not trusted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from grpc_health.v1 import health_pb2, health_pb2_grpc

import outrider
from devstack.broker import EmbeddedBroker, free_port
from devstack.simprovider import SimProvider
from outrider.v1 import common_pb2, control_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from tests.integration.test_sidecar_api import API_KEY, sidecar_config, sim_models
from tests.support import TEST_SIGNER, outrider_process, scrape, signed_control, wait_serving

pytestmark = pytest.mark.broker

AGENT = "support-bot"


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=13) as provider:
        yield provider


def promoted(stable: str, candidate: str, generation: int = 1) -> control_pb2.ControlMessage:
    return control_pb2.ControlMessage(
        rollout=control_pb2.RolloutState(
            agent=AGENT,
            epoch=7,
            generation=generation,
            rollout_id="r-persist",
            stable_version_id=stable,
            candidate_version_id=candidate,
            candidate_weight=1.0,
            phase=control_pb2.ROLLOUT_PHASE_PROMOTED,
        )
    )


async def publish(bootstrap: str, message: control_pb2.ControlMessage) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        key, value, headers = signed_control(message)
        await producer.send_and_wait(outrider.CONTROL_TOPIC, value, key=key, headers=headers)
    finally:
        await producer.stop()


def write_config(
    tmp_path: Path, sim: SimProvider, kafka: str, spill: Path, **control: Any
) -> tuple[Path, str, str]:
    data = sidecar_config(sim, kafka=kafka, metrics_port=None).model_dump(mode="json")
    listen, metrics = f"127.0.0.1:{free_port()}", free_port()
    data.update(
        listen=listen,
        metrics_port=metrics,
        shutdown_grace="2s",
        telemetry={"spill_dir": str(spill)},
        control={"public_keys": [TEST_SIGNER.public_text()], "ready_timeout": "20s", **control},
    )
    path = tmp_path / f"sidecar-{free_port()}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, listen, f"http://127.0.0.1:{metrics}/metrics"


async def versions_of_new_sessions(address: str, n: int = 20) -> set[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        return {(await stub.OpenSession(sidecar_pb2.OpenSessionRequest())).version_id for _ in range(n)}


async def test_sidecar_restarted_while_kafka_is_down_routes_by_its_persisted_state(
    sim: SimProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SIM_KEY", API_KEY)
    ids = sidecar_config(sim).version_ids()
    spill = tmp_path / "spill"
    with EmbeddedBroker() as broker:
        await publish(broker.bootstrap_servers, promoted(ids["v1"], ids["v2"]))
        path, listen, url = write_config(tmp_path, sim, broker.bootstrap_servers, spill)
        with outrider_process("sidecar", "--config", str(path), log_path=tmp_path / "first.log") as first:
            await wait_serving(listen, first)
            assert await versions_of_new_sessions(listen) == {ids["v2"]}
            assert first.stop() == 0
    state_file = spill.with_name("spill.control.json")
    assert state_file.exists(), first.output()

    # Kafka is gone (nothing listens on its port any more)
    began = time.monotonic()
    with outrider_process("sidecar", "--config", str(path), log_path=tmp_path / "second.log") as second:
        await wait_serving(listen, second)
        serving_after = time.monotonic() - began
        assert await versions_of_new_sessions(listen) == {ids["v2"]}
        async with aiohttp.ClientSession() as http:
            samples = {(n, tuple(sorted(lab.items()))): v for n, lab, v in await scrape(http, url)}
        assert samples[("outrider_sidecar_rollout_generation", (("agent", AGENT),))] == 1
        assert samples[("outrider_sidecar_control_ready", ())] == 1
        assert samples[("outrider_sidecar_control_wait_expired_total", ())] == 0
        assert second.stop() == 0
    print(f"\npersisted state: SERVING {serving_after:.2f} s after a start with Kafka down")
    assert "using persisted state" in second.output()
    assert serving_after < 15, "health waited for the topic instead of using the persisted state"


async def test_health_waits_for_a_control_state_but_calls_are_served(
    sim: SimProvider, tmp_path: Path
) -> None:
    config = sidecar_config(
        sim,
        metrics_port=None,
        telemetry={"spill_dir": str(tmp_path / "spill")},
        control={"public_keys": [TEST_SIGNER.public_text()], "ready_timeout": "1.5s"},
    )  # Kafka: a port nobody listens on, nothing persisted
    async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        opened = await sidecar_pb2_grpc.SidecarStub(channel).OpenSession(sidecar_pb2.OpenSessionRequest())
        assert opened.role == common_pb2.ROLE_STABLE  # served meanwhile
        await asyncio.sleep(2.0)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert sidecar.metrics.registry.get_sample_value("outrider_sidecar_control_wait_expired_total") == 1
        assert sidecar.metrics.registry.get_sample_value("outrider_sidecar_control_ready") == 0


async def test_persisted_state_survives_an_empty_topic_and_a_tampered_file_is_not_trusted(
    sim: SimProvider, tmp_path: Path
) -> None:
    base = sidecar_config(sim)
    v1, v2 = base.version_ids()["v1"], base.version_ids()["v2"]
    state_file = tmp_path / "control.json"
    key, value, headers = signed_control(promoted(v1, v2, generation=4))
    outrider.save_records(state_file, [outrider.SignedRecord(key, value, tuple(headers))])
    with EmbeddedBroker() as broker:  # a new broker: the control topic does not even exist
        config = sidecar_config(
            sim,
            kafka=broker.bootstrap_servers,
            metrics_port=None,
            control={"public_keys": [TEST_SIGNER.public_text()], "state_file": str(state_file)},
        )
        async with Sidecar(config) as sidecar:
            assert sidecar.control.state_source == "disk" and sidecar.router.generation == 4
            await asyncio.sleep(1.5)  # the tailer has looked at the (empty) broker meanwhile
            assert sidecar.router.generation == 4
            assert sidecar.router.assign("n").version_id == v2
            # only a newer verified record moves it
            await publish(broker.bootstrap_servers, promoted(v1, v1, generation=5))
            for _ in range(200):
                if sidecar.router.generation == 5:
                    break
                await asyncio.sleep(0.05)
            assert sidecar.router.generation == 5
    record = outrider.load_records(state_file)[0][0]
    assert outrider.decode_control(record.value).rollout.generation == 5  # persisted again

    # a persisted file whose bytes were changed is verified like a record from the topic
    document = json.loads(state_file.read_text())
    forged = promoted(v1, v2, generation=99).SerializeToString()
    document["records"][0]["value"] = base64.b64encode(forged).decode()
    state_file.write_text(json.dumps(document))
    config = sidecar_config(
        sim,
        metrics_port=None,
        control={"public_keys": [TEST_SIGNER.public_text()], "state_file": str(state_file)},
    )
    async with Sidecar(config) as sidecar:
        assert sidecar.router.generation == 0 and sidecar.control.rejected == 1
