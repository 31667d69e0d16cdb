"""Usage reports from every partition reach the one granter (the owner of partition 0).

Sidecars key their usage reports by agent like every event, so with several partitions each
replica sees only the reports of its own agents. When partition 0 is held elsewhere, the
ingest step picks out the usage reports it consumes from other partitions; this writes a copy
of each to partition 0 of
`outrider.events` with a `outrider-usage-relayed` header (a copy is never relayed again) and
no sequence number (the copy is not the sidecar's event, so no gap is counted for it).
Leases are soft state: a copy lost or doubled changes one lease renewal, nothing else; the
producer is started only when there is something to relay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

import outrider
from collector._producer import start_producer
from outrider.v1 import events_pb2

log = logging.getLogger(__name__)

RELAYED_HEADER = "outrider-usage-relayed"
GRANTER_PARTITION = 0
MAX_PENDING = 10_000  # reports held for the next write; past this the oldest are dropped


def is_relayed(headers: object) -> bool:
    return any(k == RELAYED_HEADER for k, _ in (headers or ()))  # type: ignore[attr-defined]


class UsageRelay:
    def __init__(self, bootstrap: str, timeout_s: float, granter_here: Callable[[], bool]) -> None:
        self._bootstrap, self._timeout_s = bootstrap, timeout_s
        self.granter_here = granter_here  # this replica holds partition 0: it saw the report
        self._producer: AIOKafkaProducer | None = None
        # one lazy start at a time, and none after stop: a second or late producer would leak
        self._producer_lock = asyncio.Lock()
        self._closed = False
        self.pending: list[events_pb2.Event] = []
        self.relayed = 0

    def add(self, event: events_pb2.Event) -> None:
        if self.granter_here():
            return
        self.pending.append(event)
        if len(self.pending) > MAX_PENDING:
            del self.pending[: len(self.pending) - MAX_PENDING]

    async def flush(self) -> None:
        """Write what is pending to partition 0; what fails is dropped (the next report renews)."""
        if not self.pending or self._closed:
            return
        batch, self.pending = self.pending, []
        try:
            producer = await self._started()
            if producer is None:
                return  # stopped meanwhile
            for event in batch:
                copy = events_pb2.Event()
                copy.CopyFrom(event)
                copy.sequence = 0
                value, headers = outrider.encode_event(copy)
                await asyncio.wait_for(
                    producer.send_and_wait(
                        outrider.EVENTS_TOPIC,
                        value,
                        key=outrider.agent_key(event.agent),
                        headers=[*headers, (RELAYED_HEADER, b"1")],
                        partition=GRANTER_PARTITION,
                    ),
                    self._timeout_s,
                )
                self.relayed += 1
        except (KafkaError, TimeoutError, OSError) as exc:
            why = exc or type(exc).__name__
            log.warning("relaying %d usage reports to the granter failed: %s", len(batch), why)

    async def _started(self) -> AIOKafkaProducer | None:
        async with self._producer_lock:
            if self._producer is None and not self._closed:
                self._producer = await start_producer(self._bootstrap, self._timeout_s)
            return self._producer

    async def stop(self) -> None:
        async with self._producer_lock:  # a start under way ends first, then is stopped
            self._closed = True
            producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
