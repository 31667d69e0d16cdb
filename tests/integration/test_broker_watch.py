"""The broker watch tells a new or emptied broker from a quiet one, on real Tansu brokers.

A new broker on the same address may hold fewer records on the marker's partition than the
old one (Tansu answers a fetch past the end with no records, not an out-of-range error), more
records (another record at the marker's offset), or no control topic at all. Each is new. A
broker that is only quiet, or only unreachable, is not.
"""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

import outrider
from collector._control import ensure_topics
from collector._control_state import BrokerWatch
from devstack.broker import EmbeddedBroker, free_port

pytestmark = pytest.mark.broker

TIMEOUT_S = 5.0


async def write_control(bootstrap: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        for i in range(count):
            await producer.send_and_wait(outrider.CONTROL_TOPIC, b"x%d" % i, key=b"other", partition=0)
    finally:
        await producer.stop()


async def test_the_same_broker_keeps_its_marker_however_much_is_written_after_it() -> None:
    with EmbeddedBroker() as broker:
        await write_control(broker.bootstrap_servers, 3)
        watch = BrokerWatch(broker.bootstrap_servers, "g/r1", TIMEOUT_S)
        assert not await watch.lost(), "before a marker there is nothing to lose"
        await watch.mark()
        await write_control(broker.bootstrap_servers, 5)
        assert not await watch.lost()
        assert not await watch.lost()


@pytest.mark.parametrize(
    ("before", "after", "why"),
    [
        (6, 2, "fewer records on the new broker: the marker's offset is past its end"),
        (6, 0, "the new broker has the topic but nothing on the marker's partition"),
        (0, 9, "more records on the new broker: another record holds the marker's offset"),
        (0, None, "the new broker has no control topic at all"),
    ],
)
async def test_a_new_broker_on_the_same_port_is_seen(before: int, after: int | None, why: str) -> None:
    port = free_port()
    broker = EmbeddedBroker(port=port)
    broker.start()
    try:
        await write_control(broker.bootstrap_servers, before)
        watch = BrokerWatch(broker.bootstrap_servers, "g/r1", TIMEOUT_S)
        await watch.mark()
        assert not await watch.lost()
        broker.stop()
        broker = EmbeddedBroker(port=port)
        broker.start()
        if after is not None:
            await ensure_topics(broker.bootstrap_servers, 4)
            await write_control(broker.bootstrap_servers, after)
        assert await watch.lost(), why
        # once marked again on the new broker, it is the known one
        await watch.mark()
        assert not await watch.lost()
    finally:
        broker.stop()


async def test_an_unreachable_broker_is_not_called_new() -> None:
    port = free_port()
    broker = EmbeddedBroker(port=port)
    broker.start()
    try:
        watch = BrokerWatch(broker.bootstrap_servers, "g/r1", 1.0)
        await watch.mark()
    finally:
        broker.stop()
    with pytest.raises((KafkaError, TimeoutError, OSError)):
        await watch.lost()
