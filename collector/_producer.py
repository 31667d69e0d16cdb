"""The collector's Kafka producer: every write waits for the broker's acknowledgement."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer


async def start_producer(bootstrap: str, timeout_s: float) -> AIOKafkaProducer:
    """A started producer with `acks="all"`, not idempotent (the embedded test broker lacks
    InitProducerId); requests time out after `timeout_s`, and so does the start. A producer
    that fails to start is stopped before the error propagates."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=False,
        request_timeout_ms=max(1000, int(timeout_s * 1000)),
    )
    try:
        await asyncio.wait_for(producer.start(), timeout_s)
    except BaseException:
        await producer.stop()
        raise
    return producer
