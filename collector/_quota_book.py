"""Every configured global quota, from usage reports in to grant messages out.

One ``LeaseAllocator`` per resource. ``observe`` takes a decoded ``usage`` event (its
``sidecar_id`` holds the lease, its time dates the report); ``tick`` returns one
``QuotaGrant`` per configured resource, every time, even with no live leases: the grant
doubles as the lease heartbeat, and a sidecar missing from ``grants_tpm`` (never reported,
or its lease lapsed) knows it holds no share and falls back to its safe share.

Generations rise by one per resource on every tick and are never reused: a grant whose
write failed may still have landed, so the next tick takes the next number. ``restore``
continues from the highest generation read back from the control topic. Pure and
synchronous (the clock is injected); ``collector._granter`` publishes.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from collector._quota import LeaseAllocator
from collector._settings import QuotaSettings
from outrider.clock import Clock, SystemClock
from outrider.v1 import control_pb2, events_pb2

log = logging.getLogger(__name__)

QUOTA_KEY_PREFIX = "quota/"


def quota_key(resource: str) -> bytes:
    """The `outrider.control` record key of a resource's grants: ``quota/<resource>``."""
    if not resource:
        raise ValueError("resource must not be empty")
    return (QUOTA_KEY_PREFIX + resource).encode("utf-8")


class UsageIngest(enum.Enum):
    """What happened to one usage report."""

    ACCEPTED = "accepted"
    UNKNOWN_RESOURCE = "unknown_resource"  # no quota configured for it
    REJECTED = "rejected"  # older than a lease, out of order, or too many sidecars
    INVALID = "invalid"  # no sidecar id, negative or non-finite numbers


@dataclass(frozen=True)
class ResourceUsage:
    """The live leases of one resource, summed."""

    sidecars: int
    used_tpm: float
    demand_tpm: float


class QuotaBook:
    def __init__(
        self,
        quotas: Mapping[str, QuotaSettings],
        lease_ttl_s: float,
        grant_ttl_s: float,
        clock: Clock | None = None,
    ) -> None:
        if not grant_ttl_s > 0:
            raise ValueError("grant_ttl_s must be > 0")
        self._clock: Clock = clock or SystemClock()
        self.grant_ttl_s = grant_ttl_s
        self._allocators = {
            resource: LeaseAllocator(q.limit_tpm, lease_ttl_s, q.min_share_tpm, self._clock)
            for resource, q in quotas.items()
        }
        self._generations = dict.fromkeys(quotas, 0)

    @property
    def resources(self) -> list[str]:
        return list(self._allocators)

    def limit_tpm(self, resource: str) -> float:
        return self._allocators[resource].limit_tpm

    def generation(self, resource: str) -> int:
        """The last generation handed out (or restored) for `resource`; 0 before any."""
        return self._generations[resource]

    def restore(self, generations: Mapping[str, int]) -> None:
        """Continue after the generations read back from the control topic."""
        for resource, generation in generations.items():
            if resource in self._generations:
                self._generations[resource] = max(self._generations[resource], generation)

    def observe(self, event: events_pb2.Event) -> UsageIngest:
        """Take one ``usage`` event as a lease renewal."""
        report = event.usage
        allocator = self._allocators.get(report.resource)
        if allocator is None:
            return UsageIngest.UNKNOWN_RESOURCE
        at = event.time_unix_nano / 1e9 if event.time_unix_nano > 0 else None
        try:
            accepted = allocator.report(event.sidecar_id, report.used_tpm, report.demand_tpm, at)
        except ValueError as exc:
            log.debug("quota: invalid usage report %s from %r: %s", event.event_id, event.sidecar_id, exc)
            return UsageIngest.INVALID
        return UsageIngest.ACCEPTED if accepted else UsageIngest.REJECTED

    def usage(self, resource: str) -> ResourceUsage:
        leases = self._allocators[resource].leases()
        return ResourceUsage(
            sidecars=len(leases),
            used_tpm=sum(x.used_tpm for x in leases),
            demand_tpm=sum(x.demand_tpm for x in leases),
        )

    def tick(self) -> list[control_pb2.QuotaGrant]:
        """One grant per configured resource, each with its next generation."""
        now = self._clock.now()
        out = []
        for resource, allocator in self._allocators.items():
            self._generations[resource] += 1
            out.append(
                control_pb2.QuotaGrant(
                    resource=resource,
                    generation=self._generations[resource],
                    limit_tpm=allocator.limit_tpm,
                    grants_tpm=allocator.grants(),
                    issued_at_unix_nano=int(now * 1e9),
                    ttl_s=self.grant_ttl_s,
                )
            )
        return out
