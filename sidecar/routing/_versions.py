"""Versions ready for the hot path: request templates, headers and tool tables built once."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pydantic import SecretStr

from outrider.v1 import sidecar_pb2
from sidecar._config import SidecarConfig, fallback_key
from sidecar._version_config import ToolConfig, VersionConfig
from sidecar.guards import GuardPolicy, build_policy
from sidecar.upstream._cost import Price, PriceTable

SERVED_BY_PRIMARY = "primary"


@dataclass(frozen=True, slots=True)
class Tier:
    """One step of a version's fallback chain: tier 0 is the version's own provider/model.

    ``target`` is a Version-shaped call target (same system prompt and tools, the tier's
    provider, model and parameters), or None for a static tier answering ``static_response``.
    """

    index: int
    name: str  # "primary", "fallback-1", ...
    target: Version | None
    static_response: str = ""

    @property
    def upstream(self) -> str:
        """The breaker, budget and metric key, e.g. "provider:openai/gpt-4o"."""
        return f"provider:{self.resource}" if self.target is not None else "static"

    @property
    def resource(self) -> str:
        """`provider/model`, the global quota's resource name ("" for a static tier)."""
        return f"{self.target.provider}/{self.target.model}" if self.target is not None else ""


@dataclass(frozen=True, slots=True)
class Version:
    label: str
    version_id: str
    config: VersionConfig
    chat_url: str
    base_payload: Mapping[str, Any]  # model, parameters and tools: merged into every request
    tools: Mapping[str, ToolConfig]
    info: sidecar_pb2.VersionInfo
    headers: Mapping[str, str] = field(repr=False)  # may hold the Authorization header
    tiers: tuple[Tier, ...] = ()  # the fallback chain, the primary first (empty for a tier target)
    guards: GuardPolicy = field(default_factory=GuardPolicy)
    prices: PriceTable = field(default_factory=PriceTable)

    @property
    def provider(self) -> str:
        return self.config.provider.name

    @property
    def model(self) -> str:
        return self.config.model


def _openai_tool(tool: ToolConfig) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
    }


def _info(agent: str, label: str, version_id: str, config: VersionConfig) -> sidecar_pb2.VersionInfo:
    return sidecar_pb2.VersionInfo(
        version_id=version_id,
        agent=agent,
        name=label,
        provider=config.provider.name,
        model=config.model,
        system_prompt=config.system_prompt,
        parameters_json={k: json.dumps(v) for k, v in config.parameters.items()},
        tools=[
            sidecar_pb2.ToolInfo(
                name=t.name,
                description=t.description,
                parameters_json_schema=json.dumps(t.parameters, sort_keys=True),
                side_effects=t.side_effects,
                timeout_s=t.timeout,
                idempotent=t.idempotent,
            )
            for t in config.tools
        ],
    )


def _target(
    label: str, version_id: str, vc: VersionConfig, info: sidecar_pb2.VersionInfo, key: str | None
) -> Version:
    payload: dict[str, Any] = {"model": vc.model, **vc.parameters}
    if vc.tools:
        payload["tools"] = [_openai_tool(t) for t in vc.tools]
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return Version(
        label=label,
        version_id=version_id,
        config=vc,
        chat_url=f"{vc.provider.base_url}/chat/completions",
        base_payload=MappingProxyType(payload),
        tools=MappingProxyType({t.name: t for t in vc.tools}),
        info=info,
        headers=MappingProxyType(headers),
    )


def _prices(config: SidecarConfig, vc: VersionConfig) -> PriceTable:
    merged = {**config.prices, **vc.prices}
    return PriceTable(
        {
            model: Price(p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok)
            for model, p in merged.items()
        }
    )


def build_version(
    config: SidecarConfig,
    label: str,
    version_id: str,
    vc: VersionConfig,
    api_key: Callable[[str], SecretStr | None],
    *,
    field: str,
) -> Version:
    """One Version of `config.agent`. `api_key(name)` gives the key of the primary (`label`) or
    of a fallback tier (`fallback_key(label, n)`); `field` names it in guard errors."""
    info = _info(config.agent, label, version_id, vc)
    key = api_key(label)
    primary = _target(label, version_id, vc, info, key.get_secret_value() if key else None)
    tiers = [Tier(0, SERVED_BY_PRIMARY, primary)]
    for number, spec in enumerate(vc.fallback, start=1):
        name = f"fallback-{number}"
        if spec.static_response is not None:
            tiers.append(Tier(number, name, None, spec.static_response))
            continue
        assert spec.provider is not None and spec.model is not None
        tier_vc = vc.model_copy(
            update={
                "provider": spec.provider,
                "model": spec.model,
                "parameters": vc.parameters if spec.parameters is None else spec.parameters,
            }
        )
        tier_key = api_key(fallback_key(label, number))
        target = _target(label, version_id, tier_vc, info, tier_key.get_secret_value() if tier_key else None)
        tiers.append(Tier(number, name, target))
    return Version(
        label=label,
        version_id=version_id,
        config=vc,
        chat_url=primary.chat_url,
        base_payload=primary.base_payload,
        tools=primary.tools,
        info=info,
        headers=primary.headers,
        tiers=tuple(tiers),
        guards=build_policy(vc.guards, field=f"{field}.guards"),
        prices=_prices(config, vc),
    )


def build_versions(config: SidecarConfig) -> dict[str, Version]:
    """Version id -> Version, for every version in the config (first label wins on equal content)."""
    versions: dict[str, Version] = {}
    for label, version_id in config.version_ids().items():
        if version_id not in versions:
            versions[version_id] = build_version(
                config, label, version_id, config.versions[label], config.api_key, field=f"versions.{label}"
            )
    return versions
