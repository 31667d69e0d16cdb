"""Errors of rollout commands that do not fit an agent's current state.

RolloutError
 ├─ RolloutConflict   a rollout is already running for the agent   (ALREADY_EXISTS)
 ├─ NoRollout         the agent has no rollout                      (NOT_FOUND)
 ├─ WrongPhase        the command does not fit the rollout's phase  (FAILED_PRECONDITION)
 │   └─ RolloutFinished   the rollout is in a terminal phase
 ├─ UnknownVersion    a version the spec names is neither pushed nor served (FAILED_PRECONDITION)
 └─ NotOwner          another collector replica owns the agent      (relayed to it; UNAVAILABLE
                      when no owner answers)
"""

from __future__ import annotations


class RolloutError(Exception):
    """A rollout command that does not fit the agent's current state."""


class RolloutConflict(RolloutError):
    pass


class NoRollout(RolloutError):
    pass


class WrongPhase(RolloutError):
    """E.g. resuming a rollout that is not on HOLD, pausing one that already is."""


class RolloutFinished(WrongPhase):
    pass


class NotOwner(RolloutError):
    """This replica does not hold the agent's `outrider.events` partition: the owner decides."""


class UnknownVersion(RolloutError):
    """The spec names a version that is not in the registry and that no sidecar reported."""
