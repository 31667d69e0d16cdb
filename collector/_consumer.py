"""The `outrider.events` consumer: a consumer-group member that feeds the rolling windows
and, with usage reports (which are not requests), the quota leases.

Offsets are committed by hand after each processed batch, on partition revoke and on stop,
so a record counts at least once; the windows drop duplicates by event id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

import outrider
from collector._clock import Clock
from collector._granter import QuotaGranter
from collector._metrics import CollectorMetrics
from collector._windows import Ingest, RollingWindows

log = logging.getLogger(__name__)

_POLL_MS = 500
_ERROR_BACKOFF_S = 1.0


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: EventConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._owner.commit()

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info("consuming %s partitions %s", outrider.EVENTS_TOPIC, sorted(tp.partition for tp in assigned))


class EventConsumer:
    """Reads event batches into `windows` and `metrics` until stopped."""

    def __init__(
        self,
        bootstrap: str,
        group_id: str,
        windows: RollingWindows,
        metrics: CollectorMetrics,
        clock: Clock,
        max_records: int,
        quotas: QuotaGranter | None = None,
    ) -> None:
        self._windows, self._metrics, self._clock = windows, metrics, clock
        self._quotas = quotas
        self._max_records = max_records
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self._consumer.subscribe([outrider.EVENTS_TOPIC], listener=_CommitOnRevoke(self))
        self._started = False
        self.batches = 0

    async def start(self) -> None:
        if not self._started:
            try:
                await self._consumer.start()
            except BaseException:
                await self._consumer.stop()
                raise
            self._started = True

    async def run(self) -> None:
        """The consume loop; cancel to stop."""
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=_POLL_MS, max_records=self._max_records)
            except KafkaError as exc:
                log.warning("fetching events failed: %s; retrying", exc)
                await asyncio.sleep(_ERROR_BACKOFF_S)
                continue
            if not batch:
                continue
            for records in batch.values():
                self._process(records)
            self.batches += 1
            await self.commit()

    def _process(self, records: Iterable[object]) -> None:
        now = self._clock.now()
        for record in records:
            self._metrics.consumed.inc()
            try:
                event = outrider.decode_event(record.value, record.headers)  # type: ignore[attr-defined]
            except outrider.DecodeError as exc:
                # a dead-letter topic comes later; for now, count and skip
                self._metrics.undecodable.inc()
                log.debug(
                    "skipping undecodable record %s@%s: %s",
                    getattr(record, "partition", "?"),
                    getattr(record, "offset", "?"),
                    exc,
                )
                continue
            if event.WhichOneof("body") == "usage":
                if self._quotas is not None:
                    self._quotas.observe(event)
                else:
                    self._metrics.quota_reports.labels("unknown_resource").inc()
                continue
            result = self._windows.add_event(event, now)
            if result is Ingest.DUPLICATE:
                self._metrics.duplicates.inc()
            elif result is Ingest.STALE:
                self._metrics.stale.inc()
            if result is Ingest.COUNTED:
                self._metrics.observe_event(event)

    async def commit(self) -> None:
        """Commit what has been processed; failures are logged (the records come again)."""
        if not self._started:
            return
        try:
            await self._consumer.commit()
        except KafkaError as exc:
            log.warning("committing %s offsets failed: %s", outrider.EVENTS_TOPIC, exc)

    async def stop(self) -> None:
        if self._started:
            await self.commit()
            self._started = False
            await self._consumer.stop()
