"""Per-tenant canaries: which group a new session's tenant is in, from the rollout state.

- "opt_in":   the tenant is in `opt_in_tenants`: always the candidate while it serves users
- "excluded": the tenant is in `exclude_tenants`: never the candidate
- "split":    everyone else (and sessions without a tenant): the weights decide
- ""          the state has no tenant lists, or the candidate serves no user (a shadow phase,
              running or held): nothing to tell apart

The group travels in the session token and on every event (`Event.cohort`): only "split"
sessions are randomized, so the collector's gates compare those alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from outrider.v1 import control_pb2

OPT_IN = "opt_in"
EXCLUDED = "excluded"
SPLIT = "split"
COHORTS = (OPT_IN, EXCLUDED, SPLIT)
_HELD = (control_pb2.ROLLOUT_PHASE_HOLD, control_pb2.ROLLOUT_PHASE_NO_DATA)


@dataclass(frozen=True, slots=True)
class TenantLists:
    """A state's tenant lists as sets (a state may list thousands; OpenSession looks up one)."""

    opt_in: frozenset[str] = frozenset()
    excluded: frozenset[str] = frozenset()

    @classmethod
    def of(cls, state: control_pb2.RolloutState) -> TenantLists:
        held_shadow = state.phase in _HELD and state.shadow_sample > 0
        if held_shadow or state.phase == control_pb2.ROLLOUT_PHASE_SHADOW:
            return NO_LISTS  # the candidate serves no user: opt-in tenants stay on stable
        if not state.opt_in_tenants and not state.exclude_tenants:
            return NO_LISTS
        return cls(frozenset(state.opt_in_tenants), frozenset(state.exclude_tenants))

    def __bool__(self) -> bool:
        return bool(self.opt_in or self.excluded)

    def cohort(self, tenant_id: str) -> str:
        """The group of a session of `tenant_id` ("" without lists)."""
        if not self:
            return ""
        if tenant_id in self.opt_in:
            return OPT_IN
        if tenant_id in self.excluded:
            return EXCLUDED
        return SPLIT


NO_LISTS = TenantLists()
