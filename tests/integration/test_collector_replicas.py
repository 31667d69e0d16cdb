"""Collector replicas own their agents: one decides, the other relays; a takeover finishes the job.

Two collector processes share a consumer group, a signing key and a state_dir on the embedded
broker (`outrider.events` with 4 partitions). The rollout is started through either replica
and is answered by the agent's owner. Mid-rollout the owner is SIGKILLed; once the group's
session times out, the survivor restores the rollout from the control topic and the dead
owner's checkpoint and finishes it: generations continue, its epoch orders after the dead
owner's, and the evidence still holds the events counted before the kill, once.

In-process replicas check the relay itself: verbs sent to the non-owner are run by the owner
and recorded under the caller's identity, and forged commands on `outrider.commands` are
never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yaml
from aiokafka import AIOKafkaProducer

import outrider
from collector import Collector, CollectorSettings
from collector._ownership import partition_for
from devstack._status import render_status
from devstack.broker import EmbeddedBroker, free_port
from outrider.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    commands_pb2,
    common_pb2,
    control_pb2,
    events_pb2,
    registry_pb2,
)
from tests.support import SECURE_COLLECTOR, Proc, admin_channel, report_versions, wait_serving

pytestmark = pytest.mark.broker

PARTITIONS = 4
STABLE, CANDIDATE = "1a2b3c4d5e6f", "9f8e7d6c5b4a"
PROMOTED = control_pb2.ROLLOUT_PHASE_PROMOTED
_ids = itertools.count()


def spec(agent: str, min_duration: str = "2s") -> str:
    return yaml.safe_dump(
        {
            "agent": agent,
            "stable": STABLE,
            "candidate": CANDIDATE,
            "look_interval": "200ms",
            "steps": [{"weight": w, "min_duration": min_duration, "min_samples": 5} for w in (10, 50, 100)],
            "gates": [{"name": "errors", "metric": "error_rate", "max_increase": 0.05, "window": "30s"}],
        }
    )


def event(agent: str, canary: bool, rollout_id: str) -> events_pb2.Event:
    n = next(_ids)
    e = events_pb2.Event(
        event_id=f"evt-{n}",
        time_unix_nano=time.time_ns(),
        agent=agent,
        version_id=CANDIDATE if canary else STABLE,
        role=common_pb2.ROLE_CANARY if canary else common_pb2.ROLE_STABLE,
        session_id=f"s{n}",
        rollout_id=rollout_id,
    )
    e.call.latency_ms = 50.0 * random.lognormvariate(0, 0.2)
    e.call.outcome = events_pb2.OUTCOME_OK
    return e


@contextlib.asynccontextmanager
async def traffic(broker: EmbeddedBroker, agent: str, rollout_id: str) -> AsyncIterator[dict[str, int]]:
    """Healthy calls of both versions, ~100/s, until the block ends; counts by role."""
    sent = {"stable": 0, "canary": 0}
    stop = asyncio.Event()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    await producer.start()

    async def run() -> None:
        while not stop.is_set():
            for canary in (False, True):
                value, headers = outrider.encode_event(event(agent, canary, rollout_id))
                await producer.send_and_wait(
                    outrider.EVENTS_TOPIC, value, key=outrider.agent_key(agent), headers=headers
                )
                sent["canary" if canary else "stable"] += 1
            await asyncio.sleep(0.02)

    task = asyncio.create_task(run())
    try:
        yield sent
    finally:
        stop.set()
        await task
        await producer.stop()


def replica_config(tmp_path: Path, broker: EmbeddedBroker, name: str, state_dir: Path) -> tuple[Path, str]:
    admin = f"127.0.0.1:{free_port()}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kafka_bootstrap": broker.bootstrap_servers,
                "group_id": "replicas",
                "replica_id": name,
                "admin_listen": admin,
                "topic_partitions": PARTITIONS,
                "tick_interval_s": 0.1,
                "bucket_s": 0.5,
                "retention_s": 120,
                "recovery_idle_s": 0.3,
                "state_dir": str(state_dir),
                "checkpoint_interval_s": 0.5,
                "session_timeout_ms": 3000,
                "heartbeat_interval_ms": 500,
                "relay_timeout_s": 15,
                **SECURE_COLLECTOR,
            }
        )
    )
    return path, admin


async def status_via(admin: str, agent: str) -> admin_pb2.RolloutStatus:
    async with admin_channel(admin) as channel:
        return await admin_pb2_grpc.AdminStub(channel).GetRollout(
            admin_pb2.GetRolloutRequest(agent=agent), timeout=20
        )


async def wait_for(
    admin: str, agent: str, check: object, within_s: float, what: str
) -> admin_pb2.RolloutStatus:
    deadline = time.monotonic() + within_s
    last: admin_pb2.RolloutStatus | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.aio.AioRpcError):
            last = await status_via(admin, agent)
            if check(last):  # type: ignore[operator]
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not seen within {within_s}s; last status: {last}")


async def test_takeover_two_replica_processes_kill_the_owner_mid_rollout(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    agent = "support-bot"
    state_dir = tmp_path / "state"  # shared: the survivor reads the dead owner's checkpoint
    configs = {name: replica_config(tmp_path, broker, name, state_dir) for name in ("a", "b")}
    procs = {
        name: Proc("collector", "--config", str(path), log_path=tmp_path / f"{name}.log")
        for name, (path, _) in configs.items()
    }
    try:
        for name, (_, admin) in configs.items():
            await wait_serving(admin, procs[name])
        # a sidecar of the agent reports its versions (to the owner, by the agent's partition)
        await report_versions(broker.bootstrap_servers, agent, STABLE, CANDIDATE, admin=configs["b"][1])
        # started through replica b, whoever owns the agent; the owner checks the versions
        async with admin_channel(configs["b"][1]) as channel:
            started = await admin_pb2_grpc.AdminStub(channel).StartRollout(
                admin_pb2.StartRolloutRequest(spec_yaml=spec(agent), source_name="replicas.yaml"), timeout=30
            )
        owner = started.collector_replica
        assert owner in ("a", "b") and started.state.generation == 1
        survivor = "b" if owner == "a" else "a"
        rollout_id = started.state.rollout_id
        async with traffic(broker, agent, rollout_id) as sent:
            mid = await wait_for(
                configs[survivor][1], agent, lambda s: s.state.step_index >= 1, 30, "the second stage"
            )
            assert mid.collector_replica == owner  # answered by the owner through the relay
            await asyncio.sleep(1.5)  # a checkpoint or two into the second stage
            before_kill = dict(sent)
            killed_at = time.monotonic()
            assert procs[owner].stop(signal.SIGKILL) == -signal.SIGKILL
            taken = await wait_for(
                configs[survivor][1], agent, lambda s: s.collector_replica == survivor, 30, "the takeover"
            )
            takeover_s = time.monotonic() - killed_at
            print(f"takeover after SIGKILL: {takeover_s:.2f}s (session timeout 3s)")
            assert taken.state.rollout_id == rollout_id and taken.state.step_index >= 1
            done = await wait_for(
                configs[survivor][1], agent, lambda s: s.state.phase == PROMOTED, 60, "the promotion"
            )
        final = done.state
        assert final.rollout_id == rollout_id and final.decided_by == "controller"
        assert final.epoch > mid.state.epoch, "the new owner's states must order after the old owner's"
        assert final.generation > mid.state.generation
        # the evidence kept what the dead owner had counted, and counted nothing twice
        errors = next(g for g in final.gate_results if g.name == "errors")
        assert before_kill["canary"] * 0.9 <= errors.candidate_samples <= sent["canary"]
        assert errors.baseline_samples <= sent["stable"]
        survivor_log = procs[survivor].output()
        assert "took over outrider.events partitions" in survivor_log
        assert "restored the checkpoint" in survivor_log
    finally:
        for proc in procs.values():
            proc.stop()


def _settings(broker: EmbeddedBroker, name: str) -> CollectorSettings:
    return CollectorSettings.model_validate(
        {
            "kafka_bootstrap": broker.bootstrap_servers,
            "group_id": "relay",
            "replica_id": name,
            "admin_listen": "127.0.0.1:0",
            "topic_partitions": 2,
            "tick_interval_s": 0.1,
            "recovery_idle_s": 0.3,
            "state_dir": None,
            "session_timeout_ms": 3000,
            "heartbeat_interval_ms": 500,
            "relay_timeout_s": 10,
            **SECURE_COLLECTOR,
        }
    )


async def _settled(*collectors: Collector, within_s: float = 20.0) -> None:
    """Until every partition is ready on exactly one replica."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        ready = [p for c in collectors for p in c.ownership.ready]
        if sorted(ready) == [0, 1]:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"partitions not settled: {[sorted(c.ownership.ready) for c in collectors]}")


