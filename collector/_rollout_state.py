"""The rollout state's building blocks: phases, the retired list and timeline entries."""

from __future__ import annotations

from collections.abc import Iterable

from outrider.v1 import admin_pb2, common_pb2, control_pb2

CONTROLLER = "controller"
RUNNING = control_pb2.ROLLOUT_PHASE_RUNNING
PROMOTED = control_pb2.ROLLOUT_PHASE_PROMOTED
ROLLED_BACK = control_pb2.ROLLOUT_PHASE_ROLLED_BACK
ABORTED = control_pb2.ROLLOUT_PHASE_ABORTED
HOLD = control_pb2.ROLLOUT_PHASE_HOLD
NO_DATA = control_pb2.ROLLOUT_PHASE_NO_DATA
TERMINAL = frozenset({PROMOTED, ROLLED_BACK, ABORTED})
SHADOW = control_pb2.ROLLOUT_PHASE_SHADOW
SMOKE_TEST = control_pb2.ROLLOUT_PHASE_SMOKE_TEST  # blue-green (collector._bluegreen_phase)
SWITCHED = control_pb2.ROLLOUT_PHASE_SWITCHED
ACTIVE = frozenset({RUNNING, HOLD, NO_DATA, SHADOW, SMOKE_TEST, SWITCHED})
RELEASE_HOLD = "an operator's resume (or abort)"
RELEASE_PAUSE = "an operator's resume"
MAX_TIMELINE = 1000
# a retired entry stays listed this long past its drain deadline (> a sidecar's max session duration)
RETIRED_RETENTION_S = 86_400.0
MAX_RETIRED = 32  # newest first kept; bounds the state however many rollouts end
RETIRED_REASON = {ROLLED_BACK: "rolled_back", ABORTED: "aborted"}
STICKY = {
    "session": common_pb2.STICKY_BY_SESSION,
    "user": common_pb2.STICKY_BY_USER,
    "tenant": common_pb2.STICKY_BY_TENANT,
}


def ns(t: float) -> int:
    return round(t * 1e9)


def retired_after(
    previous: Iterable[control_pb2.RetiredVersion],
    now: float,
    added: control_pb2.RetiredVersion | None = None,
) -> list[control_pb2.RetiredVersion]:
    """The retired list of a new state: `added` first, then `previous` entries still retained."""
    keep = [] if added is None else [added]
    seen = {(e.version_id, e.rollout_id) for e in keep}
    horizon = ns(now - RETIRED_RETENTION_S)
    for entry in previous:
        key = (entry.version_id, entry.rollout_id)
        if entry.drain_deadline_unix_nano > horizon and key not in seen:
            seen.add(key)
            keep.append(entry)
    return keep[:MAX_RETIRED]


def stage_record(state: control_pb2.RolloutState) -> admin_pb2.StageRecord:
    return admin_pb2.StageRecord(
        generation=state.generation,
        step_index=state.step_index,
        candidate_weight=state.candidate_weight,
        phase=state.phase,
        at_unix_nano=state.decided_at_unix_nano,
        reason=state.reason,
        decided_by=state.decided_by,
        gate_results=state.gate_results,
    )
