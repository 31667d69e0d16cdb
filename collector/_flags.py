"""Feature flags on the collector: SetFlag and ClearFlag publish a signed `FlagState`
(`flag/<agent>/<name>` on the compacted `outrider.control`), ListFlags answers each flag's
state and its on-against-off figures (`collector._flag_metrics`).

Generations count per flag and continue from what the control topic holds (`restore`, at start
and on a takeover), stamped with the publisher's epoch, so readers order a flag's states by
(epoch, generation) as they do rollout states. A state counts only once published: a failed
write changes nothing here. The admin API runs these on the agent's owner replica.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable
from typing import Protocol

from aiokafka.errors import KafkaError

from collector._config_errors import SpecError
from collector._flag_metrics import FlagMetrics
from collector._manager import PublishError
from outrider.clock import Clock
from outrider.v1 import admin_pb2, common_pb2, control_pb2

log = logging.getLogger(__name__)


class FlagPublisher(Protocol):
    async def publish_flag(self, state: control_pb2.FlagState) -> None: ...


def _bad(field: str, message: str) -> SpecError:
    return SpecError("<request>", [f"{field}: {message}"])


class FlagRegistry:
    """Every agent's flag states, as published by this collector or read back from the topic."""

    def __init__(self, publisher: FlagPublisher, metrics: FlagMetrics, clock: Clock) -> None:
        self._publisher, self.metrics, self._clock = publisher, metrics, clock
        self._states: dict[tuple[str, str], control_pb2.FlagState] = {}
        self._lock = asyncio.Lock()

    def restore(self, states: Iterable[control_pb2.FlagState]) -> None:
        """Take the newest of each flag's states read back from the control topic."""
        for state in states:
            key = (state.agent, state.name)
            held = self._states.get(key)
            if held is None or (state.epoch, state.generation) > (held.epoch, held.generation):
                self._states[key] = state

    async def set(self, request: admin_pb2.SetFlagRequest, who: str) -> admin_pb2.FlagStatus:
        _check_names(request.agent, request.name)
        if not math.isfinite(request.share) or not 0.0 <= request.share <= 1.0:
            raise _bad("share", f"must be in [0, 1] (a fraction), got {request.share}")
        if request.sticky_by not in (common_pb2.STICKY_BY_USER, common_pb2.STICKY_BY_TENANT):
            raise _bad("sticky_by", "must be STICKY_BY_USER or STICKY_BY_TENANT")
        tenants = [t.strip() for t in request.tenants]
        if any(not t for t in tenants):
            raise _bad("tenants", "a tenant id must not be empty")
        state = control_pb2.FlagState(
            agent=request.agent,
            name=request.name,
            share=request.share,
            sticky_by=request.sticky_by,
            tenants=sorted(set(tenants)),
            set_by=who,
            reason=request.reason,
        )
        return await self._publish(state)

    async def clear(self, request: admin_pb2.ClearFlagRequest, who: str) -> admin_pb2.FlagStatus:
        _check_names(request.agent, request.name)
        state = control_pb2.FlagState(
            agent=request.agent, name=request.name, cleared=True, set_by=who, reason=request.reason
        )
        return await self._publish(state)

    async def _publish(self, state: control_pb2.FlagState) -> admin_pb2.FlagStatus:
        key = (state.agent, state.name)
        async with self._lock:
            held = self._states.get(key)
            state.generation = (held.generation if held is not None else 0) + 1
            state.set_at_unix_nano = int(self._clock.now() * 1e9)
            try:
                await self._publisher.publish_flag(state)  # stamps the epoch
            except (KafkaError, TimeoutError) as exc:
                raise PublishError(
                    f"flag {state.name!r} of {state.agent!r}: the control topic did not take the state: "
                    f"{exc or type(exc).__name__}"
                ) from exc
            self._states[key] = state
        self.metrics.reset(state.agent, state.name)
        log.info(
            "flag %s/%s %s by %s (generation %d, share %.3f, %d tenants): %s",
            state.agent,
            state.name,
            "cleared" if state.cleared else "set",
            state.set_by,
            state.generation,
            state.share,
            len(state.tenants),
            state.reason or "no reason given",
        )
        return self.status(state.agent, state.name)

    def status(self, agent: str, name: str) -> admin_pb2.FlagStatus:
        state = self._states.get((agent, name)) or control_pb2.FlagState(agent=agent, name=name)
        return admin_pb2.FlagStatus(state=state, arms=self.metrics.arms(agent, name))

    def listing(self, agent: str) -> admin_pb2.ListFlagsResponse:
        """The flags with a published state or seen in the agent's events, by name."""
        names = {name for (a, name) in self._states if a == agent} | self.metrics.names(agent)
        return admin_pb2.ListFlagsResponse(flags=[self.status(agent, name) for name in sorted(names)])


def _check_names(agent: str, name: str) -> None:
    if not agent:
        raise _bad("agent", "must not be empty")
    if not name:
        raise _bad("name", "must not be empty")
    if "/" in name or len(name) > 64:
        raise _bad("name", f"expected a flag name of at most 64 characters without '/', got {name!r}")
