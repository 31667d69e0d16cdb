"""Signed control records (Ed25519).

Every record on `outrider.control` carries three headers:

- `outrider-key-id`: which key signed it (the first 16 hex digits of the SHA-256 of the raw
  32-byte public key, so a key id can never disagree with its key);
- `outrider-issued-at`: when it was signed, in Unix nanoseconds (decimal ASCII);
- `outrider-signature`: the 64-byte Ed25519 signature over
  `b"outrider.control.v1\\0" + len(key) (4 bytes) + key + issued_at (8 bytes) + value`.

The record key is inside the signature, so a signed state cannot be replayed under another
key, and the issue time is, so it cannot be back- or forward-dated. A reader holds several
public keys at once (rotation: add the new key everywhere, switch the writer, then drop
the old key). Keys are files (PEM, as `outrider keygen` writes them) or inline text
`ed25519:<base64 of the raw public key>`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_ID_HEADER = "outrider-key-id"
SIGNATURE_HEADER = "outrider-signature"
ISSUED_AT_HEADER = "outrider-issued-at"
INLINE_PREFIX = "ed25519:"
_DOMAIN = b"outrider.control.v1\x00"

VerifyMode = Literal["enforce", "warn"]
# reasons a record is rejected (the `reason` label of outrider_control_rejected_total)
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
UNKNOWN_KEY = "unknown_key"
STALE = "stale"  # older than the state in hand: a replay
BAD_KEY = "bad_key"  # the record key does not match what the record says it is


class SigningKeyError(ValueError):
    """A key file or inline key that cannot be used."""


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    """The id of a public key: 16 hex digits of its SHA-256."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def signed_bytes(key: bytes | None, value: bytes, issued_at_ns: int) -> bytes:
    """What the signature covers."""
    k = key or b""
    return _DOMAIN + len(k).to_bytes(4, "big") + k + issued_at_ns.to_bytes(8, "big", signed=True) + value


class SigningKey:
    """The writer's private key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """A PEM (PKCS#8) Ed25519 private key file."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"{path}: cannot read signing key: {exc.strerror or exc}") from None
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"{path}: not a PEM private key: {exc}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise SigningKeyError(f"{path}: not an Ed25519 private key")
        return cls(private)

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_pem(self) -> bytes:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_text(self) -> str:
        """The public key inline: `ed25519:<base64>`."""
        return INLINE_PREFIX + base64.b64encode(_raw(self.public)).decode()

    def sign(
        self, key: bytes | None, value: bytes, issued_at_ns: int | None = None
    ) -> list[tuple[str, bytes]]:
        """The signature headers for one record."""
        issued = time.time_ns() if issued_at_ns is None else issued_at_ns
        signature = self._private.sign(signed_bytes(key, value, issued))
        return [
            (KEY_ID_HEADER, self.key_id.encode()),
            (ISSUED_AT_HEADER, str(issued).encode()),
            (SIGNATURE_HEADER, signature),
        ]

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write `<key id>.key` (mode 0600) and `<key id>.pub` into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        private_path = directory / f"{self.key_id}.key"
        public_path = directory / f"{self.key_id}.pub"
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self.private_pem())
        public_path.write_bytes(self.public_pem())
        return private_path, public_path


def load_public_key(spec: str) -> Ed25519PublicKey:
    """A public key from `ed25519:<base64>` or a PEM file path."""
    spec = spec.strip()
    if spec.startswith(INLINE_PREFIX):
        try:
            return Ed25519PublicKey.from_public_bytes(
                base64.b64decode(spec[len(INLINE_PREFIX) :], validate=True)
            )
        except ValueError as exc:
            raise SigningKeyError(f"{spec[:24]}...: not an Ed25519 public key: {exc}") from None
    path = Path(spec)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read public key: {exc.strerror or exc}") from None
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SigningKeyError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(public, Ed25519PublicKey):
        raise SigningKeyError(f"{path}: not an Ed25519 public key")
    return public


def load_public_keys(specs: Iterable[str]) -> list[Ed25519PublicKey]:
    """Public keys from specs; a directory contributes every `*.pub` in it."""
    keys: list[Ed25519PublicKey] = []
    for spec in specs:
        if not spec.strip():
            continue
        if not spec.startswith(INLINE_PREFIX) and Path(spec).is_dir():
            keys.extend(load_public_key(str(p)) for p in sorted(Path(spec).glob("*.pub")))
        else:
            keys.append(load_public_key(spec))
    return keys


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str = ""  # why not, when not ok
    key_id: str = ""
    issued_at_ns: int = 0
    signed: bool = False  # False for an unsigned record let through by `warn`


def _header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> bytes | None:
    for k, v in headers or ():
        if k == name:
            return v
    return None


class Verifier:
    """Checks control records against the configured public keys."""

    def __init__(self, public_keys: Iterable[Ed25519PublicKey], mode: VerifyMode = "enforce") -> None:
        self._keys = {key_id(k): k for k in public_keys}
        self.mode = mode

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def verify(
        self, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None
    ) -> Verdict:
        raw_kid = _header(headers, KEY_ID_HEADER)
        signature = _header(headers, SIGNATURE_HEADER)
        raw_issued = _header(headers, ISSUED_AT_HEADER)
        kid = raw_kid.decode("ascii", "replace") if raw_kid else ""
        if signature is None or raw_kid is None or raw_issued is None:
            if self.mode == "warn" and signature is None and raw_kid is None:
                return Verdict(True, UNSIGNED, kid, 0, signed=False)
            return Verdict(False, UNSIGNED, kid)
        try:
            issued = int(raw_issued)
        except ValueError:
            return Verdict(False, BAD_SIGNATURE, kid)
        public = self._keys.get(kid)
        if public is None:
            return Verdict(False, UNKNOWN_KEY, kid, issued)
        try:
            public.verify(signature, signed_bytes(key, value or b"", issued))
        except InvalidSignature:
            return Verdict(False, BAD_SIGNATURE, kid, issued)
        return Verdict(True, "", kid, issued, signed=True)


class RejectLog:
    """Rate-limited warnings about rejected records: at most one per reason per interval,
    naming the key id and offset, with how many were not logged since."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log, self._interval = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def rejected(self, reason: str, key_id: str, offset: int, key: bytes | None) -> None:
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self._interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last[reason] = now
        more = self._suppressed.pop(reason, 0)
        self._log.warning(
            "control: rejected record at offset %d (key %r, key id %s): %s%s",
            offset,
            (key or b"").decode("utf-8", "replace")[:80],
            key_id or "none",
            reason,
            f" ({more} more rejected for {reason} since the last warning)" if more else "",
        )
