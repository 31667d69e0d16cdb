"""The collector's side of global tokens-per-minute quotas: leases, Doorman-style.

One ``LeaseAllocator`` per resource (provider + model). Sidecars report, in events,
their used and demanded tokens per minute; each report is a lease that lives
``lease_ttl_s``. ``grants()`` splits ``limit_tpm`` among the sidecars holding live leases:

1. every live sidecar wants ``max(demand, min_share_tpm)``; if the wants fit in the
   limit, everyone gets what it wants (an idle sidecar gets ``min_share_tpm``, enough to
   start up without waiting a whole grant period);
2. otherwise each first gets its floor, ``min(want, min_share_tpm, limit / n)``, and
   the rest is water-filled in proportion to demand: a sidecar whose proportional part
   would exceed its want is capped at its want and the surplus goes round again to the
   still-hungry ones.

3. what the limit still leaves is handed out as headroom: each sidecar may get up to
   ``headroom`` times its want on top (in proportion to its want when the spare is short).
   A grant of exactly the demand would leave a growing sidecar no room to grow between
   grants, and its priority reserve would throttle it far below the global limit.

So the grants never sum above ``limit_tpm``, no grant exceeds ``(1 + headroom) x
max(demand, min_share_tpm)``, and a sidecar that stops reporting loses its lease after
``lease_ttl_s``, its share moving to the others at the next ``grants()``. Pure and
synchronous; the async layer publishes the grants on ``outrider.control``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from outrider.clock import Clock, SystemClock

log = logging.getLogger(__name__)

DEFAULT_MIN_SHARE_TPM = 0.0
DEFAULT_HEADROOM = 1.0  # spare capacity lets a sidecar grow to twice its want between grants
MAX_SIDECARS = 10_000  # live leases per resource; beyond this new sidecars are ignored
_EPSILON = 1e-9


@dataclass(frozen=True)
class Lease:
    sidecar_id: str
    used_tpm: float
    demand_tpm: float
    at: float  # when the report was made (collector clock if not given)


class LeaseAllocator:
    def __init__(
        self,
        limit_tpm: float,
        lease_ttl_s: float,
        min_share_tpm: float = DEFAULT_MIN_SHARE_TPM,
        clock: Clock | None = None,
        headroom: float = DEFAULT_HEADROOM,
    ) -> None:
        if not (math.isfinite(limit_tpm) and limit_tpm >= 0):
            raise ValueError("limit_tpm must be a finite number >= 0")
        if not lease_ttl_s > 0:
            raise ValueError("lease_ttl_s must be > 0")
        if not (math.isfinite(min_share_tpm) and min_share_tpm >= 0):
            raise ValueError("min_share_tpm must be a finite number >= 0")
        if not (math.isfinite(headroom) and headroom >= 0):
            raise ValueError("headroom must be a finite number >= 0")
        self.headroom = float(headroom)
        self.limit_tpm = float(limit_tpm)
        self.lease_ttl_s = lease_ttl_s
        self.min_share_tpm = float(min_share_tpm)
        self._clock: Clock = clock or SystemClock()
        self._leases: dict[str, Lease] = {}

    def report(self, sidecar_id: str, used_tpm: float, demand_tpm: float, at: float | None = None) -> bool:
        """Record a sidecar's report; False if it is stale, out of order, or over capacity."""
        for field, value in (("used_tpm", used_tpm), ("demand_tpm", demand_tpm)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{field} must be a finite number >= 0")
        if not sidecar_id:
            raise ValueError("sidecar_id must be non-empty")
        now = self._clock.now()
        at = now if at is None else min(at, now)  # a sidecar clock ahead of ours gains nothing
        if at + self.lease_ttl_s <= now:
            return False
        self._expire(now)
        previous = self._leases.get(sidecar_id)
        if previous is not None and at < previous.at:
            return False  # delivered out of order (at least once, any order)
        if previous is None and len(self._leases) >= MAX_SIDECARS:
            log.warning("quota: %d live leases, ignoring sidecar %s", MAX_SIDECARS, sidecar_id)
            return False
        # demand below use would shrink a working sidecar's grant: demand is at least use
        self._leases[sidecar_id] = Lease(sidecar_id, used_tpm, max(used_tpm, demand_tpm), at)
        return True

    def forget(self, sidecar_id: str) -> None:
        self._leases.pop(sidecar_id, None)

    def leases(self) -> list[Lease]:
        """The live leases (expired ones are dropped)."""
        self._expire(self._clock.now())
        return list(self._leases.values())

    def grants(self) -> dict[str, float]:
        """tokens per minute for each sidecar with a live lease."""
        demands = {x.sidecar_id: x.demand_tpm for x in self.leases()}
        grants = water_fill(self.limit_tpm, demands, self.min_share_tpm)
        return add_headroom(self.limit_tpm, grants, demands, self.min_share_tpm, self.headroom)

    def _expire(self, now: float) -> None:
        dead = [sid for sid, lease in self._leases.items() if lease.at + self.lease_ttl_s <= now]
        for sid in dead:
            del self._leases[sid]


def water_fill(limit: float, demands: dict[str, float], min_share: float = 0.0) -> dict[str, float]:
    """Split ``limit`` by demand as the module docstring says (pure, exposed for tests)."""
    if not demands:
        return {}
    wants = {k: max(d, min_share) for k, d in demands.items()}
    if sum(wants.values()) <= limit:
        return dict(wants)
    floor = min(min_share, limit / len(wants))
    grants = {k: min(w, floor) for k, w in wants.items()}
    left = limit - sum(grants.values())
    hungry = {k for k in wants if wants[k] - grants[k] > _EPSILON and demands[k] > 0}
    while left > _EPSILON * min(1.0, limit) and hungry:  # relative: limits below 1 tpm too
        weight = sum(demands[k] for k in hungry)
        capped = {k for k in hungry if left * demands[k] / weight >= wants[k] - grants[k]}
        if not capped:
            for k in hungry:
                grants[k] += left * demands[k] / weight
            break
        for k in capped:
            left -= wants[k] - grants[k]
            grants[k] = wants[k]
        hungry -= capped
    total = sum(grants.values())
    if total > limit:  # float rounding only; never hand out more than the limit
        scale = limit / total * (1 - 1e-12)
        grants = {k: g * scale for k, g in grants.items()}
    return grants


def add_headroom(
    limit: float, grants: dict[str, float], demands: dict[str, float], min_share: float, headroom: float
) -> dict[str, float]:
    """Hand out the spare ``limit - sum(grants)``: up to ``headroom x want`` more each."""
    spare = limit - sum(grants.values())
    extra = {k: headroom * max(demands[k], min_share) for k in grants}
    wanted = sum(extra.values())
    if spare <= _EPSILON or wanted <= 0:
        return grants
    scale = min(1.0, spare / wanted) * (1 - 1e-12)  # rounding must not lift the sum past the limit
    return {k: g + extra[k] * scale for k, g in grants.items()}
