"""`upstream_aliases`: where this deployment reaches an upstream, apart from the version.

A version's id is the hash of its content, provider and tool URLs included, so moving the
simulated provider to another port (``outrider dev --port-base``, a test) would change every
id and no rollout spec would name them any more. An alias maps a URL prefix to the one this
sidecar uses, like DNS: the ids are computed from the URLs as written, the calls go to the
aliased ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar._version_config import FallbackTier, ProviderConfig, ToolConfig, VersionConfig


def alias_url(url: str, aliases: Mapping[str, str]) -> str:
    """``url`` with its longest matching prefix replaced; unchanged when none matches."""
    for prefix in sorted(aliases, key=len, reverse=True):
        if url.startswith(prefix):
            return aliases[prefix] + url[len(prefix) :]
    return url


def alias_version(version: VersionConfig, aliases: Mapping[str, str]) -> VersionConfig:
    """``version`` with every provider base_url and tool endpoint aliased."""
    if not aliases:
        return version

    def provider(p: ProviderConfig) -> ProviderConfig:
        return p.model_copy(update={"base_url": alias_url(p.base_url, aliases)})

    def tool(t: ToolConfig) -> ToolConfig:
        return t.model_copy(update={"endpoint": alias_url(t.endpoint, aliases)})

    def tier(t: FallbackTier) -> FallbackTier:
        return t if t.provider is None else t.model_copy(update={"provider": provider(t.provider)})

    return version.model_copy(
        update={
            "provider": provider(version.provider),
            "tools": tuple(
                t.model_copy(update={"endpoint": alias_url(t.endpoint, aliases)}) for t in version.tools
            ),
            "fallback": tuple(tier(t) for t in version.fallback),
        }
    )
