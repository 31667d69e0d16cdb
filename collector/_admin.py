"""The admin gRPC API (`outrider.v1.Admin`): start, inspect, pause, resume, promote and abort
rollouts.

Every Admin call is authenticated and authorized first (`collector._auth`); `decided_by` is
the authenticated caller. Reflection is served only when `admin_reflection` asks for it.

Errors map to status codes once, here: a bad spec is INVALID_ARGUMENT naming the source and
field, a second start ALREADY_EXISTS, an unknown agent NOT_FOUND, a verb that does not fit
the phase (aborting a finished rollout, resuming one not on HOLD) FAILED_PRECONDITION, a
control-topic write that failed UNAVAILABLE.

Who asked is decided in one place, `_requester`: the authenticated identity, never the client's
`requested_by`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from collector._auth import AuthInterceptor, TokenBook, current_identity
from collector._config_errors import SpecError
from collector._errors import NoRollout, RolloutConflict, RolloutError, UnknownVersion, WrongPhase
from collector._manager import PublishError, RolloutManager
from collector._registry import RegistryView
from collector._registry_admin import RegistryAdmin
from collector._spec import load_spec_text
from outrider.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
MAX_SPEC_BYTES = 256 * 1024

_CODES: dict[type[Exception], grpc.StatusCode] = {
    RolloutConflict: grpc.StatusCode.ALREADY_EXISTS,
    NoRollout: grpc.StatusCode.NOT_FOUND,
    WrongPhase: grpc.StatusCode.FAILED_PRECONDITION,
    UnknownVersion: grpc.StatusCode.FAILED_PRECONDITION,
    PublishError: grpc.StatusCode.UNAVAILABLE,
    SpecError: grpc.StatusCode.INVALID_ARGUMENT,
}


async def _fail(context: grpc.aio.ServicerContext[object, object], exc: Exception) -> NoReturn:
    code = next((c for t, c in _CODES.items() if isinstance(exc, t)), grpc.StatusCode.INTERNAL)
    await context.abort(code, str(exc))
    raise AssertionError("unreachable")  # context.abort raises


def _caller(requested_by: str) -> str:
    """`decided_by`: the authenticated identity (the client's claim is only logged)."""
    identity = current_identity()
    who = str(identity) if identity is not None else "admin"
    if requested_by and requested_by != who:
        log.info("admin caller %s sent requested_by=%r (ignored)", who, requested_by)
    return who


async def _require(context: grpc.aio.ServicerContext[object, object], field: str, value: str) -> None:
    if not value:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: must not be empty")


# an operator verb's request: agent, reason, requested_by
_Verb = (
    admin_pb2.AbortRolloutRequest
    | admin_pb2.PauseRolloutRequest
    | admin_pb2.ResumeRolloutRequest
    | admin_pb2.PromoteRolloutRequest
)


def _requester(
    request: _Verb | admin_pb2.StartRolloutRequest, context: grpc.aio.ServicerContext[object, object]
) -> str:
    """Who asked for a command, recorded as the new state's `decided_by`: the authenticated
    identity (the admin interceptor's), never the client's claim."""
    del context  # the identity travels in the interceptor's context variable
    return _caller(request.requested_by)


class AdminService(RegistryAdmin, admin_pb2_grpc.AdminServicer):
    def __init__(self, manager: RolloutManager, registry: RegistryView | None = None) -> None:
        self._manager = manager
        self._registry = registry

    async def StartRollout(
        self, request: admin_pb2.StartRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        source = request.source_name or "<request>"
        await _require(context, "spec_yaml", request.spec_yaml)
        if len(request.spec_yaml.encode()) > MAX_SPEC_BYTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"spec_yaml: larger than {MAX_SPEC_BYTES} bytes"
            )
        try:
            spec = load_spec_text(request.spec_yaml, source)
            self._manager.check_windows(spec, source)
            who = _requester(request, context)
            if self._registry is not None:
                self._registry.require(spec)  # UnknownVersion: FAILED_PRECONDITION naming the version
            await self._manager.start(spec, request.spec_yaml, who)
            log.info("rollout of %s started by %s from %s", spec.agent, who, source)
            return self._manager.status(spec.agent)
        except (SpecError, RolloutError, PublishError) as exc:
            await _fail(context, exc)

    async def GetRollout(
        self, request: admin_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        await _require(context, "agent", request.agent)
        try:
            return self._manager.status(request.agent)
        except RolloutError as exc:
            await _fail(context, exc)

    async def AbortRollout(
        self, request: admin_pb2.AbortRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        return await self._verb("abort", request, context)

    async def PauseRollout(
        self, request: admin_pb2.PauseRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        return await self._verb("pause", request, context)

    async def ResumeRollout(
        self, request: admin_pb2.ResumeRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        return await self._verb("resume", request, context)

    async def PromoteRollout(
        self, request: admin_pb2.PromoteRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        return await self._verb("promote", request, context)

    async def _verb(
        self,
        verb: str,
        request: _Verb,
        context: grpc.aio.ServicerContext[object, object],
    ) -> admin_pb2.RolloutStatus:
        await _require(context, "agent", request.agent)
        who = _requester(request, context)
        command = {
            "abort": self._manager.abort,
            "pause": self._manager.pause,
            "resume": self._manager.resume,
            "promote": self._manager.promote,
        }[verb]
        try:
            await command(request.agent, request.reason, who)
            log.info("rollout of %s: %s by %s: %s", request.agent, verb, who, request.reason)
            return self._manager.status(request.agent)
        except (RolloutError, PublishError) as exc:
            await _fail(context, exc)


@dataclass(frozen=True)
class AdminAuth:
    """How admin callers prove who they are (see collector._auth)."""

    tokens_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    reflection: bool = False


class AdminServer:
    """grpc.aio server with Admin, health and (with `reflection`) reflection; start/stop idempotent."""

    def __init__(
        self,
        manager: RolloutManager,
        listen: str,
        auth: AdminAuth | None = None,
        registry: RegistryView | None = None,
    ) -> None:
        self._auth = auth or AdminAuth()
        self._registry = registry
        self._listen = listen
        self._server: grpc.aio.Server | None = None
        self._manager = manager
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.address = ""

    async def start(self) -> str:
        if self._server is not None:
            return self.address
        auth = self._auth
        tokens = TokenBook.load(auth.tokens_file) if auth.tokens_file is not None else None
        certs = auth.tls_client_ca is not None
        if tokens is None and not certs:
            log.warning(
                "admin API: no credentials configured (admin_tokens_file, admin_tls_client_ca): "
                "every admin call will be refused with UNAUTHENTICATED"
            )
        server = grpc.aio.server(interceptors=[AuthInterceptor(tokens, certs=certs)])
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self._manager, self._registry), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if auth.reflection:
            reflection.enable_server_reflection(
                [
                    ADMIN_SERVICE,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ],
                server,
            )
        host = self._listen.rpartition(":")[0]
        try:
            if auth.tls_cert is not None and auth.tls_key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(auth.tls_key.read_bytes(), auth.tls_cert.read_bytes())],
                    root_certificates=auth.tls_client_ca.read_bytes() if auth.tls_client_ca else None,
                    require_client_auth=certs,
                )
                port = server.add_secure_port(self._listen, credentials)
            else:
                port = server.add_insecure_port(self._listen)
        except RuntimeError as exc:
            await server.stop(None)
            raise OSError(f"cannot listen on {self._listen}: {exc}") from exc
        await server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(ADMIN_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        self.address = f"{host}:{port}"
        log.info("collector admin gRPC on %s", self.address)
        return self.address

    async def stop(self, grace_s: float = 2.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            await self._health.enter_graceful_shutdown()
            await server.stop(grace_s)
