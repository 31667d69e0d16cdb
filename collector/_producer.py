"""The collector's Kafka producer: every write waits for the broker's acknowledgement.

aiokafka leaks its bootstrap connection when a client's `start()` is cancelled while it asks
the broker for metadata (the connection is a local of `bootstrap()`, so `stop()` never sees
it; garbage collection then warns "Unclosed AIOKafkaConnection"). So `start_client` never
interrupts a start: on a timeout or a cancellation it lets the start end on its own (bounded
by the client's request timeout) and stops the client after it, then raises.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from aiokafka import AIOKafkaProducer


class KafkaClient(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


_cleanups: set[asyncio.Task[None]] = set()  # stops that outlive a cancelled caller


async def start_client(client: KafkaClient, timeout_s: float) -> None:
    """Start `client` within `timeout_s`; when that fails, times out or is cancelled, the
    client is stopped (after its start ended) before the error propagates."""
    starting = asyncio.ensure_future(client.start())
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 it may swallow a cancel
            await asyncio.shield(starting)
    except BaseException:
        cleanup = asyncio.ensure_future(_stop_after(starting, client))
        _cleanups.add(cleanup)
        cleanup.add_done_callback(_cleanups.discard)
        # cancelled again meanwhile, the cleanup still runs to its end in the background
        await asyncio.shield(cleanup)
        raise


async def _stop_after(starting: asyncio.Future[None], client: KafkaClient) -> None:
    await asyncio.wait({starting})
    if not starting.cancelled():
        starting.exception()  # retrieved: the caller already has its own error
    with contextlib.suppress(Exception):
        await client.stop()


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
    await start_client(producer, timeout_s)
    return producer
