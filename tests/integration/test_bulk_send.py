"""The telemetry producer's batch-per-partition send, on the real broker: every record lands
once, in order within its partition, on the partition `producer.send` would have picked."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from devstack.broker import EmbeddedBroker
from sidecar.telemetry._bulk_send import BATCH_BYTES, partition_of, send_in_batches
from sidecar.telemetry._spill_models import SpillRecord

pytestmark = pytest.mark.broker

PARTITIONS = 3


def test_partition_of_matches_the_default_partitioner() -> None:
    default = DefaultPartitioner()
    for n in (1, 2, 3, 12):
        parts = list(range(n))
        for i in range(200):
            key = f"key-{i}".encode()
            assert partition_of(key, parts) == default(key, parts, parts)
    assert partition_of(None, [0, 1, 2]) in (0, 1, 2)


async def _consume(bootstrap: str, topic: str, want: int) -> dict[int, list[tuple[bytes, bytes, list]]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: dict[int, list[tuple[bytes, bytes, list]]] = {}
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        seen = 0
        async with asyncio.timeout(30):
            while seen < want:
                for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                    for m in messages:
                        got.setdefault(tp.partition, []).append((m.key, m.value, list(m.headers)))
                        seen += 1
    finally:
        await consumer.stop()
    return got


async def test_every_record_lands_once_in_order_on_its_partition(broker: EmbeddedBroker) -> None:
    topic = "bulk-send-test"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False, max_batch_size=4096
    )
    await producer.start()
    try:
        records = [
            SpillRecord(
                topic, f"session-{i % 7}".encode(), f"value-{i}".encode() * (1 + i % 40), (("h", b"1"),)
            )
            for i in range(300)
        ]
        records.insert(150, SpillRecord(topic, b"big", b"x" * (BATCH_BYTES + 1)))  # goes alone
        outcomes = await send_in_batches(producer, records, yield_every=25)
        assert len(outcomes) == len(records)
        assert not [o for o in outcomes if isinstance(o, BaseException)]
        with pytest.raises(MessageSizeTooLargeError):  # refused before sending, as send() does
            await send_in_batches(producer, [SpillRecord(topic, b"k", b"x" * 2_000_000)], yield_every=25)
    finally:
        await producer.stop()
    got = await _consume(broker.bootstrap_servers, topic, len(records))
    assert sum(len(v) for v in got.values()) == len(records)
    for partition, messages in got.items():
        expected = [
            (r.key, r.value, list(r.headers))
            for r in records
            if partition_of(r.key, list(range(PARTITIONS))) == partition
        ]
        assert messages == expected  # all of them, once each, in the order given
    assert len(got) == PARTITIONS
