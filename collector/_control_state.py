"""Control state that survives the broker: the collector's own copy, and the broker watch.

- `StateCopy`: the newest signed rollout record of every agent, as published, in
  `state_dir/<group>.control.json` (written after every publish). A collector that finds
  the control topic empty or missing republishes from it. It is verified on load like a
  record from the topic. Replicas that share `state_dir` merge into the one file under a
  lock, each agent's newest record winning, so none overwrites another's agents.
- `BrokerWatch`: an incarnation marker. At start (and after each recovery) the collector
  writes `marker/collector/<group>/<replica>` with a random nonce to `outrider.control` and
  remembers its offset; every `broker_check_interval_s` it reads that offset back. A missing topic,
  an offset out of range, a fetch whose high watermark is at or below the offset (a broker
  that answers an offset past its end with an empty fetch, as Tansu does, instead of an
  out-of-range error), or another record there means a new or emptied broker, which a
  quiet broker never looks like. `end_offsets` (ListOffsets) is never used; the high
  watermark comes from the fetch response itself.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

import outrider
from collector._control import ControlHistory, add_record
from collector._producer import start_client, start_producer

log = logging.getLogger(__name__)

_CHECK_POLL_MS = 1000


class StateCopy:
    """The collector's copy of the control state in `state_dir`."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(
        self, verifier: outrider.Verifier, on_reject: Callable[[str], None] | None = None
    ) -> ControlHistory:
        history = ControlHistory()
        if self.path is None:
            return history
        try:
            records, _ = outrider.load_records(self.path)
        except ValueError as exc:
            log.error("ignoring the control state copy: %s", exc)  # noqa: TRY400
            return history
        for record in records:
            add_record(history, verifier, record, on_reject)
        if history.latest:
            log.info("control state copy %s: %d agents", self.path, len(history.latest))
        return history

    async def save(self, records: dict[str, outrider.SignedRecord], verifier: outrider.Verifier) -> None:
        if self.path is None:
            return
        try:
            await asyncio.to_thread(self._merge_and_write, dict(records), verifier)
        except OSError as exc:
            log.warning("cannot write the control state copy %s: %s", self.path, exc)

    def _merge_and_write(
        self, records: dict[str, outrider.SignedRecord], verifier: outrider.Verifier
    ) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            on_disk = ControlHistory()
            if self.path.exists():
                try:
                    for record in outrider.load_records(self.path)[0]:
                        add_record(on_disk, verifier, record)
                except ValueError as exc:
                    log.warning("rewriting the unreadable control state copy %s: %s", self.path, exc)
            mine = ControlHistory()
            for record in records.values():
                add_record(mine, verifier, record)
            merged = dict(on_disk.latest)
            for agent, record in mine.latest.items():
                theirs, ours = on_disk.newest(agent), mine.newest(agent)
                if theirs is None or ours is None or outrider.ordering(ours) >= outrider.ordering(theirs):
                    merged[agent] = record
            outrider.save_records(self.path, list(merged.values()))


class BrokerWatch:
    """Tells a new (or emptied) broker from a quiet one by an incarnation marker."""

    def __init__(self, bootstrap: str, name: str, timeout_s: float) -> None:
        self._bootstrap, self._timeout_s = bootstrap, timeout_s
        self.key = f"{outrider.MARKER_KEY_PREFIX}collector/{name}".encode()
        self._nonce = b""
        self._where: TopicPartition | None = None
        self._offset = -1

    async def mark(self) -> None:
        """Write a new incarnation marker; raises KafkaError or TimeoutError."""
        producer = await start_producer(self._bootstrap, self._timeout_s)
        try:
            nonce = secrets.token_hex(8).encode()
            metadata = await asyncio.wait_for(
                # always partition 0, which every incarnation of the topic has, whatever the
                # key hashes to and however many partitions a broker auto-created
                producer.send_and_wait(outrider.CONTROL_TOPIC, nonce, key=self.key, partition=0),
                self._timeout_s,
            )
        finally:
            await producer.stop()
        self._nonce = nonce
        self._where = TopicPartition(outrider.CONTROL_TOPIC, metadata.partition)
        self._offset = metadata.offset
        log.info("broker incarnation marker at %s[%d] offset %d", *self._where, self._offset)

    async def lost(self) -> bool:
        """True when the marker is gone: a new or emptied broker. Raises KafkaError or
        TimeoutError when the broker cannot be asked (unreachable is not new)."""
        if self._where is None:
            return False
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="none",
            request_timeout_ms=max(1000, int(self._timeout_s * 1000)),
        )
        try:
            await start_client(consumer, self._timeout_s)  # never cut short: see start_client
            topics = await asyncio.wait_for(consumer.topics(), self._timeout_s)
            if outrider.CONTROL_TOPIC not in topics:
                log.warning("%s is gone from the broker", outrider.CONTROL_TOPIC)
                return True
            if self._where.partition not in (consumer.partitions_for_topic(outrider.CONTROL_TOPIC) or set()):
                log.warning("%s lacks the incarnation marker's partition", outrider.CONTROL_TOPIC)
                return True
            consumer.assign([self._where])
            consumer.seek(self._where, self._offset)
            try:
                batch = await consumer.getmany(self._where, timeout_ms=_CHECK_POLL_MS, max_records=1)
            except OffsetOutOfRangeError:
                log.warning("the incarnation marker's offset %d is out of range", self._offset)
                return True
            records = batch.get(self._where, [])
            if not records:
                highwater = consumer.highwater(self._where)
                if highwater is not None and highwater <= self._offset:
                    log.warning(
                        "the incarnation marker's offset %d is past the end (%d) of %s[%d]",
                        self._offset,
                        highwater,
                        *self._where,
                    )
                    return True
                return False  # nothing came back in time: judge again next check
            record = records[0]
            if record.offset != self._offset or record.key != self.key or record.value != self._nonce:
                log.warning("another record holds the incarnation marker's offset %d", self._offset)
                return True
            return False
        finally:
            await consumer.stop()
