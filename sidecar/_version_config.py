"""A version of the agent: its provider and model, prompt, tools, resilience settings,
fallback tiers and prices, and its content id.

A version's id is the first 12 hex chars of sha256 over its canonical JSON (sorted keys,
validated values). The label (``v1``) is not part of it, the *name* of the key's env var or
file is, the key itself is not: the same content always has the same id.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import jsonschema
import jsonschema.exceptions
import jsonschema.validators
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

import outrider
from outrider.durations import PositiveDuration as Duration

DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_TOOL_TIMEOUT_S = 10.0
DEFAULT_DEADLINE_S = 30.0
DEFAULT_STREAM_IDLE_TIMEOUT_S = 10.0
VERSION_ID_LENGTH = 12

# request fields the sidecar sets itself; a version's `parameters` may not override them
_RESERVED_PARAMETERS = frozenset({"model", "messages", "stream", "stream_options", "tools"})
_TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _check_http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value) <= len("https://"):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProviderConfig(_Frozen):
    name: str = Field(default="openai", min_length=1)
    base_url: Annotated[str, BeforeValidator(lambda v: v if not isinstance(v, str) else _check_http_url(v))]
    api_key_env: str | None = None
    api_key_file: str | None = None

    @model_validator(mode="after")
    def _one_key_source(self) -> ProviderConfig:
        if self.api_key_env and self.api_key_file:
            raise ValueError("api_key_env and api_key_file: set at most one")
        return self


class BreakerSettings(_Frozen):
    """A circuit breaker per upstream (see `_breaker`)."""

    consecutive_failures: int = Field(default=5, ge=1)
    failure_rate: float = Field(default=0.5, gt=0.0, le=1.0)
    window: Duration = 30.0
    min_requests: int = Field(default=20, ge=1)
    cooldown: Duration = 5.0
    cooldown_max: Duration = 120.0
    half_open_probes: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _cooldowns(self) -> BreakerSettings:
        if self.cooldown_max < self.cooldown:
            raise ValueError(".cooldown_max: must be >= cooldown")
        return self


class RetrySettings(_Frozen):
    """Jittered retries of one call (see `_retry`); attempts include the first."""

    max_attempts: int = Field(default=3, ge=1, le=10)
    base: Duration = 0.1
    cap: Duration = 2.0
    retry_after_cap: Duration = 10.0

    @model_validator(mode="after")
    def _cap(self) -> RetrySettings:
        if self.cap < self.base:
            raise ValueError(".cap: must be >= base")
        return self


class RetryBudgetSettings(_Frozen):
    ratio: float = Field(default=0.2, ge=0.0, le=1.0)
    min_retries: int = Field(default=3, ge=0)


class ResilienceConfig(_Frozen):
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    retry_budget: RetryBudgetSettings = Field(default_factory=RetryBudgetSettings)
    deadline: Duration = DEFAULT_DEADLINE_S  # the whole call, when the gRPC call sets none
    stream_idle_timeout: Duration = DEFAULT_STREAM_IDLE_TIMEOUT_S  # between two stream chunks


class PriceSpec(_Frozen):
    """USD per million tokens."""

    input_per_mtok: float = Field(ge=0.0, allow_inf_nan=False)
    output_per_mtok: float = Field(ge=0.0, allow_inf_nan=False)
    cached_input_per_mtok: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)


class FallbackTier(_Frozen):
    """One tier after the primary: another model (same prompt and tools), or a fixed answer."""

    provider: ProviderConfig | None = None
    model: str | None = Field(default=None, min_length=1)
    parameters: dict[str, Any] | None = None
    static_response: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> FallbackTier:
        if self.static_response is not None:
            if self.provider is not None or self.model is not None or self.parameters is not None:
                raise ValueError("static_response: a static tier takes no provider, model or parameters")
        elif self.provider is None or self.model is None:
            raise ValueError("set provider and model, or static_response")
        if self.parameters:
            reserved = sorted(_RESERVED_PARAMETERS.intersection(self.parameters))
            if reserved:
                raise ValueError(f".parameters.{reserved[0]}: set by the sidecar, not by a version")
        return self


class ToolConfig(_Frozen):
    name: str
    description: str = ""
    endpoint: Annotated[str, BeforeValidator(lambda v: v if not isinstance(v, str) else _check_http_url(v))]
    timeout: Duration = DEFAULT_TOOL_TIMEOUT_S
    side_effects: Literal["read", "write"] = "read"
    idempotent: bool = False
    retry: RetrySettings | None = None  # overrides the version's resilience.retry for this tool
    # what a write tool answers in a shadow session, where it is intercepted and not run (JSON;
    # None: an empty success, "{}")
    shadow_response: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _TOOL_NAME_RE.match(value):
            raise ValueError(f"expected 1-64 letters, digits, '_' or '-', got {value!r}")
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        """A JSON schema CallTool can check arguments against: a bad one fails at load, not per call."""
        checker = jsonschema.validators.validator_for(value, default=jsonschema.Draft202012Validator)
        try:
            checker.check_schema(value)
        except jsonschema.exceptions.SchemaError as exc:
            where = "".join(f"[{p!r}]" for p in exc.absolute_path)
            raise ValueError(f"not a valid JSON schema: {where or 'schema'}: {exc.message[:200]}") from None
        return value

    @field_validator("shadow_response", mode="before")
    @classmethod
    def _shadow_response(cls, value: Any) -> Any:
        """A YAML mapping or list becomes its JSON; a string must already be JSON."""
        if value is None:
            return None
        if not isinstance(value, str):
            return json.dumps(value, sort_keys=True, separators=(",", ":"))
        try:
            json.loads(value)
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
        return value


class VersionConfig(_Frozen):
    provider: ProviderConfig
    model: str = Field(min_length=1)
    system_prompt: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    request_timeout: Duration = DEFAULT_REQUEST_TIMEOUT_S
    tools: tuple[ToolConfig, ...] = ()
    resilience: ResilienceConfig = Field(default_factory=ResilienceConfig)
    fallback: tuple[FallbackTier, ...] = ()
    prices: dict[str, PriceSpec] = Field(default_factory=dict)  # per model, over the top-level table
    guards: list[dict[str, Any]] | dict[str, Any] | None = None

    @field_validator("guards")
    @classmethod
    def _guards(cls, value: list[dict[str, Any]] | dict[str, Any] | None) -> Any:
        from sidecar.guards import GuardConfigError, build_policy

        try:
            build_policy(value, field="")
        except GuardConfigError as exc:
            message = str(exc)
            raise ValueError(message if message.startswith(("[", ".")) else f": {message}") from None
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(_RESERVED_PARAMETERS.intersection(value))
        if reserved:
            raise ValueError(f".{reserved[0]}: set by the sidecar, not by a version")
        json.dumps(value)  # must be JSON: it is merged into the provider request
        return value

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value: tuple[ToolConfig, ...]) -> tuple[ToolConfig, ...]:
        seen: set[str] = set()
        for index, tool in enumerate(value):
            if tool.name in seen:
                raise ValueError(f"[{index}].name: duplicate tool name {tool.name!r}")
            seen.add(tool.name)
        return value

    def canonical_json(self) -> str:
        data = self.model_dump(mode="json")
        # fields added after the skeleton count only when set, so existing version ids stay put
        for key, default in _OPTIONAL_VERSION_FIELDS.items():
            if data.get(key) == default:
                del data[key]
        for tool in data.get("tools", ()):
            for key in ("retry", "shadow_response"):
                if tool.get(key) is None:
                    tool.pop(key, None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def version_id(self) -> str:
        return outrider.version_id_of(self.canonical_json())  # the collector checks pushes with it


_OPTIONAL_VERSION_FIELDS: dict[str, Any] = {
    "resilience": ResilienceConfig().model_dump(mode="json"),
    "fallback": [],
    "prices": {},
    "guards": None,
}
