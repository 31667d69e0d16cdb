"""Signing and verifying control records (outrider._signing, outrider._control_records)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

import outrider
from devstack.cli import main
from outrider.v1 import control_pb2
from tests.support import signed_control


def state(generation: int = 1, epoch: int = 1) -> control_pb2.ControlMessage:
    return control_pb2.ControlMessage(
        rollout=control_pb2.RolloutState(agent="bot", generation=generation, epoch=epoch, rollout_id="r")
    )


def test_signature_verifies_with_any_of_several_keys_for_rotation() -> None:
    old, new = outrider.SigningKey.generate(), outrider.SigningKey.generate()
    verifier = outrider.Verifier([old.public, new.public])
    for signer in (old, new):
        key, value, headers = signed_control(state(), signer)
        verdict, message = outrider.open_control(verifier, key, value, headers)
        assert verdict.ok and verdict.signed and verdict.key_id == signer.key_id
        assert message is not None and message.rollout.generation == 1
    assert verifier.key_ids == sorted([old.key_id, new.key_id])
    assert outrider.Verifier([outrider.load_public_keys([new.public_text()])[0]]).key_ids == [new.key_id]


@pytest.mark.parametrize(
    "forge",
    [
        "tampered_value",
        "other_record_key",
        "other_issue_time",
        "stolen_key_id",
        "unknown_key",
        "garbage_signature",
    ],
)
def test_forged_signature_is_rejected(forge: str) -> None:
    signer, attacker = outrider.SigningKey.generate(), outrider.SigningKey.generate()
    verifier = outrider.Verifier([signer.public])
    key, value, headers = signed_control(state(), signer)
    h = dict(headers)
    if forge == "tampered_value":
        value = state(generation=2**62).SerializeToString()
    elif forge == "other_record_key":
        key = outrider.rollout_key("other")
    elif forge == "other_issue_time":
        h[outrider._signing.ISSUED_AT_HEADER] = b"1"
    elif forge == "stolen_key_id":
        h = dict(attacker.sign(key, value))
        h[outrider._signing.KEY_ID_HEADER] = signer.key_id.encode()
    elif forge == "unknown_key":
        h = dict(attacker.sign(key, value))
    else:
        h[outrider._signing.SIGNATURE_HEADER] = b"\x00" * 64
    verdict, message = outrider.open_control(verifier, key, value, list(h.items()))
    assert message is None and not verdict.ok
    assert verdict.reason == ("unknown_key" if forge == "unknown_key" else "bad_signature")


def test_unsigned_records_rejected_by_enforce_and_applied_by_warn() -> None:
    key, value, headers = signed_control(state(), None)
    verdict, message = outrider.open_control(outrider.Verifier([], "enforce"), key, value, headers)
    assert message is None and verdict.reason == "unsigned"
    verdict, message = outrider.open_control(outrider.Verifier([], "warn"), key, value, headers)
    assert message is not None and verdict.ok and not verdict.signed
    # a half-signed record (a key id, no signature) is never "unsigned from an older collector"
    partial = [*headers, (outrider._signing.KEY_ID_HEADER, b"abc")]
    verdict, message = outrider.open_control(outrider.Verifier([], "warn"), key, value, partial)
    assert message is None


def test_signed_record_under_the_wrong_kind_of_key_is_rejected() -> None:
    signer = outrider.SigningKey.generate()
    value, headers = outrider.encode_control(state())
    key = outrider.agent_key("bot")  # the pre-signing key layout, signed: not where it belongs
    verdict, _ = outrider.open_control(
        outrider.Verifier([signer.public]), key, value, [*headers, *signer.sign(key, value)]
    )
    assert verdict.reason == "bad_key"


def test_persisted_records_round_trip_and_reverify(tmp_path: Path) -> None:
    signer = outrider.SigningKey.generate()
    key, value, headers = signed_control(state(generation=3), signer)
    path = tmp_path / "state.json"
    outrider.save_records(path, [outrider.SignedRecord(key, value, tuple(headers))], {"epoch": 3})
    records, extra = outrider.load_records(path)
    assert extra == {"epoch": 3}
    verdict, message = outrider.open_control(
        outrider.Verifier([signer.public]), records[0].key, records[0].value, records[0].headers
    )
    assert verdict.ok and message is not None and message.rollout.generation == 3
    assert outrider.load_records(tmp_path / "missing.json") == ([], {})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a control state file"):
        outrider.load_records(path)


def test_keygen_writes_a_signature_key_pair(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keygen", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    private = next(tmp_path.glob("*.key"))
    assert private.stat().st_mode & 0o077 == 0
    signer = outrider.SigningKey.load(private)
    (public,) = outrider.load_public_keys([str(tmp_path)])  # a directory: every *.pub
    assert outrider.key_id(public) == signer.key_id and signer.key_id in result.output
    with pytest.raises(outrider.SigningKeyError):
        outrider.SigningKey.load(next(tmp_path.glob("*.pub")))


def test_reject_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    log = outrider.RejectLog(logging.getLogger("test.rejects"), interval_s=60)
    with caplog.at_level(logging.WARNING, "test.rejects"):
        for offset in range(5):
            log.rejected("unsigned", "kid1", offset, b"rollout/bot")
        log.rejected("bad_signature", "kid2", 9, b"rollout/bot")
    assert len(caplog.records) == 2
    assert "offset 0" in caplog.text and "kid2" in caplog.text and "offset 9" in caplog.text
