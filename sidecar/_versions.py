"""Versions ready for the hot path: request templates, headers and tool tables built once."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from outrider.v1 import sidecar_pb2
from sidecar._config import SidecarConfig, ToolConfig, VersionConfig

SERVED_BY_PRIMARY = "primary"


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


def build_versions(config: SidecarConfig) -> dict[str, Version]:
    """Version id -> Version, for every version in the config (first label wins on equal content)."""
    versions: dict[str, Version] = {}
    for label, version_id in config.version_ids().items():
        if version_id in versions:
            continue
        vc = config.versions[label]
        payload: dict[str, Any] = {"model": vc.model, **vc.parameters}
        if vc.tools:
            payload["tools"] = [_openai_tool(t) for t in vc.tools]
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = config.api_key(label)
        if key is not None:
            headers["Authorization"] = f"Bearer {key.get_secret_value()}"
        versions[version_id] = Version(
            label=label,
            version_id=version_id,
            config=vc,
            chat_url=f"{vc.provider.base_url}/chat/completions",
            base_payload=MappingProxyType(payload),
            tools=MappingProxyType({t.name: t for t in vc.tools}),
            info=_info(config.agent, label, version_id, vc),
            headers=MappingProxyType(headers),
        )
    return versions
