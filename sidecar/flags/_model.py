"""The feature flags of a sidecar config (`flags:`): what each flag turns on, and its default.

    flags:
      - name: refunds
        kind: tool                 # tool | guard | prompt | parameters
        target: issue_refund       # the tool (or guard) it turns on
        default: {share: 10%, sticky_by: tenant, tenants: [acme]}
      - name: concise
        kind: prompt
        prompt: Answer in two sentences at most.
      - name: cool
        kind: parameters
        parameters: {temperature: 0.0}

A flag is independent of the version split: it is evaluated per session on whatever version
the session is pinned to. Flags are not part of any version's content, so they never change a
version id. Errors name the field (`flags[1].target: ...`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sidecar._version_config import _RESERVED_PARAMETERS, VersionConfig, _Frozen

FlagKind = Literal["tool", "guard", "prompt", "parameters"]
StickyByName = Literal["user", "tenant"]
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_share(value: object) -> float:
    """A share of users or tenants as a fraction in [0, 1], from 0..100 (percent) or "10%"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a percentage such as 10 or '10%', got {value!r}")  # noqa: TRY004 (pydantic wants ValueError)
    if isinstance(value, str):
        text = value.strip().removesuffix("%").strip()
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"expected a percentage such as 10 or '10%', got {value!r}") from None
    elif isinstance(value, int | float):
        number = float(value)
    else:
        raise ValueError(f"expected a percentage such as 10 or '10%', got {value!r}")  # noqa: TRY004
    if not 0.0 <= number <= 100.0:
        raise ValueError(f"must be between 0 and 100 (percent), got {value!r}")
    return number / 100.0


class FlagDefault(_Frozen):
    """Who has the flag on when no run-time record says otherwise."""

    share: float = 0.0  # a fraction in [0, 1]; written as percent in YAML
    sticky_by: StickyByName = "tenant"
    tenants: tuple[str, ...] = ()

    @field_validator("share", mode="before")
    @classmethod
    def _share(cls, value: object) -> float:
        return parse_share(value)


class FlagConfig(_Frozen):
    name: str
    kind: FlagKind
    target: str = ""
    prompt: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    default: FlagDefault = Field(default_factory=FlagDefault)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"expected 1-64 letters, digits, '_', '.' or '-', got {value!r}")
        return value

    @model_validator(mode="after")
    def _fits_kind(self) -> FlagConfig:
        if self.kind in ("tool", "guard"):
            if not self.target:
                raise ValueError(f".target: required for a {self.kind} flag (the {self.kind} it turns on)")
            if self.prompt or self.parameters:
                raise ValueError(f".prompt, parameters: a {self.kind} flag takes only a target")
        elif self.target:
            raise ValueError(f".target: a {self.kind} flag takes no target")
        if self.kind == "prompt" and not self.prompt.strip():
            raise ValueError(".prompt: required for a prompt flag (the fragment for the system prompt)")
        if self.kind == "parameters":
            if not self.parameters:
                raise ValueError(".parameters: required for a parameters flag (the overrides)")
            reserved = sorted(_RESERVED_PARAMETERS.intersection(self.parameters))
            if reserved:
                raise ValueError(f".parameters.{reserved[0]}: set by the sidecar, not by a flag")
        if self.kind != "parameters" and self.parameters:
            raise ValueError(f".parameters: a {self.kind} flag takes no parameters")
        if self.kind != "prompt" and self.prompt:
            raise ValueError(f".prompt: a {self.kind} flag takes no prompt")
        return self


def _guard_names(version: VersionConfig) -> set[str]:
    from sidecar.guards import build_policy

    return {rule.guard.name for rule in build_policy(version.guards, field="").rules}


def check_flags(flags: tuple[FlagConfig, ...], versions: dict[str, VersionConfig]) -> None:
    """Cross-checks against the versions: unique names, targets that exist. ValueError names the field."""
    tools = {tool.name for version in versions.values() for tool in version.tools}
    guards = {name for version in versions.values() for name in _guard_names(version)}
    seen: set[str] = set()
    for index, flag in enumerate(flags):
        where = f"flags[{index}]"
        if flag.name in seen:
            raise ValueError(f"{where}.name: duplicate flag name {flag.name!r}")
        seen.add(flag.name)
        if flag.kind == "tool" and flag.target not in tools:
            known = ", ".join(sorted(tools)) or "none"
            raise ValueError(f"{where}.target: unknown tool {flag.target!r} (the versions' tools: {known})")
        if flag.kind == "guard" and not guard_matches(flag.target, guards):
            known = ", ".join(sorted(guards)) or "none"
            raise ValueError(f"{where}.target: unknown guard {flag.target!r} (the versions' guards: {known})")


def guard_matches(target: str, names: set[str] | frozenset[str]) -> bool:
    """A guard flag's target names one guard, or a group (`pii` for every `pii.*`)."""
    return target in names or any(name.startswith(target + ".") for name in names)
