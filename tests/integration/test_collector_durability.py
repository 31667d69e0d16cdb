"""Test (b): a collector PROCESS killed with SIGKILL mid-stream and restarted neither loses
nor double-counts: after every event is produced, the counters it serves on /metrics equal
exactly the events produced, by version and role (and errors by class).

Events carry unique ids and flow the whole time; the collector checkpoints its windows,
totals and dedupe ids with the consumed offsets every second; the kill comes when it has
counted well past its last checkpoint, so the restarted process re-reads that stretch."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiokafka import AIOKafkaProducer

import outrider
from collector._checkpoint import decode
from devstack.broker import EmbeddedBroker, free_port
from outrider.v1 import common_pb2, events_pb2
from tests.support import Proc, scrape, wait_serving

pytestmark = pytest.mark.broker

AGENT = "support-bot"
N = 900
RATE_PER_S = 120
SERIES = [("v1", common_pb2.ROLE_STABLE, "stable"), ("v2", common_pb2.ROLE_CANARY, "canary")]


def make_event(i: int) -> events_pb2.Event:
    version, role, _ = SERIES[i % 2]
    event = events_pb2.Event(
        event_id=f"evt-{i}", time_unix_nano=time.time_ns(), agent=AGENT, version_id=version, role=role
    )
    event.call.latency_ms = 20 + i % 50
    failed = i % 7 == 0
    event.call.outcome = events_pb2.OUTCOME_ERROR if failed else events_pb2.OUTCOME_OK
    event.call.error_class = "provider_5xx" if failed else ""
    return event


def expected_counts() -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str, str]]]:
    requests: Counter[tuple[str, str]] = Counter()
    errors: Counter[tuple[str, str, str]] = Counter()
    for i in range(N):
        version, _, role = SERIES[i % 2]
        requests[(version, role)] += 1
        if i % 7 == 0:
            errors[(version, role, "provider")] += 1
    return requests, errors


def checkpoint_offset(state_dir: Path) -> int:
    """The offset the collector's checkpoint covers (0 before the first)."""
    try:
        data = (state_dir / "durable" / "events-0.ckpt").read_bytes()
    except FileNotFoundError:
        return 0
    return decode(data).offsets[(outrider.EVENTS_TOPIC, 0)]


async def counts(
    http: aiohttp.ClientSession, url: str
) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str, str]], float]:
    requests: Counter[tuple[str, str]] = Counter()
    errors: Counter[tuple[str, str, str]] = Counter()
    consumed = 0.0
    for name, labels, value in await scrape(http, url):
        if name == "outrider_requests_total":
            requests[(labels["version"], labels["role"])] += int(value)
        elif name == "outrider_errors_total":
            errors[(labels["version"], labels["role"], labels["class"])] += int(value)
        elif name == "outrider_collector_events_consumed_total":
            consumed = value
    return requests, errors, consumed


async def test_sigkill_mid_stream_neither_loses_nor_double_counts(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    admin, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    state_dir = tmp_path / "state"
    config = tmp_path / "collector.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka_bootstrap": broker.bootstrap_servers,
                "group_id": "durable",
                "admin_listen": admin,
                "metrics_port": metrics_port,
                "recovery_idle_s": 0.3,
                "bucket_s": 1,
                "retention_s": 600,
                "state_dir": str(state_dir),
                "checkpoint_interval_s": 1.0,
                # a killed member never leaves: its successor waits out this session
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
            }
        )
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    produced = 0

    async def produce() -> None:
        nonlocal produced
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
        await producer.start()
        try:
            started = time.monotonic()
            for i in range(N):
                value, headers = outrider.encode_event(make_event(i))
                await producer.send_and_wait(
                    outrider.EVENTS_TOPIC, value, key=outrider.agent_key(AGENT), headers=headers
                )
                produced = i + 1
                await asyncio.sleep(max(0.0, started + produced / RATE_PER_S - time.monotonic()))
        finally:
            await producer.stop()

    first = Proc("collector", "--config", str(config), log_path=tmp_path / "first.log")
    second: Proc | None = None
    producing: asyncio.Task[None] | None = None
    try:
        await wait_serving(admin, first)
        producing = asyncio.create_task(produce())
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:  # mid-stream, with 30+ events counted since the last checkpoint
                requests, _, _ = await counts(http, url)
                checkpointed = checkpoint_offset(state_dir)
                if checkpointed >= 100 and sum(requests.values()) >= checkpointed + 30:
                    break
                assert time.monotonic() < deadline, f"the first collector counted only {requests}"
                await asyncio.sleep(0.02)
            assert first.stop(signal.SIGKILL) == -signal.SIGKILL
            assert produced < N, "the kill was not mid-stream"
            resume_at = checkpoint_offset(state_dir)  # the dead process's last word
            assert sum(requests.values()) > resume_at

            second = Proc("collector", "--config", str(config), log_path=tmp_path / "second.log")
            await wait_serving(admin, second)
            await producing
            want_requests, want_errors = expected_counts()
            deadline = time.monotonic() + 25
            while True:
                requests, errors, consumed = await counts(http, url)
                if requests == want_requests or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # anything still arriving would be a double count
            requests, errors, consumed = await counts(http, url)
    finally:
        if producing is not None and not producing.done():
            producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producing
        first.stop(signal.SIGKILL)
        if second is not None:
            assert second.stop() == 0, second.output()

    assert requests == want_requests, second.output() if second else ""
    assert errors == want_errors
    assert "restored the checkpoint" in second.output()
    # the restart read exactly what followed its checkpoint (some of it counted before the kill)
    assert consumed == N - resume_at
