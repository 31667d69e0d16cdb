"""The collector's ingest step for `outrider.events` records: decode, dedupe, aggregate.

Each event counted once goes to the rolling windows, the totals, the feature flags' figures
and, when it belongs to a current rollout, that rollout's evidence (added once per batch, in order).

Synchronous and free of I/O, so a batch is applied in one go (nothing can checkpoint
halfway through it). Each record moves its partition's position on, decoded or not: what
cannot be decoded comes back as a `DeadLetter` for the async layer to write.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import outrider
from collector._book import EvidenceBook
from collector._checkpoint import Offsets
from collector._deadletter import DeadLetter
from collector._flag_metrics import FlagMetrics
from collector._gaps import GapTracker
from collector._granter import QuotaGranter
from collector._metrics import CollectorMetrics
from collector._rows import ROW_AGENT, ROW_EVENT, Row, event_of, fast_row, row_of
from collector._sightings import VersionSightings
from collector._usage_relay import GRANTER_PARTITION, UsageRelay, is_relayed
from collector._windows import COUNTED_BODIES, Ingest, RollingWindows

log = logging.getLogger(__name__)


class Ingestor:
    def __init__(
        self,
        windows: RollingWindows,
        metrics: CollectorMetrics,
        quotas: QuotaGranter | None = None,
        evidence: EvidenceBook | None = None,
        sightings: VersionSightings | None = None,
    ) -> None:
        self.windows, self.metrics, self.quotas = windows, metrics, quotas
        self.sightings = sightings if sightings is not None else VersionSightings()
        self.evidence = evidence if evidence is not None else EvidenceBook()
        # (topic, partition) -> next offset: the state holds exactly the records before it
        self.positions: Offsets = {}
        self.applied = 0  # records handled since start, decoded or not
        self.gaps = GapTracker()
        # usage reports from other partitions, copied to the granter's (set by the collector)
        self.usage_relay: UsageRelay | None = None
        # feature flags' on-against-off figures (set by the collector)
        self.flag_metrics: FlagMetrics | None = None

    def apply(self, records: Iterable[Any], now: float) -> list[DeadLetter]:
        """Apply consumed records (aiokafka ConsumerRecords) in order; the dead letters.

        Records are decoded one by one, each body read once; the events about a version then go
        to the windows, the totals and the rest as one batch (`add_rows`), which is the same as
        one by one: those take no part in anything the other bodies touch, and share `now`."""
        dead: list[DeadLetter] = []
        metrics, positions, gaps = self.metrics, self.positions, self.gaps
        applied = decoded = 0  # decoded: counted bodies read by upb (only they can carry flags)
        versioned: list[Row] = []  # the events for the windows, in order
        sequenced: list[tuple[str, str, int]] = []  # (sidecar, agent, sequence) for the gaps, in order
        decode, check, fast = outrider.decode_event_head, outrider.check_event_headers, fast_row
        where: tuple[str, int] | None = None
        expected: int | None = None
        for record in records:
            applied += 1
            if where is None or record.partition != where[1] or record.topic != where[0]:
                where = (record.topic, record.partition)  # records come in runs of one partition
                expected = positions.get(where)
            if expected is not None and record.offset < expected:
                # the consumer went back without us asking: its position was out of range (a
                # new or truncated log). Never silent: counted and logged; the broker watch
                # tells a new broker and recovers; redelivered events are dropped by id.
                metrics.offset_resets.inc()
                log.warning(
                    "%s[%d] went back from offset %d to %d: a reset log (a new broker?)",
                    record.topic,
                    record.partition,
                    expected,
                    record.offset,
                )
            expected = positions[where] = record.offset + 1
            try:
                check(record.headers)
                if fast is not None and (read := fast(record.value)) is not None:
                    # a call or tool event, read off the wire: counted, nothing else to do
                    row, gap = read
                    if gap is not None:
                        sequenced.append(gap)
                    versioned.append(row)
                    continue
                head = event, _, agent, body = decode(record.value)
            except outrider.DecodeError as exc:
                metrics.undecodable.inc()
                dead.append(
                    DeadLetter(
                        record.topic,
                        record.partition,
                        record.offset,
                        record.key,
                        record.value,
                        list(record.headers or ()),
                        str(exc),
                    )
                )
                continue
            if sequence := event.sequence:  # read once: a field read costs about what observing it does
                sequenced.append((event.sidecar_id, agent, sequence))
            if body in COUNTED_BODIES:
                versioned.append(row_of(head))
                decoded += 1
            elif body == "versions_report":
                self.sightings.report(event, now)
            elif body == "smoke":  # blue-green: idempotent per (sidecar, test)
                self.evidence.smoke.add(event)
            elif body == "usage":
                if self.quotas is not None:
                    self.quotas.observe(event)
                else:
                    metrics.quota_reports.labels("unknown_resource").inc()
                if (
                    self.usage_relay is not None
                    and record.partition != GRANTER_PARTITION
                    and not is_relayed(record.headers)
                ):
                    self.usage_relay.add(event)
        if sequenced:
            for sidecar, agent, sequence, missing in gaps.observe_all(sequenced):
                metrics.events_missing.labels(sidecar, agent).inc(missing)
                log.warning(
                    "%d events from sidecar %s (%s) never arrived (sequence %d after %d)",
                    missing,
                    sidecar,
                    agent,
                    sequence,
                    sequence - missing - 1,
                )
        if versioned:
            self._count(versioned, now, decoded)
        self.applied += applied
        metrics.consumed.inc(applied)
        return dead

    def _count(self, rows: list[Row], now: float, decoded: int) -> None:
        """The windows take each event once; the totals, evidence, flags and sightings the ones
        they took, and the stale (too old for any window, but they happened). Each event's
        fields are read once, into the rows they all share."""
        metrics = self.metrics
        counted: list[Row] = []
        duplicates = stale = 0
        kept, duplicate, old = Ingest.COUNTED, Ingest.DUPLICATE, Ingest.STALE
        for row, result in zip(rows, self.windows.add_rows(rows, now), strict=True):
            if result is kept:
                counted.append(row)
            elif result is duplicate:
                duplicates += 1
            elif result is old:
                stale += 1
                counted.append(row)
        if duplicates:
            metrics.duplicates.inc(duplicates)
        if stale:
            metrics.stale.inc(stale)
        if not counted:
            return
        metrics.observe_rows(counted)
        tracked = self.evidence.tracked()
        if tracked:
            self.evidence.add_events(
                [event_of(row[ROW_EVENT]) for row in counted if row[ROW_AGENT] in tracked], now
            )
        if self.flag_metrics is not None and decoded:  # rows read off the wire carry no flags
            self.flag_metrics.observe_all(
                event for row in counted if not isinstance(event := row[ROW_EVENT], bytes)
            )
        self.sightings.observe_rows(counted, now)