async def test_replica_relays_verbs_to_the_owner_and_never_runs_forged_commands(
    broker: EmbeddedBroker,
) -> None:
    async with Collector(_settings(broker, "one")) as one, Collector(_settings(broker, "two")) as two:
        await _settled(one, two)
        # each replica's broker marker has its own key: compaction keeps every one of them
        assert one._watch.key == b"marker/collector/relay/one" and two._watch.key != one._watch.key
        # an agent the first replica owns, asked through the second
        agent = next(f"agent-{i}" for i in range(100) if one.ownership.owns(f"agent-{i}"))
        assert not two.ownership.owns(agent) and partition_for(agent, 2) in one.ownership.ready
        await report_versions(broker.bootstrap_servers, agent, STABLE, CANDIDATE)
        deadline = time.monotonic() + 20
        while not one.rollouts.sightings.reported(agent, CANDIDATE):
            assert time.monotonic() < deadline, "the owner never consumed the version report"
            await asyncio.sleep(0.05)
        async with admin_channel(two.admin_address) as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            started = await stub.StartRollout(
                admin_pb2.StartRolloutRequest(spec_yaml=spec(agent, "1h")), timeout=20
            )
            assert started.collector_replica == "one"
            paused = await stub.PauseRollout(
                admin_pb2.PauseRolloutRequest(agent=agent, reason="look"), timeout=20
            )
            assert paused.state.phase == control_pb2.ROLLOUT_PHASE_HOLD
            assert paused.state.decided_by == "token:ci" and paused.collector_replica == "one"
            assert "decided by collector replica one" in render_status(paused)[1]  # `rollout status`
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.PauseRollout(admin_pb2.PauseRolloutRequest(agent=agent), timeout=20)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # the owner's error, relayed
            # `version list` through the non-owner: the owner's view, with the sidecar's report
            listing = await stub.ListVersions(registry_pb2.ListVersionsRequest(agent=agent), timeout=20)
            served = {v.version_id: len(v.sidecars) for v in listing.versions}
            assert served.get(CANDIDATE) == 1 and served.get(STABLE) == 1, listing
        assert one.rollouts.get(agent) is not None and two.rollouts.get(agent) is None

        # forged aborts: unsigned, and signed by a key no collector trusts
        forger = outrider.SigningKey.generate()
        command = commands_pb2.AdminCommand(
            command_id="forged",
            agent=agent,
            method="AbortRollout",
            request=admin_pb2.AbortRolloutRequest(agent=agent, reason="hijack").SerializeToString(),
            caller="token:ci",
            sent_unix_nano=time.time_ns(),
            deadline_unix_nano=time.time_ns() + 60 * 10**9,
        )
        value = commands_pb2.CommandRecord(command=command).SerializeToString()
        key = outrider.agent_key(agent)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
        await producer.start()
        try:
            for _ in range(3):  # the readers may start after the first
                await producer.send_and_wait(outrider.COMMANDS_TOPIC, value, key=key)
                await producer.send_and_wait(
                    outrider.COMMANDS_TOPIC, value, key=key, headers=forger.sign(key, value)
                )
                await asyncio.sleep(0.5)
        finally:
            await producer.stop()
        ctl = one.rollouts.get(agent)
        assert ctl is not None and ctl.state is not None
        assert ctl.state.phase == control_pb2.ROLLOUT_PHASE_HOLD, "a forged command was run"
        assert one.metrics.commands.labels("rejected")._value.get() >= 2


