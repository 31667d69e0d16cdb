"""The sidecar's YAML configuration: one agent, its versions, where to listen and report.

Everything is validated at load into frozen pydantic models. Errors name the file and the
field path (``sidecar.yaml: versions.v2.tools[0].timeout: ...``). Secrets (provider API
keys, the session key) are read once at load from the environment or a file, kept in
private attributes, and never appear in repr, str, errors or version ids.

The models of one version (provider, tools, resilience, fallback, prices) and its content
id are in `sidecar._version_config`.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    IPvAnyAddress,
    PrivateAttr,
    SecretStr,
    ValidationError,
    model_validator,
)

from outrider.durations import PositiveDuration, parse_positive_duration
from sidecar._aliases import alias_version
from sidecar._config_format import format_validation_error
from sidecar._control_config import ControlConfig
from sidecar._openai_wire import OpenAIHttpConfig
from sidecar._version_config import PriceSpec, VersionConfig, _Frozen
from sidecar.flags._model import FlagConfig, check_flags
from sidecar.shadow._settings import ShadowConfig

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS_PORT = 9464
#: /metrics binds loopback by default; a pod or compose service scraped from outside sets 0.0.0.0
DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_TELEMETRY_QUEUE_SIZE = 10_000
#: Where telemetry waits on disk while Kafka is unreachable; `{agent}` is the agent's name.
DEFAULT_SPILL_DIR = ".outrider/spill/{agent}"
DEFAULT_SPILL_MAX_BYTES = 256 * 1024 * 1024
MIN_SPILL_MAX_BYTES = 64 * 1024
DEFAULT_SESSION_TTL_S = 3600.0
# the cap on a session's life from when it was issued, enforced by every replica on every token
# (the token's own expiry is min(session_ttl, max_session_duration)); at most a day, because the
# collector lists a retired version for a day past its drain deadline and a drained session must
# not outlive that listing
DEFAULT_MAX_SESSION_DURATION_S = 3600.0
MAX_SESSION_DURATION_LIMIT_S = 86_400.0
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_SHUTDOWN_GRACE_S = 10.0
DEFAULT_USAGE_REPORT_INTERVAL_S = 5.0
#: The environment variable holding the HMAC key for session tokens (shared by replicas).
DEFAULT_SESSION_KEY_ENV = "OUTRIDER_SESSION_KEY"
# a file holding the session key (a mounted Secret), read when the variable above is unset
ENV_SESSION_KEY_FILE = "OUTRIDER_SESSION_KEY_FILE"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and field."""


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as "500ms", "30s", "5m", "1h" (zero refused)."""
    return parse_positive_duration(value)


Duration = PositiveDuration


def check_listen(value: str) -> str:
    """`host:port` (port 0 = any free port) or `unix:///absolute/path`."""
    if value.startswith("unix://"):
        if not value.startswith("unix:///") or len(value) <= len("unix:///"):
            raise ValueError(f"expected unix:///absolute/path, got {value!r}")
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port or unix:///path, got {value!r}")
    return value


class QuotaLimits(_Frozen):
    """Per-user or per-tenant limits; None = no limit on that dimension."""

    tokens_per_minute: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    requests_per_minute: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)


class GlobalQuotaConfig(_Frozen):
    """This sidecar's side of a global tokens-per-minute quota on one `provider/model`."""

    safe_share_tpm: float = Field(ge=0.0, allow_inf_nan=False)
    grant_ttl: Duration = 30.0
    priority_threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    queue_max: int = Field(default=100, ge=1)
    queue_timeout: Duration = 2.0
    # how far back use and unmet demand are reported (and the 80% rule looks): short enough
    # that a share follows demand within a few grant periods, long enough to smooth bursts
    usage_window: Duration = Field(default=10.0, gt=0.0)


class KafkaConfig(_Frozen):
    bootstrap_servers: str = Field(default=DEFAULT_KAFKA_BOOTSTRAP, min_length=1)


