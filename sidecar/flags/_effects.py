"""What a session's flags do to its version: the Version its calls go through.

For the flags that are off, a flag's tool is not offered to the model (nor callable), its
guard does not run; for those on, a prompt flag's fragment is appended to the system prompt
and a parameters flag's overrides are merged into the request. The version id stays the
version's: a flag is independent of the version split.

Derived versions depend only on (version, which flags are on), so they are built once per
combination and kept (a handful per version).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from outrider.v1 import sidecar_pb2
from sidecar.flags._book import FlagBook
from sidecar.flags._model import FlagConfig, guard_matches
from sidecar.guards import GuardPolicy
from sidecar.routing._session import Session
from sidecar.routing._versions import Version

MAX_CACHED = 256  # derived versions kept; beyond this they are built per call


def _target(version: Version, on: frozenset[str], configs: Mapping[str, FlagConfig]) -> Version:
    """One call target (a primary or fallback tier) with the flags applied."""
    hidden_tools = {c.target for n, c in configs.items() if c.kind == "tool" and n not in on}
    prompts = [c.prompt.strip() for n, c in configs.items() if c.kind == "prompt" and n in on]
    overrides: dict[str, Any] = {}
    for name, flag in configs.items():
        if flag.kind == "parameters" and name in on:
            overrides.update(flag.parameters)
    vc = version.config
    update: dict[str, Any] = {}
    if prompts:
        update["system_prompt"] = "\n\n".join([vc.system_prompt, *prompts] if vc.system_prompt else prompts)
    if overrides:
        update["parameters"] = {**vc.parameters, **overrides}
    if hidden_tools:
        update["tools"] = tuple(t for t in vc.tools if t.name not in hidden_tools)
    config = vc.model_copy(update=update) if update else vc
    payload = dict(version.base_payload)
    payload.update(overrides)
    tools = {name: tool for name, tool in version.tools.items() if name not in hidden_tools}
    if "tools" in payload:
        kept = [t for t in payload["tools"] if t["function"]["name"] not in hidden_tools]
        if kept:
            payload["tools"] = kept
        else:
            del payload["tools"]
    return replace(
        version, config=config, base_payload=MappingProxyType(payload), tools=MappingProxyType(tools)
    )


def _guards(policy: GuardPolicy, on: frozenset[str], configs: Mapping[str, FlagConfig]) -> GuardPolicy:
    off = [c.target for n, c in configs.items() if c.kind == "guard" and n not in on]
    if not off:
        return policy
    return GuardPolicy([r for r in policy.rules if not any(guard_matches(t, {r.guard.name}) for t in off)])


def _info(
    version: Version, flagged: Version, flags: Mapping[str, bool], book: FlagBook
) -> sidecar_pb2.VersionInfo:
    info = sidecar_pb2.VersionInfo()
    info.CopyFrom(version.info)
    info.system_prompt = flagged.config.system_prompt
    info.parameters_json.clear()
    info.parameters_json.update({k: json.dumps(v) for k, v in flagged.config.parameters.items()})
    kept = [t for t in version.info.tools if t.name in flagged.tools]
    del info.tools[:]
    info.tools.extend(kept)
    for name, on in sorted(flags.items()):
        config = book.configs[name]
        info.flags.add(name=name, on=on, kind=config.kind, target=config.target)
    return info


class SessionFlags:
    """The flag book applied to sessions: assignments, derived versions, tool checks."""

    def __init__(self, book: FlagBook) -> None:
        self.book = book
        self._cache: dict[tuple[str, frozenset[str]], Version] = {}

    def assignments(self, session: Session) -> dict[str, bool]:
        return self.book.assignments(session) if self.book else {}

    def version_for(self, session: Session, version: Version) -> Version:
        """`version` as `session`'s flags make it (the same object when the agent has no flags)."""
        if not self.book:
            return version
        flags = self.book.assignments(session)
        on = frozenset(name for name, value in flags.items() if value)
        key = (version.version_id, on)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        configs = self.book.configs
        primary = _target(version, on, configs)
        tiers = tuple(
            replace(t, target=_target(t.target, on, configs)) if t.target is not None else t
            for t in version.tiers
        )
        flagged = replace(primary, tiers=tiers, guards=_guards(version.guards, on, configs))
        flagged = replace(flagged, info=_info(version, flagged, flags, self.book))
        if len(self._cache) < MAX_CACHED:
            self._cache[key] = flagged
        return flagged

    def off_tool_flag(self, session: Session, tool: str) -> str | None:
        return self.book.off_tool_flag(session, tool) if self.book else None
