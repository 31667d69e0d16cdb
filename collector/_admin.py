"""The admin gRPC API (`outrider.v1.Admin`): start, inspect, pause, resume, promote and abort
rollouts, and switch a blue-green back.

Every Admin call is authenticated and authorized first (`collector._auth`); `decided_by` is
the authenticated caller. Reflection is served only when `admin_reflection` asks for it.

Errors map to status codes once, here: a bad spec is INVALID_ARGUMENT naming the source and
field, a second start ALREADY_EXISTS, an unknown agent NOT_FOUND, a verb that does not fit
the phase (aborting a finished rollout, resuming one not on HOLD) FAILED_PRECONDITION, a
control-topic write that failed UNAVAILABLE.

Who asked is decided in one place, `_requester`: the authenticated identity, never the client's
`requested_by`.

Rollout calls are answered by the replica that owns the agent (`collector._ownership`): any
other replica authenticates and authorizes the caller, then relays the call through
`outrider.commands` (`collector._commands`) and returns the owner's answer as its own. A call
with no owner to answer it within `relay_timeout_s` is UNAVAILABLE.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from aiokafka.errors import KafkaError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from collector._auth import AuthInterceptor, TokenBook, current_identity
from collector._commands import NOT_OWNER, CommandBus, NoAnswer
from collector._config_errors import SpecError
from collector._errors import NoRollout, NotOwner, RolloutConflict, RolloutError, UnknownVersion, WrongPhase
from collector._flags import FlagRegistry
from collector._history import DeploymentHistory
from collector._history_admin import HistoryMethods
from collector._manager import PublishError, RolloutManager
from collector._registry import RegistryView
from collector._registry_admin import RegistryAdmin
from collector._spec import RolloutSpec, load_spec_text
from outrider.v1 import admin_pb2, admin_pb2_grpc, registry_pb2

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


_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
DEFAULT_RELAY_TIMEOUT_S = 20.0


def status_code(exc: Exception) -> grpc.StatusCode:
    return next((c for t, c in _CODES.items() if isinstance(exc, t)), grpc.StatusCode.INTERNAL)


async def _fail(context: grpc.aio.ServicerContext[object, object], exc: Exception) -> NoReturn:
    await context.abort(status_code(exc), str(exc))
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
    | admin_pb2.SwitchBackRequest
)


def _requester(request: Any) -> str:
    """Who asked for a command, recorded as the new state's `decided_by`: the authenticated
    identity (the admin interceptor's context variable), never the client's claim."""
    return _caller(getattr(request, "requested_by", ""))


_REQUESTS: dict[str, Any] = {
    "StartRollout": admin_pb2.StartRolloutRequest,
    "GetRollout": admin_pb2.GetRolloutRequest,
    "AbortRollout": admin_pb2.AbortRolloutRequest,
    "PauseRollout": admin_pb2.PauseRolloutRequest,
    "ResumeRollout": admin_pb2.ResumeRolloutRequest,
    "PromoteRollout": admin_pb2.PromoteRolloutRequest,
    "SwitchBack": admin_pb2.SwitchBackRequest,
    "ListVersions": registry_pb2.ListVersionsRequest,
    "SetFlag": admin_pb2.SetFlagRequest,
    "ClearFlag": admin_pb2.ClearFlagRequest,
    "ListFlags": admin_pb2.ListFlagsRequest,
}
_FLAG_METHODS = frozenset({"SetFlag", "ClearFlag", "ListFlags"})
_Answer = TypeVar(
    "_Answer",
    admin_pb2.RolloutStatus,
    registry_pb2.ListVersionsResponse,
    admin_pb2.FlagStatus,
    admin_pb2.ListFlagsResponse,
)
_VERBS = {
    "AbortRollout": "abort",
    "PauseRollout": "pause",
    "ResumeRollout": "resume",
    "PromoteRollout": "promote",
    "SwitchBack": "switch_back",
}


def _spec_of(request: admin_pb2.StartRolloutRequest) -> RolloutSpec:
    """The request's spec, validated; SpecError names the source and field."""
    source = request.source_name or "<request>"
    if not request.spec_yaml:
        raise SpecError(source, ["spec_yaml: must not be empty"])
    if len(request.spec_yaml.encode()) > MAX_SPEC_BYTES:
        raise SpecError(source, [f"spec_yaml: larger than {MAX_SPEC_BYTES} bytes"])
    return load_spec_text(request.spec_yaml, source)


class AdminService(HistoryMethods, RegistryAdmin, admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        manager: RolloutManager,
        bus: CommandBus | None = None,
        replica: str = "",
        relay_timeout_s: float = DEFAULT_RELAY_TIMEOUT_S,
        history: DeploymentHistory | None = None,
        registry: RegistryView | None = None,
        flags: FlagRegistry | None = None,
    ) -> None:
        self._manager, self._bus, self._replica = manager, bus, replica
        self._flags = flags
        self.history = history
        self._registry = registry
        self._relay_timeout_s = relay_timeout_s
        if bus is not None:
            bus.handler = self.handle_relayed

    async def StartRollout(
        self, request: admin_pb2.StartRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        try:
            spec = _spec_of(request)
            self._manager.check_windows(spec, request.source_name or "<request>")
        except SpecError as exc:
            await _fail(context, exc)
        return await self._route("StartRollout", spec.agent, request, context, admin_pb2.RolloutStatus)

    async def GetRollout(
        self, request: admin_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        await _require(context, "agent", request.agent)
        return await self._route("GetRollout", request.agent, request, context, admin_pb2.RolloutStatus)

    async def AbortRollout(
        self, request: admin_pb2.AbortRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        return await self._verb("AbortRollout", request, context)

    async def PauseRollout(
        self, request: admin_pb2.PauseRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        return await self._verb("PauseRollout", request, context)

    async def ResumeRollout(
        self, request: admin_pb2.ResumeRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        return await self._verb("ResumeRollout", request, context)

    async def PromoteRollout(
        self, request: admin_pb2.PromoteRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        return await self._verb("PromoteRollout", request, context)

    async def ListVersions(
        self, request: registry_pb2.ListVersionsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> registry_pb2.ListVersionsResponse:
        """The owner answers: it holds the agent's sidecars' version reports."""
        await _require(context, "agent", request.agent)
        if self._registry is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this collector has no version registry")
        return await self._route(
            "ListVersions", request.agent, request, context, registry_pb2.ListVersionsResponse
        )

    async def SwitchBack(
        self, request: admin_pb2.SwitchBackRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        """Blue-green: new sessions back to blue at once (operator; FAILED_PRECONDITION otherwise)."""
        return await self._verb("SwitchBack", request, context)

    # Feature flags (collector._flags): answered by the agent's owner, like the rollout verbs.
    async def SetFlag(
        self, request: admin_pb2.SetFlagRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.FlagStatus:
        await self._flag_call(context, request.agent)
        return await self._route("SetFlag", request.agent, request, context, admin_pb2.FlagStatus)

    async def ClearFlag(
        self, request: admin_pb2.ClearFlagRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.FlagStatus:
        await self._flag_call(context, request.agent)
        return await self._route("ClearFlag", request.agent, request, context, admin_pb2.FlagStatus)

    async def ListFlags(
        self, request: admin_pb2.ListFlagsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.ListFlagsResponse:
        await self._flag_call(context, request.agent)
        return await self._route("ListFlags", request.agent, request, context, admin_pb2.ListFlagsResponse)

    async def _flag_call(self, context: grpc.aio.ServicerContext[object, object], agent: str) -> None:
        await _require(context, "agent", agent)
        if self._flags is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this collector has no feature flags")

    async def _run_flag(self, method: str, request: Any, who: str) -> Any:
        if not self._manager.owns(request.agent):
            raise NotOwner(request.agent)
        assert self._flags is not None
        if method == "SetFlag":
            return await self._flags.set(request, who)
        if method == "ClearFlag":
            return await self._flags.clear(request, who)
        return self._flags.listing(request.agent)

    async def _verb(
        self, method: str, request: _Verb, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.RolloutStatus:
        await _require(context, "agent", request.agent)
        return await self._route(method, request.agent, request, context, admin_pb2.RolloutStatus)

    async def _owned_here(self, agent: str) -> bool:
        """Does this replica answer for `agent`? Waits out a first assignment or a restore."""
        ownership = self._manager.ownership
        if ownership is None:
            return True
        if not ownership.settled:
            await ownership.wait_settled(self._relay_timeout_s)
        return await ownership.wait_restored(agent, self._relay_timeout_s)

    async def _route(
        self,
        method: str,
        agent: str,
        request: Any,
        context: grpc.aio.ServicerContext[object, object],
        answer_type: type[_Answer],
    ) -> _Answer:
        who = _requester(request)
        if await self._owned_here(agent):
            try:
                result: _Answer = await self._run(method, request, who)
                return result
            except NotOwner:
                pass  # the partition moved meanwhile: relay to the new owner
            except (SpecError, RolloutError, PublishError) as exc:
                await _fail(context, exc)
        if self._bus is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"this collector does not own agent {agent!r}")
        try:
            answer = await self._bus.forward(
                agent, method, request.SerializeToString(), who, self._relay_timeout_s
            )
        except NoAnswer as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except (KafkaError, TimeoutError) as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot relay the call to the owner of {agent!r}: {exc or type(exc).__name__}",
            )
        if answer.code != 0:
            await context.abort(_BY_VALUE.get(answer.code, grpc.StatusCode.UNKNOWN), answer.message)
        return answer_type.FromString(answer.response)

    async def _run(self, method: str, request: Any, who: str) -> Any:
        """Run one call here, the agent's owner; raises what `_CODES` maps."""
        if method in _FLAG_METHODS:
            return await self._run_flag(method, request, who)
        if method == "ListVersions":
            if not self._manager.owns(request.agent):
                raise NotOwner(request.agent)
            assert self._registry is not None
            return self._registry.listing(request.agent)
        if method == "StartRollout":
            spec = _spec_of(request)
            self._manager.check_windows(spec, request.source_name or "<request>")
            if self._registry is not None:  # on the owner: it has the agent's version reports
                self._registry.require(spec)  # UnknownVersion: FAILED_PRECONDITION naming the version
            await self._manager.start(spec, request.spec_yaml, who)
            log.info(
                "rollout of %s started by %s from %s", spec.agent, who, request.source_name or "<request>"
            )
            agent = spec.agent
        elif method == "GetRollout":
            agent = request.agent
            if not self._manager.owns(agent):
                raise NotOwner(agent)
        else:
            verb = _VERBS[method]
            commands: dict[str, Callable[[str, str, str], Awaitable[object]]] = {
                "abort": self._manager.abort,
                "pause": self._manager.pause,
                "resume": self._manager.resume,
                "promote": self._manager.promote,
                "switch_back": self._manager.switch_back,
            }
            agent = request.agent
            await commands[verb](agent, request.reason, who)
            log.info("rollout of %s: %s by %s: %s", agent, verb, who, request.reason)
        status = self._manager.status(agent)
        status.collector_replica = self._replica
        return status

    async def handle_relayed(self, method: str, data: bytes, caller: str) -> tuple[int, str, bytes]:
        """The owner's side of a relayed call: (status code value, message, response)."""
        request_type = _REQUESTS.get(method)
        if request_type is None:
            return grpc.StatusCode.UNIMPLEMENTED.value[0], f"{method}: not a relayed Admin method", b""
        try:
            request = request_type.FromString(data)
            status = await self._run(method, request, caller)
        except NotOwner:
            return NOT_OWNER, "", b""
        except (SpecError, RolloutError, PublishError) as exc:
            return status_code(exc).value[0], str(exc), b""
        except Exception as exc:  # a bad request must not kill the relay
            log.exception("relayed %s failed", method)
            return grpc.StatusCode.INTERNAL.value[0], f"{method} failed: {type(exc).__name__}", b""
        return 0, "", status.SerializeToString()


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
        bus: CommandBus | None = None,
        replica: str = "",
        relay_timeout_s: float = DEFAULT_RELAY_TIMEOUT_S,
        history: DeploymentHistory | None = None,
        registry: RegistryView | None = None,
        flags: FlagRegistry | None = None,
    ) -> None:
        self._flags = flags
        self._registry = registry
        self._history = history
        self._auth = auth or AdminAuth()
        self._bus, self._replica, self._relay_timeout_s = bus, replica, relay_timeout_s
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
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(
                self._manager,
                self._bus,
                self._replica,
                self._relay_timeout_s,
                self._history,
                self._registry,
                self._flags,
            ),
            server,
        )
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
