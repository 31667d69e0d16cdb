"""The version registry end to end, on one embedded broker: a real collector, a sidecar in this
process, the simulated provider, and the `outrider version` CLI as a subprocess.

A version pushed with the CLI reaches the running sidecar without a restart: a rollout naming
it as the candidate sends sessions to it, and the provider sees its model and prompt. A
rollout naming a version that is neither pushed nor reported is refused, naming it. Forged,
unsigned, id-mismatched and invalid records on `outrider.versions` are dropped and counted by
the sidecar and by the collector's view. A sidecar restarted without a broker still has the
pushed version.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from aiokafka import AIOKafkaProducer

import outrider
from collector import Collector
from devstack.broker import EmbeddedBroker, free_port
from devstack.simprovider import SimProvider
from outrider.v1 import admin_pb2, admin_pb2_grpc, common_pb2, registry_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar, parse_version_file
from tests.integration.test_collector_service import settings_for, versions_reported
from tests.integration.test_sidecar_api import API_KEY, sidecar_config, sim_models
from tests.support import ADMIN_TOKEN, TEST_SIGNER, VIEWER_TOKEN, admin_channel

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
AGENT = "support-bot"
PUSHED_PROMPT = "You are the registry's support agent. Be brief."
SESSIONS = 40


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(
        sim_models(**{"sim-fast": sim_models()["sim-good"]}), api_key=API_KEY, seed=3
    ) as p:
        yield p


def version_document(
    sim: SimProvider, model: str = "sim-fast", prompt: str = PUSHED_PROMPT
) -> dict[str, Any]:
    return {
        "agent": AGENT,
        "label": "v3",
        "version": {
            "provider": {"name": "openai", "base_url": sim.base_url, "api_key_env": "TEST_SIM_KEY"},
            "model": model,
            "system_prompt": prompt,
            "parameters": {"temperature": 0.1, "max_tokens": 32},
            "request_timeout": "5s",
            "tools": [{"name": "echo", "endpoint": sim.tool_url("echo"), "timeout": "2s"}],
        },
    }


def rollout_spec(stable: str, candidate: str, weight: int = 50) -> str:
    return yaml.safe_dump(
        {
            "agent": AGENT,
            "stable": stable,
            "candidate": candidate,
            "steps": [{"weight": weight, "min_duration": "10m", "min_samples": 100000}],
            "gates": [],
        }
    )


async def cli(*args: str, token: str = ADMIN_TOKEN, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a thread: the collector it calls runs on this test's event loop."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_ADMIN")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "devstack", *args],
        cwd=cwd,
        env={**base, "PYTHONPATH": str(ROOT), "OUTRIDER_ADMIN_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def eventually(predicate: Any, within: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_registry_pushed_version_is_served_by_a_running_sidecar(
    broker: EmbeddedBroker, sim: SimProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SIM_KEY", API_KEY)
    spill = tmp_path / "spill"
    config = sidecar_config(
        sim, kafka=broker.bootstrap_servers, metrics_port=None, telemetry={"spill_dir": str(spill)}
    )
    v1 = config.version_ids()["v1"]
    version_file = tmp_path / "v3.yaml"
    version_file.write_text(yaml.safe_dump(version_document(sim)))
    v3 = parse_version_file(version_document(sim)).version_id
    async with (
        Collector(settings_for(broker)) as collector,
        admin_channel(collector.admin_address) as channel,
        Sidecar(config) as running,
    ):
        admin = admin_pb2_grpc.AdminStub(channel)
        address = collector.admin_address
        await versions_reported(broker, collector, v1, send=False)  # the sidecar's report at start
        assert v3 not in running.versions

        # a rollout naming a version nobody has is refused, naming it and the fix
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=rollout_spec(v1, v3)))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"candidate version {v3}" in (refused.value.details() or "")
        assert "outrider version push" in (refused.value.details() or "")
        spec = tmp_path / "rollout.yaml"
        spec.write_text(rollout_spec(v1, v3))
        run = await cli("rollout", "start", str(spec), "--admin", address, cwd=tmp_path)
        assert run.returncode == 5 and "FAILED_PRECONDITION" in run.stderr and v3 in run.stderr, run.stderr

        # a viewer may list but not push
        run = await cli(
            "version", "push", str(version_file), "--admin", address, token=VIEWER_TOKEN, cwd=tmp_path
        )
        assert run.returncode == 5 and "PERMISSION_DENIED" in run.stderr, run.stderr

        run = await cli("version", "push", str(version_file), "--admin", address, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert f"pushed: {AGENT} version {v3} (v3), model sim-fast, by token:ci" in run.stdout
        again = await cli("version", "push", str(version_file), "--admin", address, "--json", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["already_present"] is True  # same content, same id: idempotent

        # the running sidecar serves it, with no restart
        await eventually(lambda: v3 in running.versions, what="the pushed version at the sidecar")
        assert running.registry.sources[v3] == "registry"
        await eventually(
            lambda: any(s.sidecar_id == running.sidecar_id for s in _sidecars(collector, v3)),
            what="the sidecar's report of the pushed version",
        )
        run = await cli(
            "version", "list", AGENT, "--admin", address, "--json", token=VIEWER_TOKEN, cwd=tmp_path
        )
        assert run.returncode == 0, run.stderr
        listed = {v["version_id"]: v for v in json.loads(run.stdout)["versions"]}
        assert listed[v3]["in_registry"] and listed[v3]["pushed_by"] == "token:ci"
        assert listed[v3]["model"] == "sim-fast" and listed[v3]["label"] == "v3"
        assert [s["sidecar_id"] for s in listed[v3]["sidecars"]] == [running.sidecar_id]
        assert not listed[v1]["in_registry"] and listed[v1]["sidecars"][0]["source"] == "config"
        text = await cli("version", "list", AGENT, "--admin", address, token=VIEWER_TOKEN, cwd=tmp_path)
        assert v3 in text.stdout and "config only" in text.stdout, text.stdout

        started = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=rollout_spec(v1, v3)))
        await eventually(lambda: running.router.generation == started.state.generation, what="the rollout")
        sim.reset_stats()
        pinned = await _chat_sessions(running.address)
        assert pinned.get(v3, 0) > 0 and pinned.get(v1, 0) > 0, pinned
        chats = [r.body for r in sim.received if r.path.endswith("/chat/completions") and r.body]
        fast = [b for b in chats if b["model"] == "sim-fast"]
        assert len(fast) == pinned[v3]
        assert all(b["messages"][0] == {"role": "system", "content": PUSHED_PROMPT} for b in fast)
        assert all(b["tools"][0]["function"]["name"] == "echo" for b in fast)

    # restarted without a broker: the pushed version is still there, from disk
    offline = config.model_copy(
        update={"kafka": config.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"})}
    )
    later = Sidecar(offline)
    await later.registry.load_persisted()
    assert v3 in later.versions and later.router.known >= {v1, v3}


def _sidecars(collector: Collector, version_id: str) -> list[registry_pb2.VersionServer]:
    for listing in collector.registry.listing(AGENT).versions:
        if listing.version_id == version_id:
            return list(listing.sidecars)
    return []


async def _chat_sessions(address: str) -> dict[str, int]:
    """Open SESSIONS sessions and chat once in each; sessions by pinned version."""
    pinned: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        for i in range(SESSIONS):
            opened = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id=f"user-{i}"))
            reply = await stub.Chat(
                sidecar_pb2.ChatRequest(
                    session_id=opened.session_id,
                    messages=[common_pb2.ChatMessage(role="user", content="where is my order?")],
                )
            )
            assert reply.version_id == opened.version_id
            pinned[opened.version_id] = pinned.get(opened.version_id, 0) + 1
    return pinned


def _record(
    version: registry_pb2.RegistryVersion, signer: outrider.SigningKey | None
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    key = outrider.version_key(version.agent, version.version_id)
    value = version.SerializeToString()
    return key, value, (signer.sign(key, value) if signer is not None else [])


def forged_versions(sim: SimProvider) -> dict[str, tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """A record of each kind no reader may take, by the reason it is rejected for."""
    content = parse_version_file(version_document(sim, model="sim-bad", prompt="forged")).config
    canonical = content.canonical_json()
    good = registry_pb2.RegistryVersion(
        agent=AGENT, version_id=outrider.version_id_of(canonical), label="evil", canonical_json=canonical
    )
    attacker = outrider.SigningKey.generate()
    mismatch = registry_pb2.RegistryVersion()
    mismatch.CopyFrom(good)
    mismatch.version_id = "0123456789ab"  # signed by the real key, but not the content's hash
    key, value, headers = _record(good, TEST_SIGNER)
    moved_key = outrider.version_key("other-bot", good.version_id)
    return {
        "unsigned": _record(good, None),
        "unknown_key": _record(good, attacker),
        "bad_signature": (key, value + b"\x00", headers),  # tampered after signing
        # signed under another agent's key: a valid signature, but not this record's key
        "bad_key": (moved_key, value, TEST_SIGNER.sign(moved_key, value)),
        "id_mismatch": _record(mismatch, TEST_SIGNER),
    }


def invalid_version() -> registry_pb2.RegistryVersion:
    """Signed and self-consistent, but no valid version: only the sidecar's model finds out."""
    canonical = outrider.canonical_form(json.dumps({"provider": {"base_url": "ftp://x"}, "model": ""}))
    return registry_pb2.RegistryVersion(
        agent=AGENT, version_id=outrider.version_id_of(canonical), canonical_json=canonical
    )


