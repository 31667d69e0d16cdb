"""Self-contained session tokens: the pin travels in the session id.

A token is ``base64url(compact JSON) + "." + base64url(truncated HMAC-SHA256)`` over the
payload with the session key. Any replica that shares the key can verify it and honour the
pin without shared state. The JSON holds the session nonce (what events call the session),
the pinned version id, the role, the rollout id, the expiry, the user and tenant, when it
was issued, and (per-tenant canaries only) the tenant's group: tokens without it read "".

A session lasts until its expiry (`session_ttl` after it was issued) and never longer than
the verifying replica's `max_age_s` (`max_session_duration`) after it was issued: a replica
with a shorter cap enforces it on tokens another replica issued.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from cachetools import LRUCache

from outrider.clock import Clock

MAC_BYTES = 16
NONCE_BYTES = 12
VERIFIED_CACHE = 8192  # tokens verified once and remembered: live sessions, not every one seen


class SessionError(Exception):
    """A session id that cannot be used."""


class UnknownSession(SessionError):
    """Malformed, forged or signed with another key."""


class SessionExpired(SessionError):
    """Genuine but past its expiry."""


@dataclass(frozen=True, slots=True)
class Session:
    nonce: str
    version_id: str
    role: int  # outrider.v1.Role
    rollout_id: str
    expires_at: float  # Unix seconds
    user_id: str = ""
    tenant_id: str = ""
    issued_at: float = 0.0  # Unix seconds; 0 for tokens from before it was recorded
    cohort: str = ""  # "opt_in", "excluded" or "split" (sidecar.routing._tenants); "" without lists


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


class SessionCodec:
    """Issues and verifies session tokens with one HMAC key and a clock."""

    def __init__(self, key: bytes, clock: Clock, ttl_s: float, max_age_s: float | None = None) -> None:
        if not key:
            raise ValueError("session key must not be empty")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError("max_age_s must be positive")
        self._key = key
        self._clock = clock
        # A session's every turn carries the same token: verify its MAC and parse it once.
        # Only genuine tokens enter (a forged one never evicts a live session); expiry and
        # max age are still checked on every use, against the clock.
        self._verified: LRUCache[str, Session] = LRUCache(VERIFIED_CACHE)
        self.ttl_s = ttl_s
        self.max_age_s = max_age_s

    def __repr__(self) -> str:
        return f"SessionCodec(ttl_s={self.ttl_s})"  # never the key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:MAC_BYTES]

    def issue(
        self,
        *,
        nonce: str,
        version_id: str,
        role: int,
        rollout_id: str,
        user_id: str = "",
        tenant_id: str = "",
        cohort: str = "",
    ) -> tuple[str, Session]:
        """A new token and the session it encodes, expiring ttl_s from now."""
        now = self._clock.now()
        lifetime = self.ttl_s if self.max_age_s is None else min(self.ttl_s, self.max_age_s)
        expires_ms = int((now + lifetime) * 1000)
        issued_ms = int(now * 1000)
        session = Session(
            nonce,
            version_id,
            role,
            rollout_id,
            expires_ms / 1000,
            user_id,
            tenant_id,
            issued_ms / 1000,
            cohort,
        )
        return self.encode(session), session

    def encode(self, session: Session) -> str:
        fields: dict[str, str | int] = {
            "n": session.nonce,
            "v": session.version_id,
            "r": session.role,
            "o": session.rollout_id,
            "e": round(session.expires_at * 1000),
            "u": session.user_id,
            "t": session.tenant_id,
            "i": round(session.issued_at * 1000),
        }
        if session.cohort:  # only per-tenant canaries: other tokens stay as they were
            fields["c"] = session.cohort
        payload = json.dumps(fields, separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def decode(self, token: str, *, allow_expired: bool = False) -> Session:
        """The session of a token; UnknownSession if not ours, SessionExpired if too old."""
        session = self._verified.get(token)
        if session is None:
            session = self._verify(token)
            self._verified[token] = session
        if not allow_expired:
            now = self._clock.now()
            if now >= session.expires_at:
                raise SessionExpired("session expired; open a new one")
            if self.max_age_s is not None and session.issued_at and now >= session.issued_at + self.max_age_s:
                raise SessionExpired("session reached max_session_duration; open a new one")
        return session

    def _verify(self, token: str) -> Session:
        """The session a genuine token encodes (its MAC checked), expiry not considered."""
        body, sep, mac = token.partition(".")
        if not sep or not body or not mac:
            raise UnknownSession("unknown session")
        try:
            payload = _unb64(body)
            given = _unb64(mac)
        except (binascii.Error, ValueError):
            raise UnknownSession("unknown session") from None
        if not hmac.compare_digest(given, self._mac(payload)):
            raise UnknownSession("unknown session")
        try:
            data = json.loads(payload)
            return Session(
                nonce=str(data["n"]),
                version_id=str(data["v"]),
                role=int(data["r"]),
                rollout_id=str(data["o"]),
                expires_at=int(data["e"]) / 1000,
                user_id=str(data.get("u", "")),
                tenant_id=str(data.get("t", "")),
                issued_at=int(data.get("i", 0)) / 1000,
                cohort=str(data.get("c", "")),
            )
        except (ValueError, KeyError, TypeError):
            raise UnknownSession("unknown session") from None
