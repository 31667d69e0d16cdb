"""Deployment records: what an ended rollout was, built from the controller's timeline. Pure.

`build_record` turns the published states of one rollout (the controller's timeline, oldest
first) into a `DeploymentRecord`: the spec as submitted, the stages (weight, entered, left,
how each ended), every decision with its gate results (bounded), who decided and why, and
the durations. `with_baseline` adds the new stable's metrics after a promotion.

On `outrider.deployments` a record is keyed by its rollout id and signed like a control record;
`sign_record` and `open_record` are the two ends. A record reads back only when its signature
is valid (unsigned records are refused whatever `control_verify` says: the topic is newer than
signing), its key is its rollout id and it is an ended rollout.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError

import outrider
from collector._windows import WindowStats
from outrider.v1 import admin_pb2, control_pb2, deployment_pb2

PROMOTED = control_pb2.ROLLOUT_PHASE_PROMOTED
ENDED = frozenset({PROMOTED, control_pb2.ROLLOUT_PHASE_ROLLED_BACK, control_pb2.ROLLOUT_PHASE_ABORTED})
_HELD = frozenset({control_pb2.ROLLOUT_PHASE_HOLD, control_pb2.ROLLOUT_PHASE_NO_DATA})
# decisions kept per record: the first and the newest; bounds a record well below Kafka's 1 MB
MAX_DECISIONS = 100
MAX_RECORD_BYTES = 900_000  # below the broker's default 1 MB message limit
CONTENT_TYPE = b"application/x-protobuf; messageType=outrider.v1.DeploymentRecord"
REVISION_ENDED, REVISION_BASELINE = 1, 2


def _ns(t: float) -> int:
    return round(t * 1e9)


def outcome_name(phase: int) -> str:
    return control_pb2.RolloutPhase.Name(phase).removeprefix("ROLLOUT_PHASE_").lower()  # type: ignore[arg-type]


def _decision(stage: admin_pb2.StageRecord) -> deployment_pb2.DeploymentDecision:
    return deployment_pb2.DeploymentDecision(
        generation=stage.generation,
        phase=stage.phase,
        step_index=stage.step_index,
        candidate_weight=stage.candidate_weight,
        at_unix_nano=stage.at_unix_nano,
        reason=stage.reason,
        decided_by=stage.decided_by,
        gate_results=stage.gate_results,
    )


def stages_of(
    timeline: Sequence[admin_pb2.StageRecord], started_ns: int
) -> list[deployment_pb2.DeploymentStage]:
    """The stages of a rollout from its decisions, oldest first: a new stage begins when the
    step changes; the decision after the last one that kept the step ends it."""
    stages: list[deployment_pb2.DeploymentStage] = []
    current: deployment_pb2.DeploymentStage | None = None
    for entry in timeline:
        if entry.phase in ENDED:
            if current is not None:
                _leave(current, entry, outcome_name(entry.phase))
            current = None
            break
        if current is None or entry.step_index != current.step_index:
            if current is not None:
                _leave(current, entry, "advanced")
            entered = (
                started_ns if not stages and entry.step_index == 0 and started_ns else entry.at_unix_nano
            )
            current = deployment_pb2.DeploymentStage(
                step_index=entry.step_index,
                candidate_weight=entry.candidate_weight,
                entered_at_unix_nano=entered,
            )
            stages.append(current)
        if entry.phase in _HELD:
            current.holds += 1
    return stages


def _leave(stage: deployment_pb2.DeploymentStage, by: admin_pb2.StageRecord, ended: str) -> None:
    stage.left_at_unix_nano = by.at_unix_nano
    stage.duration_s = max(0, by.at_unix_nano - stage.entered_at_unix_nano) / 1e9
    stage.ended = ended
    stage.reason = by.reason
    stage.decided_by = by.decided_by


def build_record(
    state: control_pb2.RolloutState,
    timeline: Sequence[admin_pb2.StageRecord],
    baseline_s: float,
    now: float,
) -> deployment_pb2.DeploymentRecord:
    """The record of the rollout that `state` (PROMOTED, ROLLED_BACK or ABORTED) ended.
    `timeline` is its published states, oldest first, `state` last."""
    if state.phase not in ENDED:
        raise ValueError(
            f"rollout {state.rollout_id} has not ended ({control_pb2.RolloutPhase.Name(state.phase)})"
        )
    entries = [t for t in timeline if t.generation <= state.generation]
    decisions = [_decision(t) for t in entries]
    dropped = max(0, len(decisions) - MAX_DECISIONS)
    if dropped:
        decisions = decisions[:1] + decisions[-(MAX_DECISIONS - 1) :]
    started = state.started_at_unix_nano
    record = deployment_pb2.DeploymentRecord(
        rollout_id=state.rollout_id,
        agent=state.agent,
        stable_version_id=state.stable_version_id,
        candidate_version_id=state.candidate_version_id,
        outcome=state.phase,
        spec_yaml=state.spec_yaml,
        started_at_unix_nano=started,
        ended_at_unix_nano=state.decided_at_unix_nano,
        duration_s=max(0, state.decided_at_unix_nano - started) / 1e9,
        decided_by=state.decided_by,
        reason=state.reason,
        stages=stages_of(entries, started),
        decisions=decisions,
        decisions_dropped=dropped,
        alpha=state.alpha,
        revision=REVISION_ENDED,
        recorded_at_unix_nano=_ns(now),
        generation=state.generation,
        epoch=state.epoch,
        time_scale=state.time_scale or 1.0,
    )
    while record.ByteSize() > MAX_RECORD_BYTES and len(record.decisions) > 2:
        del record.decisions[1]  # a huge spec or many gates: the oldest after the start go first
        record.decisions_dropped += 1
    if state.phase == PROMOTED and baseline_s > 0:
        record.baseline_s = baseline_s
        record.baseline_due_unix_nano = state.decided_at_unix_nano + _ns(baseline_s)
    return record


def baseline_pending(record: deployment_pb2.DeploymentRecord, now: float) -> bool:
    """A promotion whose baseline is due and not yet taken."""
    return (
        record.outcome == PROMOTED
        and record.baseline_s > 0
        and not record.HasField("baseline")
        and record.baseline_due_unix_nano <= _ns(now)
    )


def with_baseline(
    record: deployment_pb2.DeploymentRecord, stats: WindowStats, now: float, partial: bool
) -> deployment_pb2.DeploymentRecord:
    """A copy of `record`, revision 2, with the promoted version's metrics over its baseline."""
    new = deployment_pb2.DeploymentRecord()
    new.CopyFrom(record)
    tasks = stats.task_successes + stats.task_failures
    new.revision = REVISION_BASELINE
    new.recorded_at_unix_nano = _ns(now)
    new.baseline.CopyFrom(
        deployment_pb2.BaselineSnapshot(
            version_id=record.candidate_version_id,
            from_unix_nano=record.ended_at_unix_nano,
            to_unix_nano=record.baseline_due_unix_nano,
            taken_at_unix_nano=_ns(now),
            partial=partial,
            requests=stats.requests,
            errors=stats.errors,
            error_rate=stats.error_rate,
            latency_p50_ms=stats.latency_p50_ms,
            latency_p95_ms=stats.latency_p95_ms,
            latency_p99_ms=stats.latency_p99_ms,
            calls=stats.calls,
            cost_per_call=stats.cost_per_call,
            cost_per_session=stats.cost_per_session,
            sessions=stats.sessions,
            thumbs_down_rate=stats.thumbs_down_rate,
            task_failure_rate=stats.task_failures / tasks if tasks else 0.0,
            safety_event_rate=stats.safety_event_rate,
            tool_failure_rate=stats.tool_failure_rate,
            fallback_rate=stats.fallback_rate,
            ttft_p95_ms=stats.ttft_p95_ms,
            mean_score=stats.mean_score,
        )
    )
    return new


