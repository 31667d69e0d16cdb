"""The admin API's version-registry methods (`PushVersion`: operator, `ListVersions`: viewer),
kept apart from the rollout methods of `collector._admin`, which mixes them in."""

from __future__ import annotations

import logging

import grpc
from aiokafka.errors import KafkaError

from collector._auth import current_identity
from collector._registry import PushRejected, RegistryView
from outrider.v1 import registry_pb2

log = logging.getLogger(__name__)


class RegistryAdmin:
    """`PushVersion` and `ListVersions`; `_registry` is None when the collector runs without one."""

    _registry: RegistryView | None

    async def PushVersion(
        self, request: registry_pb2.PushVersionRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> registry_pb2.PushVersionResponse:
        registry = await self._registry_or_abort(context)
        identity = current_identity()
        who = str(identity) if identity is not None else "admin"
        if request.requested_by and request.requested_by != who:
            log.info("admin caller %s sent requested_by=%r (ignored)", who, request.requested_by)
        try:
            return await registry.push(request, who)
        except PushRejected as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (KafkaError, TimeoutError) as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"could not write the version to outrider.versions: {exc or type(exc).__name__}",
            )
        raise AssertionError("unreachable")  # context.abort raises

    async def ListVersions(
        self, request: registry_pb2.ListVersionsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> registry_pb2.ListVersionsResponse:
        registry = await self._registry_or_abort(context)
        if not request.agent:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "agent: must not be empty")
        return registry.listing(request.agent)

    async def _registry_or_abort(self, context: grpc.aio.ServicerContext[object, object]) -> RegistryView:
        if self._registry is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this collector has no version registry")
        assert self._registry is not None
        return self._registry
