"""The version registry's shared rules: a version's id from its canonical JSON, and opening a
signed record of `outrider.versions` (the same Ed25519 signatures as `outrider.control`).

Both sides compute the id here, so the collector can check a push without the sidecar's
config model: the id is the first 12 hex digits of the SHA-256 of the canonical JSON (sorted
keys, no spaces), which is what `sidecar.VersionConfig.canonical_json` produces.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from google.protobuf.message import DecodeError as _ProtoDecodeError

from outrider._signing import BAD_KEY, UNSIGNED, Verdict, Verifier
from outrider._topics import version_key
from outrider.v1 import registry_pb2

VERSION_ID_LENGTH = 12
# reasons a version record is rejected, besides the signature's (outrider._signing)
UNDECODABLE = "undecodable"
ID_MISMATCH = "id_mismatch"
NOT_CANONICAL = "not_canonical"


def version_id_of(canonical_json: str) -> str:
    """The id of a version: 12 hex digits of sha256 over its canonical JSON."""
    return hashlib.sha256(canonical_json.encode()).hexdigest()[:VERSION_ID_LENGTH]


def canonical_form(text: str) -> str:
    """`text` (a JSON object) in canonical form; ValueError when it is not a JSON object."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")  # noqa: TRY004 (callers catch ValueError, as for bad JSON)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def check_version(version: registry_pb2.RegistryVersion) -> str:
    """Why `version` is not self-consistent ("" when it is): its JSON must be canonical and
    hash to its id."""
    try:
        canonical = canonical_form(version.canonical_json)
    except ValueError:
        return NOT_CANONICAL
    if canonical != version.canonical_json:
        return NOT_CANONICAL
    if version_id_of(canonical) != version.version_id:
        return ID_MISMATCH
    return ""


def open_version(
    verifier: Verifier, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None
) -> tuple[Verdict, registry_pb2.RegistryVersion | None]:
    """Verify, decode and check one `outrider.versions` record. Unsigned records are refused
    whatever the verify mode (no collector ever wrote unsigned versions)."""
    verdict = verifier.verify(key, value, headers)
    if not verdict.ok or not verdict.signed:
        return Verdict(False, verdict.reason or UNSIGNED, verdict.key_id, verdict.issued_at_ns), None
    version = registry_pb2.RegistryVersion()
    try:
        version.ParseFromString(value or b"")
    except _ProtoDecodeError:
        return Verdict(False, UNDECODABLE, verdict.key_id, verdict.issued_at_ns), None
    if not version.agent or not version.version_id or key != version_key(version.agent, version.version_id):
        return Verdict(False, BAD_KEY, verdict.key_id, verdict.issued_at_ns), None
    problem = check_version(version)
    if problem:
        return Verdict(False, problem, verdict.key_id, verdict.issued_at_ns), None
    return verdict, version
