"""Which agents this collector replica owns: those whose `outrider.events` partition it holds.

Sidecars key events by agent, and the Kafka default partitioner (murmur2, the Java client's
and aiokafka's) sends every event of an agent to one partition. The consumer group gives each
partition to one replica; that replica alone decides, publishes and answers admin writes for
the partition's agents. Everyone else relays admin calls to it (`collector._commands`).

A partition held here is either restoring (assigned; its checkpoint and the control topic are
being read back, nothing is decided yet) or ready (`owns` is True). A revoke makes `owns` False
at once, before the last checkpoint, so the old owner stops deciding before the new one starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from aiokafka.partitioner import murmur2


def partition_for(agent: str, partitions: int) -> int:
    """The `outrider.events` partition of `agent`'s events (the default partitioner's choice)."""
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    return int(murmur2(agent.encode("utf-8")) & 0x7FFFFFFF) % partitions


class Ownership:
    """The partitions this replica holds, by state; agents map onto them with `partition_for`."""

    def __init__(self) -> None:
        self.partitions = 0  # of outrider.events; known from the first assignment on
        self._ready: dict[int, float] = {}  # partition -> since when (wall clock), decided here
        self._restoring: set[int] = set()
        self._settled = asyncio.Event()  # the first assignment has been restored

    def partition(self, agent: str) -> int | None:
        return partition_for(agent, self.partitions) if self.partitions else None

    def owns(self, agent: str) -> bool:
        partition = self.partition(agent)
        return partition is not None and partition in self._ready

    def restoring(self, agent: str) -> bool:
        partition = self.partition(agent)
        return partition is not None and partition in self._restoring

    def since(self, agent: str) -> float | None:
        """When this replica became the agent's owner (None: it is not)."""
        partition = self.partition(agent)
        return self._ready.get(partition) if partition is not None else None

    @property
    def settled(self) -> bool:
        return self._settled.is_set()

    @property
    def ready(self) -> frozenset[int]:
        return frozenset(self._ready)

    def holds(self, partition: int) -> bool:
        return partition in self._ready or partition in self._restoring

    def agents_of(self, partitions: Iterable[int]) -> Callable[[str], bool]:
        """A predicate: is an agent on one of `partitions`?"""
        chosen, total = frozenset(partitions), self.partitions
        known: dict[str, bool] = {}  # a checkpoint asks once per seen id: hash each agent once

        def on(agent: str) -> bool:
            mine = known.get(agent)
            if mine is None:
                mine = known[agent] = total > 0 and partition_for(agent, total) in chosen
            return mine

        return on

    def assigning(self, partitions: Iterable[int], total: int) -> None:
        self.partitions = total
        self._restoring.update(partitions)

    def mark_ready(self, partitions: Iterable[int]) -> None:
        """The partitions' rollouts are restored: decide for them (those still assigned)."""
        now = time.time()
        for partition in partitions:
            if partition in self._restoring:
                self._restoring.discard(partition)
                self._ready[partition] = now
        self._settled.set()

    def revoke(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._ready.pop(partition, None)
            self._restoring.discard(partition)

    async def wait_settled(self, timeout_s: float) -> bool:
        """Wait until the first assignment is restored; False on timeout."""
        try:
            await asyncio.wait_for(self._settled.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def wait_restored(self, agent: str, timeout_s: float, poll_s: float = 0.05) -> bool:
        """While the agent's partition is being restored here, wait; True if this replica owns it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.restoring(agent) and loop.time() < deadline:  # noqa: ASYNC110 - a restore ends in one of several ways
            await asyncio.sleep(poll_s)
        return self.owns(agent)
