"""The wire contract: generated code is current, envelopes round-trip, garbage is refused."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

import outrider
from outrider.v1 import control_pb2, events_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc produced nothing"
    stale = [
        str(rel) for rel in generated if not filecmp.cmp(tmp_path / rel, ROOT / "proto" / rel, shallow=False)
    ]
    assert not stale, f"regenerate with `make proto`: {stale}"


def test_public_surface() -> None:
    assert sorted(outrider.__all__) == sorted(
        [
            "COMMANDS_TOPIC",
            "CONTENT_TYPE_HEADER",
            "CONTROL_TOPIC",
            "DEADLETTER_TOPIC",
            "DEPLOYMENTS_TOPIC",
            "ERROR_DOMAIN",
            "EVENTS_TOPIC",
            "RETRY_AFTER_MS_KEY",
            "TRACEPARENT_KEY",
            "TRACESTATE_KEY",
            "FLAG_OFF",
            "SCHEMA_HEADER",
            "SCHEMA_VERSION",
            "MARKER_KEY_PREFIX",
            "SESSION_DRAINED",
            "SESSION_EXPIRED",
            "SPANS_TOPIC",
            "TOOL_REJECTED",
            "VERSIONS_TOPIC",
            "ID_MISMATCH",
            "NOT_CANONICAL",
            "canonical_form",
            "check_version",
            "open_version",
            "version_id_of",
            "version_key",
            "DecodeError",
            "SigningKeyError",
            "RejectLog",
            "SignedRecord",
            "SigningKey",
            "Verdict",
            "Verifier",
            "VerifyMode",
            "agent_key",
            "deployment_key",
            "flag_key",
            "is_marker",
            "key_id",
            "load_public_keys",
            "load_records",
            "open_control",
            "ordering",
            "quota_key",
            "rollout_key",
            "save_records",
            "decode_control",
            "decode_event",
            "decode_event_head",
            "check_event_headers",
            "encode_control",
            "encode_event",
        ]
    )
    # the signing/registry/control-record names load on first use (they need cryptography)
    assert all(getattr(outrider, name) is not None for name in outrider.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = outrider.nope  # type: ignore[attr-defined]


def test_event_round_trip() -> None:
    event = events_pb2.Event(event_id="e1", agent="a", version_id="v", time_unix_nano=5)
    event.call.latency_ms = 12.5
    value, headers = outrider.encode_event(event)
    assert outrider.decode_event(value, headers) == event


@pytest.mark.parametrize("value", [b"", b"\xff\xff\xff", events_pb2.Event(agent="a").SerializeToString()])
def test_garbage_events_are_refused(value: bytes) -> None:
    with pytest.raises(outrider.DecodeError):
        outrider.decode_event(value, [])


def test_newer_schema_is_refused() -> None:
    event = events_pb2.Event(event_id="e1", agent="a")
    event.feedback.score = 1
    value, headers = outrider.encode_event(event)
    newer = [(k, b"99" if k == outrider.SCHEMA_HEADER else v) for k, v in headers]
    with pytest.raises(outrider.DecodeError, match="newer"):
        outrider.decode_event(value, newer)


def test_control_round_trip_and_wrong_type() -> None:
    message = control_pb2.ControlMessage(rollout=control_pb2.RolloutState(agent="a", generation=3))
    value, headers = outrider.encode_control(message)
    assert outrider.decode_control(value, headers).rollout.generation == 3
    event_value, event_headers = outrider.encode_event(events_pb2.Event(event_id="e", agent="a"))
    with pytest.raises(outrider.DecodeError, match="content type"):
        outrider.decode_control(event_value, event_headers)


def test_agent_key() -> None:
    assert outrider.agent_key("bot") == b"bot"
    with pytest.raises(ValueError, match="agent"):
        outrider.agent_key("")


def test_headers_are_judged_each_time_they_change() -> None:
    # the last accepted headers are remembered; any other set is judged afresh, never waved through
    event = events_pb2.Event(event_id="e1", agent="a")
    event.feedback.score = 1
    value, headers = outrider.encode_event(event)
    good = tuple(headers)
    newer = tuple((k, b"99" if k == outrider.SCHEMA_HEADER else v) for k, v in headers)
    foreign = ((outrider.CONTENT_TYPE_HEADER, b"application/json"),)
    assert outrider.decode_event_head(value, good) == (event, "e1", "a", "feedback")
    for _ in range(2):
        assert outrider.decode_event(value, good) == event
        with pytest.raises(outrider.DecodeError, match="newer"):
            outrider.decode_event(value, newer)
        with pytest.raises(outrider.DecodeError, match="content type"):
            outrider.decode_event(value, foreign)
    mutable = [list(pair) for pair in newer]  # unhashable: judged every time, never remembered
    with pytest.raises(outrider.DecodeError, match="newer"):
        outrider.decode_event(value, mutable)  # type: ignore[arg-type]
    assert outrider.decode_event(value, list(good)) == event
    with pytest.raises(outrider.DecodeError, match="newer"):
        outrider.decode_event(value, mutable)  # type: ignore[arg-type]
