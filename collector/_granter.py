"""Publishing quota grants: the thin async layer over `QuotaBook`.

Each tick writes one grant per configured resource to `outrider.control` (keyed
`quota/<resource>`) and waits for the ack. A failed write is counted and logged; the next
tick publishes a fresh grant under the next generation, so nothing is retried by hand.
"""

from __future__ import annotations

import logging
from typing import Protocol

from aiokafka.errors import KafkaError

from collector._metrics import CollectorMetrics
from collector._quota_book import QuotaBook, UsageIngest
from outrider.v1 import control_pb2, events_pb2

log = logging.getLogger(__name__)


class GrantPublisher(Protocol):
    async def publish_quota(self, grant: control_pb2.QuotaGrant) -> None: ...


class QuotaGranter:
    def __init__(self, book: QuotaBook, publisher: GrantPublisher, metrics: CollectorMetrics) -> None:
        self.book, self._publisher, self._metrics = book, publisher, metrics
        for resource in book.resources:
            metrics.quota_limit.labels(resource).set(book.limit_tpm(resource))

    def observe(self, event: events_pb2.Event) -> UsageIngest:
        """Feed one ``usage`` event to the book (called by the events consumer)."""
        result = self.book.observe(event)
        self._metrics.quota_reports.labels(result.value).inc()
        return result

    async def tick(self) -> list[control_pb2.QuotaGrant]:
        """Publish this interval's grants; the ones acknowledged."""
        published = []
        for grant in self.book.tick():
            usage = self.book.usage(grant.resource)
            self._metrics.quota_used.labels(grant.resource).set(usage.used_tpm)
            self._metrics.quota_demand.labels(grant.resource).set(usage.demand_tpm)
            self._metrics.quota_sidecars.labels(grant.resource).set(usage.sidecars)
            try:
                await self._publisher.publish_quota(grant)
            except (KafkaError, TimeoutError) as exc:
                self._metrics.quota_publish_failures.labels(grant.resource).inc()
                log.warning(
                    "could not write quota grant %s generation %d: %s; next interval publishes again",
                    grant.resource,
                    grant.generation,
                    exc or type(exc).__name__,
                )
                continue
            self._metrics.observe_grant(grant)
            published.append(grant)
            log.debug(
                "quota %s generation %d: %s of %.0f tpm to %d sidecars",
                grant.resource,
                grant.generation,
                f"{sum(grant.grants_tpm.values()):.0f}",
                grant.limit_tpm,
                len(grant.grants_tpm),
            )
        return published
