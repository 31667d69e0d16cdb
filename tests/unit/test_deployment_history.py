"""Deployment records, pure parts: built from a timeline, bounded, signed and verified, kept
newest-revision-first, saved and loaded from state_dir, rendered by `rollout history | show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import outrider
from collector._config_errors import SpecError
from collector._deployments import (
    MAX_DECISIONS,
    baseline_pending,
    build_record,
    open_record,
    sign_record,
    stages_of,
    with_baseline,
)
from collector._history import DeploymentHistory
from collector._metrics import CollectorMetrics
from collector._recorder import DeploymentRecorder, fan_out
from collector._rollout import RolloutController
from collector._spec import load_spec_text
from collector._windows import RollingWindows, WindowStats
from devstack._history_cli import history_lines, record_json, show_lines, took, when
from outrider.v1 import admin_pb2, control_pb2, deployment_pb2
from tests.support import TEST_SIGNER

P = control_pb2
T0 = 1_700_000_000.0
NS = 10**9
SPEC = """
agent: support-bot
stable: 1a2b3c4d5e6f
candidate: 9f8e7d6c5b4a
steps: [{weight: 5, min_duration: 1m}, {weight: 50, min_duration: 1m}]
gates: [{name: errors, metric: error_rate, max_increase: 0.01}]
"""


def entry(
    gen: int, phase: int, step: int, weight: float, at_s: float, by: str = "controller"
) -> admin_pb2.StageRecord:
    gate = P.GateResult(
        name="errors", verdict="no_harm", unit="pts", estimate=0.001, lower=-0.002, upper=0.004, margin=0.01
    )
    return admin_pb2.StageRecord(
        generation=gen,
        phase=phase,  # type: ignore[arg-type]
        step_index=step,
        candidate_weight=weight,
        at_unix_nano=round((T0 + at_s) * NS),
        reason=f"reason {gen}",
        decided_by=by,
        gate_results=[gate],
    )


def ending(phase: int, at_s: float, gen: int, by: str = "controller") -> P.RolloutState:
    return P.RolloutState(
        agent="support-bot",
        rollout_id="abc123def456",
        generation=gen,
        phase=phase,  # type: ignore[arg-type]
        stable_version_id="1a2b3c4d5e6f",
        candidate_version_id="9f8e7d6c5b4a",
        started_at_unix_nano=round(T0 * NS),
        decided_at_unix_nano=round((T0 + at_s) * NS),
        decided_by=by,
        reason=f"reason {gen}",
        spec_yaml=SPEC,
        alpha=0.02,
    )


def timeline() -> list[admin_pb2.StageRecord]:
    return [
        entry(1, P.ROLLOUT_PHASE_RUNNING, 0, 0.05, 0, by="token:ci"),
        entry(2, P.ROLLOUT_PHASE_RUNNING, 1, 0.5, 60),
        entry(3, P.ROLLOUT_PHASE_HOLD, 1, 0.5, 90),
        entry(4, P.ROLLOUT_PHASE_RUNNING, 1, 0.5, 100, by="token:ops"),
        entry(5, P.ROLLOUT_PHASE_ROLLED_BACK, 1, 0.0, 130),
    ]


def test_history_record_has_stages_decisions_and_durations() -> None:
    record = build_record(ending(P.ROLLOUT_PHASE_ROLLED_BACK, 130, 5), timeline(), 600, T0 + 130)
    assert record.duration_s == 130 and record.spec_yaml == SPEC and record.decided_by == "controller"
    assert [(s.step_index, s.candidate_weight, s.duration_s, s.ended, s.holds) for s in record.stages] == [
        (0, 0.05, 60, "advanced", 0),
        (1, 0.5, 70, "rolled_back", 1),
    ]
    assert record.stages[0].entered_at_unix_nano == record.started_at_unix_nano
    assert record.stages[1].left_at_unix_nano == record.ended_at_unix_nano
    assert [d.decided_by for d in record.decisions] == [
        "token:ci",
        "controller",
        "controller",
        "token:ops",
        "controller",
    ]
    assert record.decisions[-1].gate_results[0].upper == pytest.approx(0.004)
    assert record.baseline_s == 0  # only a promotion gets a baseline


def test_history_record_bounds_its_decisions_keeping_the_first_and_newest() -> None:
    many = [entry(1, P.ROLLOUT_PHASE_RUNNING, 0, 0.05, 0)]
    many += [
        entry(g, P.ROLLOUT_PHASE_HOLD if g % 2 else P.ROLLOUT_PHASE_RUNNING, 0, 0.05, g)
        for g in range(2, 150)
    ]
    many.append(entry(150, P.ROLLOUT_PHASE_ABORTED, 0, 0.0, 150))
    record = build_record(ending(P.ROLLOUT_PHASE_ABORTED, 150, 150), many, 0, T0 + 150)
    assert len(record.decisions) == MAX_DECISIONS and record.decisions_dropped == 50
    assert record.decisions[0].generation == 1 and record.decisions[-1].generation == 150
    assert record.stages[0].holds == 74  # counted over the whole timeline, not only what was kept


def test_history_record_refuses_a_rollout_that_has_not_ended() -> None:
    with pytest.raises(ValueError, match="has not ended"):
        build_record(ending(P.ROLLOUT_PHASE_RUNNING, 10, 2), timeline()[:2], 0, T0)
    assert stages_of([], 0) == []


def test_history_baseline_is_due_after_the_promotion_and_taken_once() -> None:
    record = build_record(ending(P.ROLLOUT_PHASE_PROMOTED, 100, 3), timeline()[:2], 600, T0 + 100)
    assert record.baseline_due_unix_nano == round((T0 + 700) * NS)
    assert not baseline_pending(record, T0 + 699) and baseline_pending(record, T0 + 700)
    stats = WindowStats(requests=40, errors=10, error_rate=0.25, task_successes=3, task_failures=1)
    taken = with_baseline(record, stats, T0 + 701, partial=False)
    assert taken.revision == 2 and taken.baseline.requests == 40 and taken.baseline.task_failure_rate == 0.25
    assert not baseline_pending(taken, T0 + 10_000)


def test_history_signed_records_verify_and_forgeries_do_not() -> None:
    verifier = outrider.Verifier([TEST_SIGNER.public])
    record = build_record(ending(P.ROLLOUT_PHASE_ABORTED, 10, 2), timeline()[:1], 0, T0 + 10)
    signed = sign_record(record, TEST_SIGNER)
    assert signed.key == b"abc123def456" and open_record(verifier, signed) == ("", record)
    intruder = sign_record(record, outrider.SigningKey.generate())
    assert open_record(verifier, intruder) == ("unknown_key", None)
    tampered = outrider.SignedRecord(signed.key, signed.value + b"\x00", signed.headers)
    assert open_record(verifier, tampered) == ("bad_signature", None)
    unsigned = outrider.SignedRecord(signed.key, signed.value, ())
    assert open_record(outrider.Verifier([TEST_SIGNER.public], "warn"), unsigned) == ("unsigned", None)
    moved = outrider.SignedRecord(b"other", signed.value, tuple(TEST_SIGNER.sign(b"other", signed.value)))
    assert open_record(verifier, moved) == ("bad_key", None)
    # a signed control record replayed onto the deployments topic is not a deployment record
    value, headers = outrider.encode_control(P.ControlMessage(rollout=ending(P.ROLLOUT_PHASE_ABORTED, 1, 1)))
    control = outrider.SignedRecord(
        b"abc123def456", value, (*headers, *TEST_SIGNER.sign(b"abc123def456", value))
    )
    assert open_record(verifier, control)[1] is None


def test_history_keeps_the_newest_revision_lists_newest_first_and_round_trips_state_dir(
    tmp_path: Path,
) -> None:
    verifier = outrider.Verifier([TEST_SIGNER.public])
    history = DeploymentHistory(verifier, tmp_path)
    old = build_record(ending(P.ROLLOUT_PHASE_PROMOTED, 100, 3), timeline()[:2], 600, T0 + 100)
    new = with_baseline(old, WindowStats(requests=5), T0 + 800, partial=False)
    assert history.add(sign_record(new, TEST_SIGNER), new)
    assert not history.add(sign_record(old, TEST_SIGNER), old)  # a replay of the older revision
    later = deployment_pb2.DeploymentRecord()
    later.CopyFrom(old)
    later.rollout_id, later.started_at_unix_nano, later.generation = "fedcba987654", old.ended_at_unix_nano, 9
    history.add(sign_record(later, TEST_SIGNER), later)
    assert [s.rollout_id for s in history.list("support-bot")] == ["fedcba987654", "abc123def456"]
    assert [s.rollout_id for s in history.list("support-bot", 1)] == ["fedcba987654"]
    assert history.list("nobody") == []

    for rollout_id in ("abc123def456", "fedcba987654"):
        signed, record = history.signed(rollout_id), history.get(rollout_id)
        assert signed is not None and record is not None
        history.save(signed, record)
    path = tmp_path / "deployments" / "fedcba987654.json"
    document = json.loads(path.read_text())
    document["readable"]["reason"] = "edited by hand"  # the readable copy is not trusted
    document["record"]["value"] = document["record"]["value"][:-4] + "AAAA"  # the signed bytes are
    path.write_text(json.dumps(document))
    (tmp_path / "deployments" / "junk.json").write_text("not json")
    rejected: list[str] = []
    fresh = DeploymentHistory(verifier, tmp_path, rejected.append)
    assert fresh.load_dir() == 1 and fresh.mine == {"abc123def456"}
    assert fresh.get("abc123def456") == new and rejected == ["bad_signature"]
    with pytest.raises(ValueError, match="not usable as a file name"):
        history.path("../escape")


def test_history_spec_baseline_default_is_capped_and_validated() -> None:
    spec = load_spec_text(SPEC)
    assert spec.baseline is None and spec.baseline_s(900) == 600 and spec.baseline_s(120) == 120
    assert load_spec_text(SPEC + "baseline: 2m\n").baseline_s(900) == 120
    assert load_spec_text(SPEC + "baseline: 0s\n").baseline_s(900) == 0
    with pytest.raises(SpecError, match="baseline"):
        load_spec_text(SPEC + "baseline: soon\n", "r.yaml")


def test_history_recorder_listens_only_to_endings_and_never_raises() -> None:
    ctl = RolloutController("support-bot")
    spec = load_spec_text(SPEC + "baseline: 1m\n")
    ctl.start(spec, SPEC, T0, "token:ci")
    history = DeploymentHistory(outrider.Verifier([TEST_SIGNER.public]), None)
    metrics = CollectorMetrics()
    recorder = DeploymentRecorder(
        history,
        lambda agent: ctl,
        RollingWindows(1.0, 900.0),
        TEST_SIGNER,
        "127.0.0.1:1",
        1.0,
        900.0,
        metrics,
        1,
    )
    first = ctl.state
    assert first is not None
    recorder(first, None)
    assert len(history) == 0  # still running
    promoted = ctl.propose_promote("go", T0 + 30, "token:ci")
    ctl.apply(promoted)
    fan_out(lambda s, p: 1 / 0, recorder)(promoted, first)  # one listener's bug skips no other
    record = history.get(promoted.rollout_id)
    assert record is not None and record.baseline_s == 60 and history.mine == {promoted.rollout_id}
    assert [s.ended for s in record.stages] == ["promoted"]
    recorder(promoted, promoted)  # told again (a republish): nothing new
    assert recorder.take_baselines(T0 + 89) == 0 and recorder.take_baselines(T0 + 90) == 1
    assert recorder.take_baselines(T0 + 91) == 0
    # the queue (size 1) is full: the second record is served but counted as dropped
    assert metrics.deployment_records.labels("dropped")._value.get() == 1


def test_history_renders_lines_and_json() -> None:
    record = build_record(ending(P.ROLLOUT_PHASE_ROLLED_BACK, 130, 5), timeline(), 0, T0 + 130)
    summary = deployment_pb2.DeploymentSummary(
        rollout_id=record.rollout_id,
        stable_version_id="1a2b3c4d5e6f",
        candidate_version_id="9f8e7d6c5b4a",
        outcome=P.ROLLOUT_PHASE_ROLLED_BACK,
        started_at_unix_nano=record.started_at_unix_nano,
        duration_s=130,
        decided_by="controller",
    )
    header, row = history_lines("support-bot", [summary])
    assert header.split() == [
        "ROLLOUT",
        "STABLE",
        "->",
        "CANDIDATE",
        "OUTCOME",
        "STARTED",
        "DURATION",
        "DECIDED",
        "BY",
    ]
    assert row.split()[:4] == ["abc123def456", "1a2b3c4d5e6f", "->", "9f8e7d6c5b4a"]
    assert "rolled back" in row and "2m 10s" in row and row.endswith("controller")
    assert history_lines("x", []) == ["no ended rollouts of x on record"]
    text = "\n".join(show_lines(record))
    assert "outcome     rolled back at 2023-11-14 22:15:30Z (by controller)" in text
    assert (
        "gate errors: no harm  +0.10 [-0.20, +0.40] % points, margin 1.00 % points" in text
        and "% points" in text
        and "baseline    none" in text
    )
    assert "  steps: [{weight: 5, min_duration: 1m}" in text
    assert yaml.safe_load(json.dumps(record_json(record)))["rollout_id"] == "abc123def456"
    assert took(45) == "45s" and took(725) == "12m 5s" and took(12_000) == "3h 20m" and when(0) == "-"


def test_history_record_stays_below_the_broker_message_limit() -> None:
    from collector._deployments import MAX_RECORD_BYTES

    many = [entry(g, P.ROLLOUT_PHASE_RUNNING, 0, 0.05, g) for g in range(1, 100)]
    for e in many:
        e.gate_results[0].detail = "x" * 20_000  # 99 decisions of 20 kB: about 2 MB
    many.append(entry(100, P.ROLLOUT_PHASE_ABORTED, 0, 0.0, 100))
    record = build_record(ending(P.ROLLOUT_PHASE_ABORTED, 100, 100), many, 0, T0 + 100)
    assert record.ByteSize() <= MAX_RECORD_BYTES
    assert record.decisions[0].generation == 1 and record.decisions[-1].generation == 100
    assert record.decisions_dropped == 100 - len(record.decisions)
