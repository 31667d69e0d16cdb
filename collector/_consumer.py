"""The `outrider.events` consumer: a consumer-group member that feeds the rolling windows,
the cumulative totals and, with usage reports (which are not requests), the quota leases.

Exactly-once counting over at-least-once delivery:
- events are deduplicated by id (the windows keep the ids);
- every `checkpoint_interval_s`, on partition revoke and on stop, the state of each held
  partition's agents (windows with their ids, totals, evidence) is checkpointed TOGETHER with
  that partition's next offset, atomically, one file per partition; only then are those
  offsets committed to the group;
- on assignment each partition's state is taken from its checkpoint when that is further
  along than what this process holds (another replica owned it meanwhile, or this is a
  restart), and the partition is sought to the offset that state ends at, so what came
  after it is read and applied again, once.
Records that do not decode go to the dead-letter topic before the checkpoint that covers
them. A batch, its dead letters, a checkpoint and a rebalance never interleave (one lock).

Rebalances drive ownership (`collector._ownership`): a revoke stops this replica deciding for
the partition's agents first, then checkpoints; an assignment restores the state, then lets
the collector restore the partition's rollouts (`on_assigned`) before it decides anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_fixed

import outrider
from collector._book import EvidenceBook
from collector._checkpoint import Checkpoint, CheckpointError, CheckpointStore, encode, gc_paused
from collector._deadletter import DeadLetterWriter
from collector._ingest import Ingestor
from collector._ownership import Ownership
from collector._totals import AgentTotals
from outrider.clock import Clock

log = logging.getLogger(__name__)

_POLL_MS = 500
_ERROR_BACKOFF_S = 1.0


PartitionHook = Callable[[set[int]], Awaitable[None]]


def _fetch_failed(state: RetryCallState) -> None:
    log.warning("fetching events failed: %s; retrying", state.outcome.exception() if state.outcome else "?")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: EventConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._owner.revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._owner.assigned(assigned)


class EventConsumer:
    """Reads event batches through an `Ingestor` until stopped."""

    def __init__(
        self,
        bootstrap: str,
        group_id: str,
        ingestor: Ingestor,
        clock: Clock,
        max_records: int,
        *,
        deadletter: DeadLetterWriter | None = None,
        store: CheckpointStore | None = None,
        checkpoint_interval_s: float = 5.0,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        ownership: Ownership | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._ingestor, self._clock = ingestor, clock
        self._metrics = ingestor.metrics
        self._deadletter, self._store = deadletter, store
        self._max_records = max_records
        self._checkpoint_interval_s = checkpoint_interval_s
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
        )
        self._consumer.subscribe([outrider.EVENTS_TOPIC], listener=_Rebalance(self))
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._started = False
        self._dirty: set[int] = set()  # partitions with applied records not yet checkpointed
        self._held: set[int] = set()  # the events partitions of the current assignment
        self.ownership = ownership if ownership is not None else Ownership()
        # the collector's hooks: a revoke waits for the decision in hand; an assignment restores
        # the partition's rollouts and marks it ready; released partitions' rollouts are dropped
        self.on_revoked: PartitionHook | None = None
        self.on_assigned: PartitionHook | None = None
        self.on_released: Callable[[set[int]], None] | None = None
        self.batches = 0
        self.checkpoints = 0

    @property
    def positions(self) -> dict[tuple[str, int], int]:
        return dict(self._ingestor.positions)

    async def revoked(self, tps: Iterable[TopicPartition]) -> None:
        """Stop deciding for the partitions' agents first, then checkpoint and commit them."""
        partitions = {tp.partition for tp in tps if tp.topic == outrider.EVENTS_TOPIC}
        self.ownership.revoke(partitions)
        if self.on_revoked is not None and partitions:
            await self.on_revoked(partitions)
        await self.checkpoint()

    async def assigned(self, tps: Iterable[TopicPartition]) -> None:
        """Take the new assignment: forget what is no longer held, restore each partition's
        state, seek, then let the collector restore the rollouts before anything is decided."""
        tps = [tp for tp in tps if tp.topic == outrider.EVENTS_TOPIC]
        partitions = {tp.partition for tp in tps}
        known = self._consumer.partitions_for_topic(outrider.EVENTS_TOPIC) or set()
        total = max(len(known), max(partitions) + 1 if partitions else 0, self.ownership.partitions)
        released = self._held - partitions
        self.ownership.assigning(partitions, total)
        async with self._lock:
            if released:
                self._forget(released)
            for partition in sorted(partitions):
                self._restore_partition(partition)
            self._held = set(partitions)
            sought = {}
            for tp in tps:
                position = self._ingestor.positions.get((tp.topic, tp.partition))
                if position is not None:
                    self._consumer.seek(tp, position)
                    sought[tp.partition] = position
        log.info(
            "consuming %s partitions %s of %d (from checkpoint: %s)",
            outrider.EVENTS_TOPIC,
            sorted(partitions),
            total,
            sought or "none",
        )
        if released and self.on_released is not None:
            self.on_released(released)
        if self.on_assigned is not None:
            await self.on_assigned(partitions)
        else:
            self.ownership.mark_ready(partitions)

    def _forget(self, partitions: set[int]) -> None:
        """Drop the state of partitions another replica holds now (it reports and decides them)."""
        agents = self.ownership.agents_of(partitions)
        self._ingestor.windows.forget(agents)
        self._metrics.totals.forget(agents)
        self._ingestor.evidence.forget(agents)
        self._ingestor.gaps.forget(agents)
        for partition in partitions:
            self._ingestor.positions.pop((outrider.EVENTS_TOPIC, partition), None)
            self._dirty.discard(partition)

    def _restore_partition(self, partition: int) -> None:
        """Take the partition's checkpoint when it is further along than the state held here."""
        if self._store is None:
            return
        try:
            checkpoint = self._store.load(self._bootstrap, partition)
        except CheckpointError as exc:
            log.error("cannot use the checkpoint of partition %d (%s)", partition, exc)  # noqa: TRY400
            return
        where = (outrider.EVENTS_TOPIC, partition)
        offset = checkpoint.offsets.get(where) if checkpoint is not None else None
        mine = self._ingestor.positions.get(where)
        if checkpoint is None or offset is None or (mine is not None and mine >= offset):
            if mine is None:
                log.info("partition %d: no checkpoint; starting from the group's committed offset", partition)
            return
        agents = self.ownership.agents_of([partition])
        evidence = checkpoint.extra.get("evidence")
        try:  # each load replaces all or nothing: the totals and evidence are tried first
            AgentTotals().load_state(checkpoint.totals, agents)
            if evidence is not None:
                EvidenceBook().load_state(evidence, agents)
            self._ingestor.windows.load_state(checkpoint.windows, agents)
            self._metrics.totals.load_state(checkpoint.totals, agents)
            if evidence is not None:
                self._ingestor.evidence.load_state(evidence, agents)
        except (ValueError, KeyError, TypeError) as exc:
            log.error(  # noqa: TRY400 - the reason is in the message
                "the checkpoint of partition %d does not fit these settings (%s); ignoring it", partition, exc
            )
            return
        try:
            self._ingestor.gaps.load_state(checkpoint.extra.get("gaps") or {}, agents)
        except (ValueError, TypeError) as exc:
            log.warning("partition %d: ignoring the sequence-gap state (%s)", partition, exc)
        self._ingestor.positions[where] = offset
        log.info(
            "partition %d: restored the checkpoint from %.1fs ago at offset %d",
            partition,
            max(0.0, time.time() - checkpoint.written_at),
            offset,
        )

    async def reset_positions(self) -> None:
        """A new broker: the events log starts again at 0, so the positions (and the checkpoint's
        offsets) of the old log mean nothing. Read every assigned partition from its start;
        redelivered events are dropped by id."""
        async with self._lock:
            for key in list(self._ingestor.positions):
                if key[0] == outrider.EVENTS_TOPIC:
                    self._ingestor.positions[key] = 0
            self._dirty |= self._held
            if self._started:
                for tp in self._consumer.assignment():
                    self._consumer.seek(tp, 0)
        log.warning("consuming %s from offset 0 of the new log", outrider.EVENTS_TOPIC)

    async def start(self) -> None:
        if not self._started:
            try:
                await self._consumer.start()
            except BaseException:
                await self._consumer.stop()
                raise
            self._started = True

    async def run(self) -> None:
        """The consume loop, until `request_stop()` (or cancellation)."""
        loop = asyncio.get_running_loop()
        next_checkpoint = loop.time() + self._checkpoint_interval_s
        while not self._stopping.is_set():
            batch = await self._fetch()
            if batch is None:
                break
            if batch:
                async with self._lock:
                    dead = []
                    now = self._clock.now()
                    for records in batch.values():
                        dead.extend(self._ingestor.apply(records, now))
                    self._dirty.update(tp.partition for tp in batch)
                    if dead:
                        if self._deadletter is not None:
                            await self._deadletter.write(dead)
                        else:
                            log.warning("%d undecodable records skipped (no dead-letter writer)", len(dead))
                self.batches += 1
                if self._ingestor.usage_relay is not None:
                    await self._ingestor.usage_relay.flush()
            if self._store is None:
                if batch:
                    await self.checkpoint()  # nothing to write: commit after each batch
            elif loop.time() >= next_checkpoint:
                await self.checkpoint()
                next_checkpoint = loop.time() + self._checkpoint_interval_s

    async def _fetch(self) -> dict[TopicPartition, list[Any]] | None:
        """getmany, retried through tenacity every `_ERROR_BACKOFF_S` while Kafka fails;
        None when stop was asked while waiting to retry. The first attempt goes to aiokafka
        directly: tenacity's bookkeeping on every fetch was 2% of the ingest time."""
        try:
            return await self._getmany()
        except KafkaError as exc:
            log.warning("fetching events failed: %s; retrying", exc)
        await asyncio.sleep(_ERROR_BACKOFF_S)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(KafkaError),
            wait=wait_fixed(_ERROR_BACKOFF_S),
            before_sleep=_fetch_failed,
            reraise=True,
        ):
            with attempt:
                if self._stopping.is_set():
                    return None
                return await self._getmany()
        raise AssertionError("unreachable: tenacity without a stop returns or raises")

    async def _getmany(self) -> dict[TopicPartition, list[Any]]:
        batch: dict[TopicPartition, list[Any]] = await self._consumer.getmany(
            timeout_ms=_POLL_MS, max_records=self._max_records
        )
        return batch

    def request_stop(self) -> None:
        """Ask `run` to return after the batch in hand."""
        self._stopping.set()

    async def checkpoint(self) -> None:
        """Write the state of every held partition with its offset (when there is a store),
        then commit those offsets.

        Failures are logged: the previous checkpoint and commit stand, records come again.
        """
        if not self._started:
            return
        async with self._lock:
            positions = self._ingestor.positions
            offsets = {
                (topic, p): o
                for (topic, p), o in positions.items()
                if topic == outrider.EVENTS_TOPIC and p in self._held
            }
            if self._store is not None:
                for partition in sorted(self._dirty & self._held):
                    if not await self._write(partition, offsets):
                        return
            await self._commit(offsets)

    async def _write(self, partition: int, offsets: dict[tuple[str, int], int]) -> bool:
        assert self._store is not None
        where = (outrider.EVENTS_TOPIC, partition)
        if where not in offsets:
            return True
        began = time.perf_counter()
        agents = self.ownership.agents_of([partition])
        with gc_paused():
            snapshot = Checkpoint(
                offsets={where: offsets[where]},
                windows=self._ingestor.windows.to_state(agents),
                totals=self._metrics.totals.to_state(agents),
                bootstrap=self._bootstrap,
                written_at=time.time(),
                extra={
                    "evidence": self._ingestor.evidence.to_state(agents),
                    "gaps": self._ingestor.gaps.to_state(agents),
                },
            )
            data = encode(snapshot)  # here, under the lock: the state cannot move meanwhile
            del snapshot  # freed here, while the collector is still held off
        try:
            await asyncio.to_thread(self._store.write, partition, data)
        except OSError as exc:
            self._metrics.checkpoints.labels("failed").inc()
            log.error(  # noqa: TRY400 - the reason is in the message
                "writing checkpoint %s failed: %s; offsets not committed", self._store.path(partition), exc
            )
            return False
        self._dirty.discard(partition)
        self.checkpoints += 1
        self._metrics.checkpoints.labels("written").inc()
        self._metrics.checkpoint_bytes.set(len(data))
        self._metrics.checkpoint_duration.observe(time.perf_counter() - began)
        return True

    async def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        to_commit = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "")
            for (topic, partition), offset in offsets.items()
        }
        if not to_commit:
            return
        try:
            await self._consumer.commit(to_commit)
        except KafkaError as exc:
            log.warning("committing %s offsets failed: %s", outrider.EVENTS_TOPIC, exc)

    async def stop(self) -> None:
        """Checkpoint, commit, leave the group. Idempotent."""
        self._stopping.set()
        if self._started:
            await self.checkpoint()
            self._started = False
        await self._consumer.stop()  # also when never started: it was made, so it is closed