def summary(record: deployment_pb2.DeploymentRecord) -> deployment_pb2.DeploymentSummary:
    return deployment_pb2.DeploymentSummary(
        rollout_id=record.rollout_id,
        agent=record.agent,
        stable_version_id=record.stable_version_id,
        candidate_version_id=record.candidate_version_id,
        outcome=record.outcome,
        started_at_unix_nano=record.started_at_unix_nano,
        ended_at_unix_nano=record.ended_at_unix_nano,
        duration_s=record.duration_s,
        decided_by=record.decided_by,
        reason=record.reason,
        has_baseline=record.HasField("baseline"),
    )


def newer(a: deployment_pb2.DeploymentRecord, than: deployment_pb2.DeploymentRecord | None) -> bool:
    """Of two records of one rollout the later revision wins (a replayed older one never does)."""
    return than is None or (a.revision, a.recorded_at_unix_nano) > (than.revision, than.recorded_at_unix_nano)


def sign_record(
    record: deployment_pb2.DeploymentRecord, signer: outrider.SigningKey
) -> outrider.SignedRecord:
    key = outrider.deployment_key(record.rollout_id)
    value = record.SerializeToString()
    headers = [
        (outrider.CONTENT_TYPE_HEADER, CONTENT_TYPE),
        (outrider.SCHEMA_HEADER, str(outrider.SCHEMA_VERSION).encode()),
    ]
    return outrider.SignedRecord(key, value, (*headers, *signer.sign(key, value)))


def open_record(
    verifier: outrider.Verifier, signed: outrider.SignedRecord
) -> tuple[str, deployment_pb2.DeploymentRecord | None]:
    """("", the record) when it is signed by a trusted key, keyed by its rollout id and of an
    ended rollout; (the reason, None) otherwise."""
    verdict = verifier.verify(signed.key, signed.value, signed.headers)
    if not verdict.ok or not verdict.signed:
        return verdict.reason or "unsigned", None
    if dict(signed.headers).get(outrider.CONTENT_TYPE_HEADER, CONTENT_TYPE) != CONTENT_TYPE:
        return "undecodable", None
    record = deployment_pb2.DeploymentRecord()
    try:
        record.ParseFromString(signed.value)
    except DecodeError:
        return "undecodable", None
    if not record.rollout_id or signed.key != outrider.deployment_key(record.rollout_id):
        return "bad_key", None
    if record.outcome not in ENDED or not record.agent:
        return "undecodable", None
    return "", record