class TelemetryConfig(_Frozen):
    """The telemetry path (events and spans to Kafka). `spill_dir: null` turns the on-disk
    spill off (what cannot be sent then waits in memory, and is dropped when that is full)."""

    enabled: bool = True
    spill_dir: str | None = Field(default=DEFAULT_SPILL_DIR, min_length=1)
    spill_max_bytes: int = Field(default=DEFAULT_SPILL_MAX_BYTES, ge=MIN_SPILL_MAX_BYTES)
    spill_fsync: bool = False

    def spill_path(self, agent: str) -> Path | None:
        """The spill directory for `agent`, or None when spilling is off."""
        if self.spill_dir is None:
            return None
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", agent).lstrip(".") or "_"
        return Path(self.spill_dir.replace("{agent}", safe))


class SidecarConfig(_Frozen):
    """A validated sidecar configuration. Build with `load_config` (which also reads secrets)."""

    agent: str = Field(min_length=1)
    stable: str = Field(min_length=1)
    listen: Annotated[str, BeforeValidator(lambda v: v if not isinstance(v, str) else check_listen(v))] = (
        DEFAULT_LISTEN
    )
    metrics_port: int | None = Field(default=DEFAULT_METRICS_PORT, ge=0, le=65535)
    metrics_host: IPvAnyAddress = IPv4Address(DEFAULT_METRICS_HOST)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    telemetry_queue_size: int = Field(default=DEFAULT_TELEMETRY_QUEUE_SIZE, ge=1)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    session_ttl: Duration = DEFAULT_SESSION_TTL_S
    max_session_duration: Duration = DEFAULT_MAX_SESSION_DURATION_S
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, ge=1024)
    shutdown_grace: Duration = DEFAULT_SHUTDOWN_GRACE_S
    session_key_env: str | None = DEFAULT_SESSION_KEY_ENV
    versions: dict[str, VersionConfig] = Field(min_length=1)
    prices: dict[str, PriceSpec] = Field(default_factory=dict)
    user_quotas: QuotaLimits | None = None
    tenant_quotas: QuotaLimits | None = None
    global_quotas: dict[str, GlobalQuotaConfig] = Field(default_factory=dict)
    usage_report_interval: Duration = DEFAULT_USAGE_REPORT_INTERVAL_S
    control: ControlConfig = Field(default_factory=ControlConfig)
    upstream_aliases: dict[str, str] = Field(default_factory=dict)  # see sidecar._aliases
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)  # see sidecar.shadow._settings
    flags: tuple[FlagConfig, ...] = ()  # feature flags, see sidecar.flags._model
    openai_http: OpenAIHttpConfig | None = None  # the OpenAI-compatible endpoint, see sidecar._openai_http

    _version_ids: dict[str, str] = PrivateAttr(default_factory=dict)
    _api_keys: dict[str, SecretStr] = PrivateAttr(default_factory=dict)
    _session_key: SecretStr | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _cross_checks(self) -> SidecarConfig:
        if self.stable not in self.versions:
            raise ValueError(
                f"stable: {self.stable!r} is not one of the versions ({', '.join(self.versions)})"
            )
        if not 0 < self.max_session_duration <= MAX_SESSION_DURATION_LIMIT_S:
            raise ValueError(
                f"max_session_duration: must be more than 0 and at most "
                f"{MAX_SESSION_DURATION_LIMIT_S:g}s (a day); got {self.max_session_duration:g}s"
            )
        check_flags(self.flags, self.versions)
        self._version_ids = {label: version.version_id() for label, version in self.versions.items()}
        if self.upstream_aliases:  # after the ids: an alias is where we call, not what the version is
            moved = {label: alias_version(v, self.upstream_aliases) for label, v in self.versions.items()}
            object.__setattr__(self, "versions", moved)
        return self

    def version_ids(self) -> dict[str, str]:
        """Version label -> content id."""
        return dict(self._version_ids)

    @property
    def stable_version_id(self) -> str:
        return self._version_ids[self.stable]

    def api_key(self, label: str) -> SecretStr | None:
        """The provider API key of version `label`, if it has one (read by `load_secrets`)."""
        return self._api_keys.get(label)

    @property
    def has_session_key(self) -> bool:
        return self._session_key is not None

    def session_key(self) -> bytes:
        """The HMAC key for session tokens; random per process when none is configured."""
        if self._session_key is None:
            self._session_key = SecretStr(secrets.token_hex(32))
        return self._session_key.get_secret_value().encode()

    def load_secrets(self, env: Mapping[str, str] | None = None, *, source: str = "config") -> SidecarConfig:
        """Read every version's API key and the session key; missing -> ConfigError naming the field."""
        env = os.environ if env is None else env
        keys: dict[str, SecretStr] = {}
        providers = [(label, f"versions.{label}.provider", v.provider) for label, v in self.versions.items()]
        for label, version in self.versions.items():
            for index, tier in enumerate(version.fallback):
                if tier.provider is not None:
                    where = f"versions.{label}.fallback[{index}].provider"
                    providers.append((fallback_key(label, index + 1), where, tier.provider))
        for label, where, provider in providers:
            if provider.api_key_env:
                value = env.get(provider.api_key_env, "")
                if not value:
                    raise ConfigError(
                        f"{source}: {where}.api_key_env: "
                        f"environment variable {provider.api_key_env} is not set or empty"
                    )
                keys[label] = SecretStr(value.strip())
            elif provider.api_key_file:
                try:
                    value = Path(provider.api_key_file).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ConfigError(
                        f"{source}: {where}.api_key_file: cannot read {provider.api_key_file}: {exc.strerror}"
                    ) from None
                if not value:
                    raise ConfigError(f"{source}: {where}.api_key_file: {provider.api_key_file} is empty")
                keys[label] = SecretStr(value)
        self._api_keys = keys
        if self.session_key_env and env.get(self.session_key_env):
            self._session_key = SecretStr(env[self.session_key_env])
        elif key_file := env.get(ENV_SESSION_KEY_FILE):
            try:
                value = Path(key_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"{source}: {ENV_SESSION_KEY_FILE}: cannot read {key_file}: {exc.strerror}"
                ) from None
            if not value:
                raise ConfigError(f"{source}: {ENV_SESSION_KEY_FILE}: {key_file} is empty")
            self._session_key = SecretStr(value)
        return self

    def with_overrides(
        self,
        *,
        listen: str | None = None,
        kafka_bootstrap: str | None = None,
        metrics_port: int | None = None,
        disable_metrics: bool = False,
    ) -> SidecarConfig:
        """A copy with command-line overrides applied (None keeps the file's value; secrets carried over)."""
        update: dict[str, Any] = {}
        if listen is not None:
            try:
                update["listen"] = check_listen(listen)
            except ValueError as exc:
                raise ConfigError(f"listen: {exc}") from None
        if disable_metrics:
            update["metrics_port"] = None
        elif metrics_port is not None:
            if not 0 <= metrics_port <= 65535:
                raise ConfigError(f"metrics_port: expected a port in 0..65535, got {metrics_port}")
            update["metrics_port"] = metrics_port
        if kafka_bootstrap is not None:
            update["kafka"] = KafkaConfig(bootstrap_servers=kafka_bootstrap)
        return self.model_copy(update=update)


def fallback_key(label: str, tier: int) -> str:
    """The `api_key` name of a version's fallback tier (1-based, as in "fallback-1")."""
    return f"{label}#fallback-{tier}"


def parse_config(data: object, *, source: str = "config") -> SidecarConfig:
    """Validate an already-parsed mapping (no secrets read)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return SidecarConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def read_yaml(path: Path | str) -> tuple[Any, str]:
    """A YAML file's data and its name for errors; ConfigError when unreadable or not YAML."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text), source
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: invalid YAML{where}") from None


def load_config(
    path: Path | str, env: Mapping[str, str] | None = None, *, resolve_secrets: bool = True
) -> SidecarConfig:
    """Read, validate and (unless told not to) resolve the secrets of a sidecar YAML file.

    Raises ConfigError naming the file and field. `resolve_secrets=False` is for tools that
    only need the version ids and must work without the API keys at hand.
    """
    data, source = read_yaml(path)
    config = parse_config(data, source=source)
    return config.load_secrets(env, source=source) if resolve_secrets else config