async def test_registry_rejects_forged_unsigned_and_mismatched_records(
    broker: EmbeddedBroker, sim: SimProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SIM_KEY", API_KEY)
    config = sidecar_config(sim, kafka=broker.bootstrap_servers, metrics_port=None)
    forged = forged_versions(sim)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        async with Collector(settings_for(broker)) as collector, Sidecar(config) as running:
            before = set(running.versions)
            for key, value, headers in forged.values():
                await producer.send_and_wait(outrider.VERSIONS_TOPIC, value, key=key, headers=headers)
            invalid = invalid_version()
            key, value, headers = _record(invalid, TEST_SIGNER)
            await producer.send_and_wait(outrider.VERSIONS_TOPIC, value, key=key, headers=headers)
            # then a legit push: once it is in, every record before it was read
            pushed = parse_version_file(version_document(sim))
            async with admin_channel(collector.admin_address) as channel:
                response = await admin_pb2_grpc.AdminStub(channel).PushVersion(
                    registry_pb2.PushVersionRequest(
                        agent=AGENT,
                        version_id=pushed.version_id,
                        label="v3",
                        canonical_json=pushed.canonical_json(),
                    )
                )
                assert not response.already_present
                # the collector checks the id itself, and the canonical form
                with pytest.raises(grpc.aio.AioRpcError) as wrong:
                    await admin_pb2_grpc.AdminStub(channel).PushVersion(
                        registry_pb2.PushVersionRequest(
                            agent=AGENT,
                            version_id="0123456789ab",
                            canonical_json=pushed.canonical_json(),
                            source_name="v.yaml",
                        )
                    )
                assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert wrong.value.details() == (
                    "v.yaml: version_id: 0123456789ab does not match the content, "
                    f"which hashes to {pushed.version_id}"
                )
                with pytest.raises(grpc.aio.AioRpcError) as spaced:
                    await admin_pb2_grpc.AdminStub(channel).PushVersion(
                        registry_pb2.PushVersionRequest(
                            agent=AGENT,
                            version_id=pushed.version_id,
                            canonical_json=json.dumps(json.loads(pushed.canonical_json()), indent=1),
                        )
                    )
                assert spaced.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "canonical_json: not in canonical form" in (spaced.value.details() or "")
            await eventually(lambda: pushed.version_id in running.versions, what="the legit version")
            assert set(running.versions) == before | {pushed.version_id}

            def rejected(metric: Any) -> dict[str, float]:
                return {
                    s.labels["reason"]: s.value
                    for family in metric.collect()
                    for s in family.samples
                    if s.name.endswith("_total")
                }

            at_sidecar = rejected(running.metrics.versions_rejected)
            assert {reason: at_sidecar.get(reason) for reason in forged} == dict.fromkeys(forged, 1.0), (
                at_sidecar
            )
            assert at_sidecar.get("invalid") == 1.0  # only the sidecar's own model finds this out
            await eventually(
                lambda: collector.registry.get(AGENT, pushed.version_id) is not None, what="the view"
            )
            at_collector = rejected(collector.metrics.versions_rejected)
            assert {reason: at_collector.get(reason) for reason in forged} == dict.fromkeys(forged, 1.0), (
                at_collector
            )
            listed = {v.version_id for v in collector.registry.listing(AGENT).versions if v.in_registry}
            assert listed == {pushed.version_id, invalid.version_id}
    finally:
        await producer.stop()
