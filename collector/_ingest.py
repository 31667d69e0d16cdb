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
from collector._sightings import VersionSightings
from collector._usage_relay import GRANTER_PARTITION, UsageRelay, is_relayed
from collector._windows import Ingest, RollingWindows

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
        """Apply consumed records (aiokafka ConsumerRecords) in order; the dead letters."""
        dead: list[DeadLetter] = []
        metrics, windows = self.metrics, self.windows
        applied = 0
        counted: list[Any] = []
        for record in records:
            applied += 1
            where = (record.topic, record.partition)
            expected = self.positions.get(where)
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
            self.positions[where] = record.offset + 1
            try:
                event = outrider.decode_event(record.value, record.headers)
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
            if event.sequence and (
                missing := self.gaps.observe(event.sidecar_id, event.agent, event.sequence)
            ):
                metrics.events_missing.labels(event.sidecar_id, event.agent).inc(missing)
                log.warning(
                    "%d events from sidecar %s (%s) never arrived (sequence %d after %d)",
                    missing,
                    event.sidecar_id,
                    event.agent,
                    event.sequence,
                    event.sequence - missing - 1,
                )
            if event.WhichOneof("body") == "versions_report":
                self.sightings.report(event, now)
                continue
            if event.WhichOneof("body") == "smoke":  # blue-green: idempotent per (sidecar, test)
                self.evidence.smoke.add(event)
                continue
            if event.WhichOneof("body") == "usage":
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
                continue
            result = windows.add_event(event, now)
            if result is Ingest.COUNTED:
                metrics.observe_event(event)
                counted.append(event)
            elif result is Ingest.DUPLICATE:
                metrics.duplicates.inc()
            elif result is Ingest.STALE:
                # too old for any window, but it happened: the totals and the evidence take it
                metrics.stale.inc()
                metrics.observe_event(event)
                counted.append(event)
        if counted:
            self.evidence.add_events(counted, now)
            if self.flag_metrics is not None:
                self.flag_metrics.observe_all(counted)
            for event in counted:
                self.sightings.observe(event, now)
        self.applied += applied
        metrics.consumed.inc(applied)
        return dead
