"""The `outrider.events` consumer: a consumer-group member that feeds the rolling windows,
the cumulative totals and, with usage reports (which are not requests), the quota leases.

Exactly-once counting over at-least-once delivery:
- events are deduplicated by id (the windows keep the ids);
- every `checkpoint_interval_s`, on partition revoke and on stop, the state (windows with
  their ids, totals) is checkpointed TOGETHER with the next offset of every partition it
  covers, atomically; only then are those offsets committed to the group;
- on start the checkpoint is loaded, and on assignment each partition is sought to its
  checkpointed offset, so what came after it is read and applied again, once.
Records that do not decode go to the dead-letter topic before the checkpoint that covers
them. A batch, its dead letters and a checkpoint never interleave (one lock).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

import outrider
from collector._book import EvidenceBook
from collector._checkpoint import Checkpoint, CheckpointError, CheckpointStore, encode
from collector._deadletter import DeadLetterWriter
from collector._ingest import Ingestor
from collector._totals import AgentTotals
from outrider.clock import Clock

log = logging.getLogger(__name__)

_POLL_MS = 500
_ERROR_BACKOFF_S = 1.0


class _CheckpointOnRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: EventConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._owner.checkpoint()

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._owner.seek_to_checkpoint(assigned)


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
        self._consumer.subscribe([outrider.EVENTS_TOPIC], listener=_CheckpointOnRebalance(self))
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._started = False
        self._dirty = False  # applied records not yet checkpointed
        self.batches = 0
        self.checkpoints = 0
        self.restored_from: Checkpoint | None = None

    @property
    def positions(self) -> dict[tuple[str, int], int]:
        return dict(self._ingestor.positions)

    def restore(self) -> Checkpoint | None:
        """Load the checkpoint (if any) into the windows, totals and positions. Call before start."""
        if self._store is None:
            return None
        try:
            checkpoint = self._store.load(self._bootstrap)
        except CheckpointError as exc:
            log.error(  # noqa: TRY400 - the reason is in the message
                "cannot use checkpoint %s (%s); starting from the group's offsets", self._store.path, exc
            )
            return None
        if checkpoint is None:
            log.info("no checkpoint at %s; starting from the group's committed offsets", self._store.path)
            return None
        try:  # each load replaces all or nothing; the totals and evidence are tried first
            AgentTotals().load_state(checkpoint.totals)
            evidence = checkpoint.extra.get("evidence")
            if evidence is not None:
                EvidenceBook().load_state(evidence)
            self._ingestor.windows.load_state(checkpoint.windows)
            self._metrics.totals.load_state(checkpoint.totals)
            if evidence is not None:
                self._ingestor.evidence.load_state(evidence)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("checkpoint %s does not fit these settings (%s); ignoring it", self._store.path, exc)  # noqa: TRY400
            return None
        self._ingestor.positions.update(checkpoint.offsets)
        try:
            self._ingestor.gaps.load_state(checkpoint.extra.get("gaps") or {})
        except (ValueError, TypeError) as exc:
            log.warning("checkpoint %s: ignoring the sequence-gap state (%s)", self._store.path, exc)
        self.restored_from = checkpoint
        log.info(
            "restored checkpoint %s from %.1fs ago: offsets %s",
            self._store.path,
            max(0.0, time.time() - checkpoint.written_at),
            {f"{t}[{p}]": o for (t, p), o in sorted(checkpoint.offsets.items())},
        )
        return checkpoint

    def seek_to_checkpoint(self, assigned: Iterable[TopicPartition]) -> None:
        """Move newly assigned partitions to where the state ends (others keep the group offset)."""
        sought = {}
        for tp in assigned:
            position = self._ingestor.positions.get((tp.topic, tp.partition))
            if position is not None:
                self._consumer.seek(tp, position)
                sought[tp.partition] = position
        log.info(
            "consuming %s partitions %s (from checkpoint: %s)",
            outrider.EVENTS_TOPIC,
            sorted(tp.partition for tp in assigned),
            sought or "none",
        )

    async def reset_positions(self) -> None:
        """A new broker: the events log starts again at 0, so the positions (and the checkpoint's
        offsets) of the old log mean nothing. Read every assigned partition from its start;
        redelivered events are dropped by id."""
        async with self._lock:
            for key in list(self._ingestor.positions):
                if key[0] == outrider.EVENTS_TOPIC:
                    self._ingestor.positions[key] = 0
            self._dirty = True
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
            try:
                batch = await self._consumer.getmany(timeout_ms=_POLL_MS, max_records=self._max_records)
            except KafkaError as exc:
                log.warning("fetching events failed: %s; retrying", exc)
                await asyncio.sleep(_ERROR_BACKOFF_S)
                continue
            if batch:
                async with self._lock:
                    dead = []
                    now = self._clock.now()
                    for records in batch.values():
                        dead.extend(self._ingestor.apply(records, now))
                    self._dirty = True
                    if dead:
                        if self._deadletter is not None:
                            await self._deadletter.write(dead)
                        else:
                            log.warning("%d undecodable records skipped (no dead-letter writer)", len(dead))
                self.batches += 1
            if self._store is None:
                if batch:
                    await self.checkpoint()  # nothing to write: commit after each batch
            elif loop.time() >= next_checkpoint:
                await self.checkpoint()
                next_checkpoint = loop.time() + self._checkpoint_interval_s

    def request_stop(self) -> None:
        """Ask `run` to return after the batch in hand."""
        self._stopping.set()

    async def checkpoint(self) -> None:
        """Write the state with its offsets (when there is a store), then commit those offsets.

        Failures are logged: the previous checkpoint and commit stand, records come again.
        """
        if not self._started:
            return
        async with self._lock:
            offsets = dict(self._ingestor.positions)
            if self._store is not None and self._dirty:
                began = time.perf_counter()
                snapshot = Checkpoint(
                    offsets=offsets,
                    windows=self._ingestor.windows.to_state(),
                    totals=self._metrics.totals.to_state(),
                    bootstrap=self._bootstrap,
                    written_at=time.time(),
                    extra={
                        "evidence": self._ingestor.evidence.to_state(),
                        "gaps": self._ingestor.gaps.to_state(),
                    },
                )
                data = encode(snapshot)  # here, under the lock: the state cannot move meanwhile
                try:
                    await asyncio.to_thread(self._store.write, data)
                except OSError as exc:
                    self._metrics.checkpoints.labels("failed").inc()
                    log.error(  # noqa: TRY400 - the reason is in the message
                        "writing checkpoint %s failed: %s; offsets not committed", self._store.path, exc
                    )
                    return
                self._dirty = False
                self.checkpoints += 1
                self._metrics.checkpoints.labels("written").inc()
                self._metrics.checkpoint_bytes.set(len(data))
                self._metrics.checkpoint_duration.observe(time.perf_counter() - began)
            await self._commit(offsets)

    async def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        assigned = self._consumer.assignment()
        to_commit = {
            tp: OffsetAndMetadata(offset, "")
            for (topic, partition), offset in offsets.items()
            if (tp := TopicPartition(topic, partition)) in assigned
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
            await self._consumer.stop()