async def test_replica_usage_reports_of_every_partition_reach_the_granter(broker: EmbeddedBroker) -> None:
    resource = "openai/gpt-4o"

    settings = [
        CollectorSettings.model_validate(
            {**_settings(broker, n).model_dump(), "quotas": {resource: {"limit_tpm": 1000.0}}}
        )
        for n in ("one", "two")
    ]
    async with Collector(settings[0]) as one, Collector(settings[1]) as two:
        await _settled(one, two)
        granter, other = (one, two) if 0 in one.ownership.ready else (two, one)
        agents = {
            p: next(f"agent-{i}" for i in range(100) if partition_for(f"agent-{i}", 2) == p) for p in (0, 1)
        }
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
        await producer.start()
        try:
            deadline = time.monotonic() + 20
            while granter.quotas.book.usage(resource).sidecars < 2:
                assert time.monotonic() < deadline, "usage of the other partition never reached the granter"
                for partition, agent in agents.items():
                    e = events_pb2.Event(
                        event_id=f"usage-{next(_ids)}",
                        time_unix_nano=time.time_ns(),
                        agent=agent,
                        sidecar_id=f"sidecar-p{partition}",
                        sequence=next(_ids) + 1,
                    )
                    e.usage.resource, e.usage.used_tpm, e.usage.demand_tpm = resource, 100.0, 200.0
                    value, headers = outrider.encode_event(e)
                    await producer.send_and_wait(
                        outrider.EVENTS_TOPIC, value, key=outrider.agent_key(agent), headers=headers
                    )
                await asyncio.sleep(0.3)
        finally:
            await producer.stop()
        assert granter.quotas.book.usage(resource).demand_tpm == pytest.approx(400.0)
        # the relayed copies carry no sequence: the granter counts no gap for them
        assert granter.metrics.events_missing.labels("sidecar-p1", agents[1])._value.get() == 0
        assert 0 not in other.ownership.ready
