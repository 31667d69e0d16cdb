"""Records to Kafka one batch per partition: a future per partition, not per record.

`AIOKafkaProducer.send` costs a coroutine, a metadata wait, a partitioner call and a future
for every record, on the sidecar's event loop. `send_in_batches` puts a whole intake batch's
records into one `BatchBuilder` per (topic, partition), in order, and submits each with
`send_batch`. Keyed records go where `send` would put them (Kafka's murmur2 of the key, as
the Java clients); a record without a key goes to a random partition, as `send` does.
Records larger than a batch go through `send` alone, which refuses those over the producer's
`max_request_size` with MessageSizeTooLargeError before anything is sent.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from sidecar.telemetry._spill_models import SpillRecord

# what one BatchBuilder holds (the producer's max_batch_size); a record over it goes alone
BATCH_BYTES = 256 * 1024
HASHES_MAX = 4096  # keys' murmur2 remembered; trace ids never repeat, so it starts over when full
_hashes: dict[bytes, int] = {}


def partition_of(key: bytes | None, partitions: Sequence[int]) -> int:
    """The partition `send` would pick: murmur2(key) over every partition, sorted."""
    if len(partitions) == 1:
        return partitions[0]
    if key is None:
        return random.choice(partitions)
    hashed = _hashes.get(key)
    if hashed is None:  # murmur2 is pure Python (~5 us); events all carry their agent's key
        if len(_hashes) >= HASHES_MAX:
            _hashes.clear()
        hashed = _hashes[key] = murmur2(key) & 0x7FFFFFFF
    return partitions[hashed % len(partitions)]


async def send_in_batches(
    producer: AIOKafkaProducer, records: Sequence[SpillRecord], *, yield_every: int
) -> list[object]:
    """Every record's outcome, in order: its batch's metadata, or the exception it failed with."""
    partitions: dict[str, list[int]] = {}
    open_batches: dict[tuple[str, int], tuple[int, Any]] = {}  # -> (slot, BatchBuilder)
    slots: list[Any] = []  # a future per submitted batch (or solo record)
    slot_of: list[int] = []
    for i, r in enumerate(records, 1):
        if i % yield_every == 0:
            await asyncio.sleep(0)  # appending rarely suspends: let requests in
        headers = list(r.headers)
        known = partitions.get(r.topic)
        if known is None:
            known = partitions[r.topic] = sorted(await producer.partitions_for(r.topic))
        partition = partition_of(r.key, known)
        if len(r.value) > BATCH_BYTES:  # alone, after what its partition has before it
            if (entry := open_batches.pop((r.topic, partition), None)) is not None:
                slots[entry[0]] = await producer.send_batch(entry[1], r.topic, partition=partition)
            slot_of.append(len(slots))
            slots.append(
                await producer.send(r.topic, value=r.value, key=r.key, headers=headers, partition=partition)
            )
            continue
        entry = open_batches.get((r.topic, partition))
        if entry is not None and entry[1].append(key=r.key, value=r.value, timestamp=None, headers=headers):
            slot_of.append(entry[0])
            continue
        if entry is not None:  # full: submit it, start the next
            slots[entry[0]] = await producer.send_batch(entry[1], r.topic, partition=partition)
        batch = producer.create_batch()
        batch.append(key=r.key, value=r.value, timestamp=None, headers=headers)  # an empty one takes any
        open_batches[(r.topic, partition)] = (len(slots), batch)
        slot_of.append(len(slots))
        slots.append(None)
    for (topic, partition), (slot, batch) in open_batches.items():
        slots[slot] = await producer.send_batch(batch, topic, partition=partition)
    outcomes = await asyncio.gather(*slots, return_exceptions=True)
    return [outcomes[slot] for slot in slot_of]
