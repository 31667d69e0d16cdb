"""The flag book: each flag's setting (the config default, or the newest signed run-time
`FlagState`), and which flags are on for a session.

A session's assignment needs no state: a flag is on when the session's tenant is in the flag's
tenant list, or else when the sticky hash of (flag name, user or tenant id per `sticky_by`)
falls below its share. A session without that id falls back to its own nonce (as the router
does), so it is still deterministic for the session.

Run-time states are ordered per flag by (epoch, generation); `cleared` puts the config
default back. States for flags the config does not have are ignored, counted and warned about
(another sidecar of the agent may have a newer config).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from outrider.v1 import common_pb2, control_pb2
from sidecar.flags._model import FlagConfig, FlagDefault
from sidecar.routing._router import sticky_fraction, sticky_key
from sidecar.routing._session import Session

log = logging.getLogger(__name__)

_STICKY = {"user": common_pb2.STICKY_BY_USER, "tenant": common_pb2.STICKY_BY_TENANT}


@dataclass(frozen=True, slots=True)
class FlagSetting:
    """Who has one flag on."""

    share: float  # in [0, 1]
    sticky_by: int  # outrider.v1.StickyBy
    tenants: frozenset[str]

    @classmethod
    def of_default(cls, default: FlagDefault) -> FlagSetting:
        return cls(default.share, _STICKY[default.sticky_by], frozenset(default.tenants))

    @classmethod
    def of_state(cls, state: control_pb2.FlagState) -> FlagSetting:
        sticky = state.sticky_by or common_pb2.STICKY_BY_TENANT
        return cls(min(max(state.share, 0.0), 1.0), sticky, frozenset(state.tenants))

    def is_on(self, name: str, session: Session) -> bool:
        if session.tenant_id and session.tenant_id in self.tenants:
            return True
        if self.share <= 0.0:
            return False
        key = sticky_key(self.sticky_by, session.nonce, session.user_id, session.tenant_id)
        return sticky_fraction(f"flag/{name}", key) < self.share


class FlagBook:
    """The flags of one agent: config defaults and run-time states."""

    def __init__(self, agent: str, flags: Iterable[FlagConfig]) -> None:
        self.agent = agent
        self.configs: dict[str, FlagConfig] = {flag.name: flag for flag in flags}
        self._defaults = {name: FlagSetting.of_default(c.default) for name, c in self.configs.items()}
        self._settings = dict(self._defaults)
        self._states: dict[str, control_pb2.FlagState] = {}
        self.unknown = 0  # states for flags this config lacks
        # told about every applied state (metrics, logs); must not block
        self.listeners: list[Callable[[control_pb2.FlagState], None]] = []

    def __bool__(self) -> bool:
        return bool(self.configs)

    def state(self, name: str) -> control_pb2.FlagState | None:
        return self._states.get(name)

    def setting(self, name: str) -> FlagSetting:
        return self._settings[name]

    def apply(self, state: control_pb2.FlagState) -> bool:
        """Take a verified state if it is this agent's, known and newer; whether it changed anything."""
        if state.agent != self.agent:
            return False
        if state.name not in self.configs:
            self.unknown += 1
            log.warning(
                "control: ignoring flag %r of %s (not in this sidecar's config; generation %d)",
                state.name,
                state.agent,
                state.generation,
            )
            return False
        held = self._states.get(state.name)
        if held is not None and (state.epoch, state.generation) <= (held.epoch, held.generation):
            return False
        self._states[state.name] = state
        if state.cleared:
            self._settings[state.name] = self._defaults[state.name]
        else:
            self._settings[state.name] = FlagSetting.of_state(state)
        log.info(
            "control: flag %s/%s %s (epoch %d generation %d; share %.3f, %d tenants): %s",
            state.agent,
            state.name,
            "cleared" if state.cleared else "set",
            state.epoch,
            state.generation,
            state.share,
            len(state.tenants),
            state.reason or "no reason given",
        )
        for listener in self.listeners:
            listener(state)
        return True

    def assignments(self, session: Session) -> dict[str, bool]:
        """Every flag of the agent, name -> on, for `session`."""
        return {name: setting.is_on(name, session) for name, setting in self._settings.items()}

    def off_tool_flag(self, session: Session, tool: str) -> str | None:
        """The name of a tool flag that keeps `tool` off for `session`, if any."""
        for name, config in self.configs.items():
            if config.kind != "tool" or config.target != tool:
                continue
            if not self._settings[name].is_on(name, session):
                return name
        return None

    def kinds(self) -> Mapping[str, FlagConfig]:
        return self.configs
