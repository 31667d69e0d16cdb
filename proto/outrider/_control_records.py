"""Reading and keeping signed `outrider.control` records, the same way on both sides.

`open_control` verifies a record's signature, decodes it and checks that its key is the one
its body calls for (`rollout/<agent>`, `quota/<resource>`, `flag/<agent>/<name>`).
`SignedRecord` is a record as it was on the topic (key, value, headers), which is what the
collector's state copy and the sidecar's persisted state keep: a reader re-verifies it when it
loads it, so a file on disk is trusted no more than the topic.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from outrider._envelope import DecodeError, decode_control
from outrider._signing import BAD_KEY, Verdict, Verifier
from outrider._topics import MARKER_KEY_PREFIX, flag_key, quota_key, rollout_key
from outrider.v1 import control_pb2

UNDECODABLE = "undecodable"
STATE_FORMAT = 1


def ordering(state: control_pb2.RolloutState) -> tuple[int, int]:
    """Rollout states are ordered by the writer's epoch first, then the generation."""
    return (state.epoch, state.generation)


def is_marker(key: bytes | None) -> bool:
    return key is not None and key.startswith(MARKER_KEY_PREFIX.encode())


def expected_key(message: control_pb2.ControlMessage) -> bytes | None:
    body = message.WhichOneof("body")
    if body == "rollout" and message.rollout.agent:
        return rollout_key(message.rollout.agent)
    if body == "quota" and message.quota.resource:
        return quota_key(message.quota.resource)
    if body == "flag" and message.flag.agent and message.flag.name:
        return flag_key(message.flag.agent, message.flag.name)
    return None


def open_control(
    verifier: Verifier, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None
) -> tuple[Verdict, control_pb2.ControlMessage | None]:
    """Verify, then decode. A verdict that is not ok comes with no message."""
    verdict = verifier.verify(key, value, headers)
    if not verdict.ok:
        return verdict, None
    try:
        message = decode_control(value, headers)
    except DecodeError:
        return Verdict(False, UNDECODABLE, verdict.key_id, verdict.issued_at_ns), None
    wanted = expected_key(message)
    # unsigned records (only let through by `warn`) may come from a collector that keyed by agent
    if wanted is not None and key != wanted and verdict.signed:
        return Verdict(False, BAD_KEY, verdict.key_id, verdict.issued_at_ns), None
    return verdict, message


@dataclass(frozen=True, slots=True)
class SignedRecord:
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    def to_json(self) -> dict[str, object]:
        b64 = base64.b64encode
        return {
            "key": b64(self.key).decode() if self.key is not None else None,
            "value": b64(self.value).decode(),
            "headers": [[k, b64(v).decode()] for k, v in self.headers],
        }

    @classmethod
    def from_json(cls, data: object) -> SignedRecord:
        if not isinstance(data, dict):
            raise TypeError("a record must be an object")
        key = data.get("key")
        return cls(
            base64.b64decode(key) if key is not None else None,
            base64.b64decode(data["value"]),
            tuple((str(k), base64.b64decode(v)) for k, v in data.get("headers") or ()),
        )


def save_records(path: Path, records: Sequence[SignedRecord], extra: dict[str, object] | None = None) -> None:
    """Replace `path` atomically with `records` (blocking: run in a thread on a loop)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"format": STATE_FORMAT, "records": [r.to_json() for r in records], "extra": extra or {}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(document, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_records(path: Path) -> tuple[list[SignedRecord], dict[str, object]]:
    """The records in `path` (none when it does not exist); ValueError when it is unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], {}
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: not a control state file: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a control state file of format {STATE_FORMAT}")
    try:
        records = [SignedRecord.from_json(r) for r in document.get("records") or ()]
        extra = document.get("extra") or {}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a control state file: {exc}") from None
    return records, dict(extra)
