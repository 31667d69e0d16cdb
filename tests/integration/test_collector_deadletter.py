"""Test (d): records the collector cannot decode land in `outrider.deadletter` with their
original key, value and headers plus the reason and source, are counted, and the collector
keeps counting the good events around them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

import outrider
from collector import Collector, CollectorSettings
from collector._deadletter import reason_class
from devstack.broker import EmbeddedBroker
from outrider.v1 import common_pb2, events_pb2
from tests.support import scrape

pytestmark = pytest.mark.broker

AGENT = "support-bot"


def good_event(i: int) -> events_pb2.Event:
    event = events_pb2.Event(
        event_id=f"good-{i}",
        time_unix_nano=time.time_ns(),
        agent=AGENT,
        version_id="v1",
        role=common_pb2.ROLE_STABLE,
    )
    event.call.latency_ms = 10
    event.call.outcome = events_pb2.OUTCOME_OK
    return event


async def read_deadletters(broker: EmbeddedBroker, count: int, within: float = 20.0) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(
        outrider.DEADLETTER_TOPIC,
        bootstrap_servers=broker.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
    )
    records: list[ConsumerRecord] = []
    await consumer.start()
    try:
        deadline = time.monotonic() + within
        while len(records) < count:
            assert time.monotonic() < deadline, f"only {len(records)} dead letters arrived"
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def test_undecodable_records_are_dead_lettered(broker: EmbeddedBroker, tmp_path: Path) -> None:
    value, headers = outrider.encode_event(good_event(0))
    newer = [(k, b"99" if k == outrider.SCHEMA_HEADER else v) for k, v in headers]
    no_id = events_pb2.Event(agent=AGENT)
    no_id.call.latency_ms = 1
    bad_records: list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]] = [
        (b"k-garbage", b"\xff\x00 not protobuf", []),
        (b"k-newer", value, newer),
        (b"k-noid", no_id.SerializeToString(), headers),
        (b"k-type", value, [(outrider.CONTENT_TYPE_HEADER, b"text/plain")]),
        (b"k-empty", None, []),
    ]
    settings = CollectorSettings.model_validate(
        {
            "kafka_bootstrap": broker.bootstrap_servers,
            "admin_listen": "127.0.0.1:0",
            "metrics_port": 0,
            "recovery_idle_s": 0.3,
            "state_dir": str(tmp_path / "state"),
            "checkpoint_interval_s": 0.2,
        }
    )
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        async with Collector(settings) as collector:
            for i, (key, bad_value, bad_headers) in enumerate(bad_records):
                good_value, good_headers = outrider.encode_event(good_event(i + 1))
                await producer.send_and_wait(
                    outrider.EVENTS_TOPIC, good_value, key=b"k", headers=good_headers
                )
                await producer.send_and_wait(outrider.EVENTS_TOPIC, bad_value, key=key, headers=bad_headers)
            letters = await read_deadletters(broker, len(bad_records))

            url = f"http://127.0.0.1:{collector.metrics_port}/metrics"
            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 10
                while True:  # the good events after the last bad one are applied too
                    samples = await scrape(http, url)
                    requests = sum(v for n, _, v in samples if n == "outrider_requests_total")
                    if requests == len(bad_records) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
            assert requests == len(bad_records)  # the collector kept going past every bad record
            dead = {
                labels["reason"]: v for n, labels, v in samples if n == "outrider_collector_deadletter_total"
            }
            assert dead == {
                "not_protobuf": 1,
                "newer_schema": 1,
                "missing_fields": 1,
                "unknown_type": 1,
                "empty": 1,
            }
    finally:
        await producer.stop()

    by_key = {r.key: r for r in letters}
    assert set(by_key) == {k for k, _, _ in bad_records}
    for key, bad_value, bad_headers in bad_records:
        letter = by_key[key]
        found = dict(letter.headers)
        assert letter.value == bad_value
        assert list(letter.headers)[: len(bad_headers)] == bad_headers  # the originals come first
        assert found["outrider-dlq-source-topic"] == outrider.EVENTS_TOPIC.encode()
        assert found["outrider-dlq-source-partition"] == b"0"
        assert int(found["outrider-dlq-source-offset"]) % 2 == 1  # every second record was bad
        assert found["outrider-dlq-reason"]
        assert (
            found["outrider-dlq-reason-class"] == reason_class(found["outrider-dlq-reason"].decode()).encode()
        )
    assert b"newer" in dict(by_key[b"k-newer"].headers)["outrider-dlq-reason"]
    assert dict(by_key[b"k-garbage"].headers)["outrider-dlq-reason-class"] == b"not_protobuf"
