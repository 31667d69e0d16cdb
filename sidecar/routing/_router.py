"""Which version a new session gets, from the newest rollout state seen for this agent.

Pure and synchronous: the control tailer feeds `apply`, OpenSession calls `assign`.

- no state                  -> the config's stable version, role STABLE
- RUNNING, HOLD, NO_DATA    -> sticky hash of (rollout id, key) in [0, 1): below the
                               candidate weight -> candidate (CANARY), else stable (STABLE)
- SHADOW                    -> stable, role STABLE (the candidate only answers mirrored calls
                               and `shadow_of` sessions: see `shadow_target`; HOLD and NO_DATA
                               with a `shadow_sample` are a held shadow phase: weight 0)
- SMOKE_TEST (blue-green)   -> stable (blue), role STABLE: green serves only the smoke tests
                               (sidecar._smoke)
- SWITCHED (blue-green)     -> candidate (green), role CANARY, for every new session; sessions
                               pinned to blue keep being served (blue is warm)
- PROMOTED                  -> candidate, role STABLE
- ROLLED_BACK / ABORTED     -> the state's stable version, role STABLE
- a version this config lacks -> the config's stable version (warned once, counted)

Per-tenant canaries (sidecar.routing._tenants): while the candidate serves users, a tenant in
`opt_in_tenants` always gets it and one in `exclude_tenants` never does; the rest are split.

The sticky key is the session nonce, the user id or the tenant id per `sticky_by`, falling
back to the session nonce when that id is empty.

Existing sessions: the newest state's `retired` list names versions that a rollback or abort
took out of service. A session pinned to one (by that rollout) is served until its drain
deadline and `drained` after it, on every replica, whatever its token says.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from outrider.v1 import common_pb2, control_pb2
from sidecar.routing._session import Session
from sidecar.routing._tenants import EXCLUDED, NO_LISTS, OPT_IN, TenantLists

log = logging.getLogger(__name__)

ROLE_STABLE = common_pb2.ROLE_STABLE
ROLE_CANARY = common_pb2.ROLE_CANARY
# HOLD and NO_DATA freeze the split where it is: sessions keep being split as in RUNNING
_SPLIT = (
    control_pb2.ROLLOUT_PHASE_RUNNING,
    control_pb2.ROLLOUT_PHASE_HOLD,
    control_pb2.ROLLOUT_PHASE_NO_DATA,
)
_PROMOTED = control_pb2.ROLLOUT_PHASE_PROMOTED
_SHADOW = control_pb2.ROLLOUT_PHASE_SHADOW
_HELD = (control_pb2.ROLLOUT_PHASE_HOLD, control_pb2.ROLLOUT_PHASE_NO_DATA)
_BACK_TO_STABLE = (control_pb2.ROLLOUT_PHASE_ROLLED_BACK, control_pb2.ROLLOUT_PHASE_ABORTED)
_SMOKE_TEST = control_pb2.ROLLOUT_PHASE_SMOKE_TEST
_SWITCHED = control_pb2.ROLLOUT_PHASE_SWITCHED


@dataclass(frozen=True, slots=True)
class ShadowTarget:
    """A rollout in its shadow phase whose candidate this sidecar has."""

    rollout_id: str
    generation: int
    stable_version_id: str
    candidate_version_id: str
    sample: float  # the share of stable sessions mirrored, in [0, 1]


@dataclass(frozen=True, slots=True)
class Assignment:
    version_id: str
    role: int  # outrider.v1.Role
    rollout_id: str = ""
    cohort: str = ""  # per-tenant canaries: "opt_in", "excluded", "split" ("" without lists)


def in_shadow(state: control_pb2.RolloutState) -> bool:
    """In its shadow phase, or held there (HOLD or NO_DATA keep mirroring, at their sample)."""
    return state.phase == _SHADOW or (state.phase in _HELD and state.shadow_sample > 0)


def sticky_fraction(rollout_id: str, key: str) -> float:
    """A uniform, deterministic number in [0, 1) for (rollout, key)."""
    digest = hashlib.sha256(f"{rollout_id}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def unit_id(rollout_id: str, key: str) -> str:
    """The randomization unit as events carry it: a hash, so no user or tenant id leaves."""
    return hashlib.sha256(f"unit\x00{rollout_id}\x00{key}".encode()).hexdigest()[:16]


def sticky_key(sticky_by: int, nonce: str, user_id: str, tenant_id: str) -> str:
    if sticky_by == common_pb2.STICKY_BY_USER and user_id:
        return "u:" + user_id
    if sticky_by == common_pb2.STICKY_BY_TENANT and tenant_id:
        return "t:" + tenant_id
    return "s:" + nonce


class Router:
    """Holds the newest rollout state of one agent and assigns versions to new sessions."""

    def __init__(self, agent: str, stable_version_id: str, known_version_ids: Collection[str]) -> None:
        if stable_version_id not in known_version_ids:
            raise ValueError("the stable version must be one of the known versions")
        self.agent = agent
        self._config_stable = Assignment(stable_version_id, ROLE_STABLE)
        self._known = frozenset(known_version_ids)
        self._state: control_pb2.RolloutState | None = None
        self._fixed: Assignment | None = self._config_stable  # set when the answer needs no hash
        self._tenants = NO_LISTS
        self.unknown_version_states = 0  # states applied that named a version we don't have
        self.ignored_states = 0  # other agents' or not newer

    @property
    def generation(self) -> int:
        return self._state.generation if self._state is not None else 0

    @property
    def state(self) -> control_pb2.RolloutState | None:
        return self._state

    @property
    def ordering(self) -> tuple[int, int]:
        """(epoch, generation) of the state in hand; (0, 0) without one."""
        return (self._state.epoch, self._state.generation) if self._state is not None else (0, 0)

    def is_newer(self, state: control_pb2.RolloutState) -> bool:
        return (state.epoch, state.generation) > self.ordering

    @property
    def retired(self) -> Sequence[control_pb2.RetiredVersion]:
        """The newest state's retired versions (empty without a state)."""
        return self._state.retired if self._state is not None else ()

    def retirement_of(self, session: Session) -> control_pb2.RetiredVersion | None:
        """The retired entry `session` is pinned to, if any.

        An entry names the rollout that retired it: a later rollout of the same candidate pins
        sessions that are not drained (an entry without a rollout id matches the version alone).
        """
        for entry in self.retired:
            if entry.version_id == session.version_id and entry.rollout_id in ("", session.rollout_id):
                return entry
        return None

    def drained(self, session: Session, now: float) -> bool:
        """Whether `session`'s version was retired and its drain deadline has passed at `now`."""
        entry = self.retirement_of(session)
        return entry is not None and round(now * 1e9) >= entry.drain_deadline_unix_nano

    def apply(self, state: control_pb2.RolloutState) -> bool:
        """Take `state` if it is for this agent and strictly newer by (epoch, generation);
        return whether it was taken."""
        if state.agent != self.agent or not self.is_newer(state):
            self.ignored_states += 1
            return False
        self._state = state
        self._fixed = self._resolve_fixed(state)
        self._tenants = TenantLists.of(state)
        return True

    def _resolve_fixed(self, state: control_pb2.RolloutState) -> Assignment | None:
        needed: tuple[str, ...]
        if state.phase in _SPLIT:
            needed = (state.stable_version_id, state.candidate_version_id)
        elif state.phase == _PROMOTED:
            needed = (state.candidate_version_id,)
        elif state.phase == _SHADOW:
            needed = (state.stable_version_id,)  # a candidate we lack is not mirrored, see shadow_target
        elif state.phase in _BACK_TO_STABLE or state.phase == _SMOKE_TEST:
            needed = (state.stable_version_id,)
        elif state.phase == _SWITCHED:
            needed = (state.candidate_version_id,)
        else:
            log.warning(
                "rollout state for %s gen %d has no phase; serving the configured stable",
                self.agent,
                state.generation,
            )
            return self._config_stable
        missing = [v for v in needed if v not in self._known]
        if missing:
            self.unknown_version_states += 1
            log.warning(
                "rollout %s gen %d for %s names version(s) %s this sidecar does not have; "
                "serving the configured stable %s",
                state.rollout_id,
                state.generation,
                self.agent,
                ", ".join(missing),
                self._config_stable.version_id,
            )
            return self._config_stable
        if state.phase == _PROMOTED:
            return Assignment(state.candidate_version_id, ROLE_STABLE, state.rollout_id)
        if state.phase in _BACK_TO_STABLE or state.phase in (_SHADOW, _SMOKE_TEST):
            return Assignment(state.stable_version_id, ROLE_STABLE, state.rollout_id)
        if state.phase == _SWITCHED:
            return Assignment(state.candidate_version_id, ROLE_CANARY, state.rollout_id)
        return None  # RUNNING, HOLD, NO_DATA: depends on the session

    def learn(self, version_id: str) -> None:
        """Add a version loaded at run time (the registry); a state in hand that named it while
        it was unknown is resolved again."""
        if version_id in self._known:
            return
        self._known = self._known | {version_id}
        if self._state is not None:
            self._fixed = self._resolve_fixed(self._state)

    def shadow_target(self) -> ShadowTarget | None:
        """The rollout in its shadow phase (or held in it: HOLD or NO_DATA with a shadow sample),
        when this sidecar has both of its versions."""
        state = self._state
        if state is None or not in_shadow(state):
            return None
        if state.stable_version_id not in self._known or state.candidate_version_id not in self._known:
            return None
        sample = state.shadow_sample
        sample = 0.0 if math.isnan(sample) else min(max(sample, 0.0), 1.0)
        return ShadowTarget(
            state.rollout_id, state.generation, state.stable_version_id, state.candidate_version_id, sample
        )

    @property
    def known(self) -> frozenset[str]:
        return self._known

    def unit_of(self, nonce: str, user_id: str = "", tenant_id: str = "", rollout_id: str = "") -> str:
        """The hashed randomization unit of a session in the rollout that assigned it."""
        state = self._state
        sticky_by = state.sticky_by if state is not None else common_pb2.STICKY_BY_SESSION
        return unit_id(rollout_id, sticky_key(sticky_by, nonce, user_id, tenant_id))

    def assign(self, nonce: str, user_id: str = "", tenant_id: str = "") -> Assignment:
        """The version and role for a new session."""
        if self._fixed is not None:
            return self._fixed
        state = self._state
        assert state is not None
        weight = state.candidate_weight
        weight = 0.0 if math.isnan(weight) else min(max(weight, 0.0), 1.0)
        cohort = self._tenants.cohort(tenant_id)
        if cohort == OPT_IN:
            return Assignment(state.candidate_version_id, ROLE_CANARY, state.rollout_id, cohort)
        if cohort == EXCLUDED:
            return Assignment(state.stable_version_id, ROLE_STABLE, state.rollout_id, cohort)
        key = sticky_key(state.sticky_by, nonce, user_id, tenant_id)
        if sticky_fraction(state.rollout_id, key) < weight:
            return Assignment(state.candidate_version_id, ROLE_CANARY, state.rollout_id, cohort)
        return Assignment(state.stable_version_id, ROLE_STABLE, state.rollout_id, cohort)
