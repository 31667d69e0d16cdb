"""Who may call the admin API: bearer tokens and mTLS client certificates, and their roles.

A server interceptor runs before anything else, request decoding included: with no valid
credential every `outrider.v1.Admin` method answers UNAUTHENTICATED (reads, empty and
malformed requests too); a credential whose role does not allow the method gets
PERMISSION_DENIED. The servicer reads the caller from `current_identity()`, and that, never
a client's `requested_by`, is the `decided_by` of what it publishes.

- Bearer tokens: metadata `authorization: Bearer <token>`, checked against a YAML file of
  hashed tokens (`tokens: [{name, role, sha256}]`, where sha256 is the hex SHA-256 of the
  token; tokens are random, 32+ bytes, so a plain hash is enough). `outrider token` makes one.
- mTLS: with `admin_tls_client_ca`, every connection needs a client certificate signed by
  that CA. The role is a SAN URI `outrider://role/<role>`, else the subject's
  Organizational Unit; the name is the subject's Common Name.

Roles: `viewer` may read (GetRollout and later status, watch, history, show); `operator` may
do everything.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

VIEWER = "viewer"
OPERATOR = "operator"
ROLES = (VIEWER, OPERATOR)
ROLE_URI_PREFIX = "outrider://role/"
ADMIN_PREFIX = "/outrider.v1.Admin/"
# methods a viewer may call; every other Admin method needs an operator
VIEWER_METHODS = frozenset(
    {
        f"{ADMIN_PREFIX}GetRollout",
        f"{ADMIN_PREFIX}ListDeployments",
        f"{ADMIN_PREFIX}GetDeployment",
        f"{ADMIN_PREFIX}ListVersions",
        f"{ADMIN_PREFIX}ListFlags",
    }
)


class AuthConfigError(ValueError):
    """A tokens file that cannot be used."""


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    role: str
    kind: str  # "token" or "cert"

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "outrider_admin_identity", default=None
)


def current_identity() -> Identity | None:
    """The authenticated caller of the admin call being served."""
    return _current.get()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_entry(name: str, role: str, token: str) -> dict[str, str]:
    """One entry of a tokens file."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    return {"name": name, "role": role, "sha256": hash_token(token)}


class TokenBook:
    """The hashed bearer tokens of a tokens file."""

    def __init__(self, entries: dict[str, Identity]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: Path) -> TokenBook:
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise AuthConfigError(f"{path}: cannot read tokens: {exc}") from None
        entries: dict[str, Identity] = {}
        tokens = document.get("tokens") if isinstance(document, dict) else None
        if not isinstance(tokens, list):
            raise AuthConfigError(f"{path}: tokens: expected a list of {{name, role, sha256}}")
        for index, entry in enumerate(tokens):
            where = f"{path}: tokens[{index}]"
            if not isinstance(entry, dict):
                raise AuthConfigError(f"{where}: expected a mapping")
            name, role, digest = (str(entry.get(k, "")).strip() for k in ("name", "role", "sha256"))
            if not name:
                raise AuthConfigError(f"{where}.name: must not be empty")
            if role not in ROLES:
                raise AuthConfigError(f"{where}.role: must be one of {', '.join(ROLES)}")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise AuthConfigError(f"{where}.sha256: expected 64 hex digits")
            entries[digest.lower()] = Identity(name, role, "token")
        return cls(entries)

    def lookup(self, token: str) -> Identity | None:
        digest = hash_token(token)
        for known, identity in self._entries.items():
            if hmac.compare_digest(known, digest):
                return identity
        return None


def identity_from_cert(pem: bytes) -> Identity | None:
    """Name and role from a (verified) client certificate; None without a role."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else cert.subject.rfc4514_string()
    role = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(ROLE_URI_PREFIX):
                role = uri.removeprefix(ROLE_URI_PREFIX)
                break
    except x509.ExtensionNotFound:
        pass
    if role is None:
        units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        role = next((str(u.value) for u in units if str(u.value) in ROLES), None)
    if role not in ROLES:
        return None
    return Identity(name, role, "cert")


def allowed(role: str, method: str) -> bool:
    return role == OPERATOR or (role == VIEWER and method in VIEWER_METHODS)


class _Malformed:
    """What a request that did not decode becomes, so authentication still runs first."""


_MALFORMED = _Malformed()


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any decoding failure is a malformed request
            return _MALFORMED

    return decode


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """Authenticates and authorizes every `outrider.v1.Admin` call (health and reflection pass)."""

    def __init__(self, tokens: TokenBook | None, *, certs: bool) -> None:
        self._tokens, self._certs = tokens, certs

    def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity | None:
        if self._certs:
            pems = list(context.auth_context().get("x509_pem_cert") or [])
            if pems and (identity := identity_from_cert(pems[0])) is not None:
                return identity
        if self._tokens is not None:
            for key, value in context.invocation_metadata() or ():
                if key == "authorization" and isinstance(value, str):
                    scheme, _, token = value.partition(" ")
                    if scheme.lower() == "bearer" and token.strip():
                        return self._tokens.lookup(token.strip())
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(ADMIN_PREFIX) or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            identity = self.authenticate(context)
            if identity is None:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "no valid credential: send `authorization: Bearer <token>` or a client certificate",
                )
            assert identity is not None
            if not allowed(identity.role, method):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{identity} has role {identity.role}; {method.rpartition('/')[2]} needs {OPERATOR}",
                )
            if request is _MALFORMED:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request does not decode")
            token = _current.set(identity)
            try:
                return await inner(request, context)  # type: ignore[arg-type]
            finally:
                _current.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
