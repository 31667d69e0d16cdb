"""Collector settings: an immutable, validated value loaded from YAML plus overrides."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collector._config_errors import SpecError, parse_yaml_model
from outrider.durations import Duration, parse_duration

DEFAULT_KAFKA = "127.0.0.1:9092"
DEFAULT_GROUP_ID = "outrider-collector"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:50061"
DEFAULT_GRANT_INTERVAL_S = 5.0
DEFAULT_STATE_DIR = Path(".outrider/collector-state")
DEFAULT_CHECKPOINT_INTERVAL_S = 5.0
DEFAULT_SESSION_TIMEOUT_MS = 10_000
DEFAULT_HEARTBEAT_INTERVAL_MS = 3_000
# the standard OpenTelemetry variables, read when `otlp_endpoint` is not set
ENV_OTLP_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
ENV_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
DEFAULT_REPUBLISH_INTERVAL_S = 30.0
DEFAULT_BROKER_CHECK_INTERVAL_S = 2.0
DEFAULT_SHUTDOWN_GRACE_S = 20.0
# the environment variables the `outrider collector` command reads for its options
ENV_SIGNING_KEY_FILE = "OUTRIDER_CONTROL_SIGNING_KEY_FILE"
ENV_CONTROL_PUBLIC_KEYS = "OUTRIDER_CONTROL_PUBLIC_KEYS"
ENV_ADMIN_TOKENS_FILE = "OUTRIDER_ADMIN_TOKENS_FILE"
# leases and grants outlive a few grant periods, so one lost report or grant changes nothing
TTL_GRANT_INTERVALS = 3.0


class QuotaSettings(BaseModel):
    """One global tokens-per-minute quota, shared by every sidecar that calls the resource."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit_tpm: float
    min_share_tpm: float = 0.0  # granted to every live sidecar first (when the limit allows)

    @field_validator("limit_tpm")
    @classmethod
    def _limit_positive(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError("must be > 0")
        return value

    @field_validator("min_share_tpm")
    @classmethod
    def _share_not_negative(cls, value: float) -> float:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError("must be >= 0")
        return value

    @model_validator(mode="after")
    def _share_within_limit(self) -> QuotaSettings:
        if self.min_share_tpm > self.limit_tpm:
            raise ValueError("min_share_tpm: must be at most limit_tpm")
        return self


DEFAULT_NOTIFY_TIMEOUT_S = 5.0


class NotifySettings(BaseModel):
    """A webhook told of every rollout state change to HOLD, NO_DATA, ROLLED_BACK, PROMOTED or
    ABORTED (a JSON POST, Slack-compatible `text` plus structured fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=1)
    timeout: Duration = DEFAULT_NOTIFY_TIMEOUT_S  # per attempt

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r}: expected an http:// or https:// URL")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout_positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value


class CollectorSettings(BaseModel):
    """Everything the collector process needs; durations in seconds (or "5s"-style in YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kafka_bootstrap: str = Field(default=DEFAULT_KAFKA, min_length=1)
    group_id: str = Field(default=DEFAULT_GROUP_ID, min_length=1)
    admin_listen: str = DEFAULT_ADMIN_LISTEN
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # None: off, 0: a free port
    tick_interval_s: Duration = 1.0
    bucket_s: Duration = 5.0
    retention_s: Duration = 900.0
    dedupe_cache_size: int = Field(default=200_000, ge=1)
    max_batch_records: int = Field(default=500, ge=1)
    recovery_idle_s: Duration = 1.0  # reading the control topic back stops after this much quiet
    recovery_timeout_s: Duration = 30.0
    publish_timeout_s: Duration = 10.0
    topic_partitions: int = Field(default=1, ge=1)
    # checkpoints of the window state with the consumed offsets (None: off, offsets are
    # committed after every batch and a restart starts with empty windows)
    state_dir: Path | None = DEFAULT_STATE_DIR
    checkpoint_interval_s: Duration = DEFAULT_CHECKPOINT_INTERVAL_S
    # consumer-group liveness: a killed member is replaced after session_timeout_ms
    session_timeout_ms: int = Field(default=DEFAULT_SESSION_TIMEOUT_MS, ge=1000, le=300_000)
    heartbeat_interval_ms: int = Field(default=DEFAULT_HEARTBEAT_INTERVAL_MS, ge=100)
    # relay `outrider.spans` to this OTLP gRPC endpoint ("host:port" or "http://host:port");
    # None: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or $OTEL_EXPORTER_OTLP_ENDPOINT, else off
    otlp_endpoint: str | None = None
    # global tokens-per-minute quotas by resource ("<provider>/<model>"); none: no grant loop
    quotas: dict[str, QuotaSettings] = Field(default_factory=dict)
    grant_interval_s: Duration = DEFAULT_GRANT_INTERVAL_S  # how often grants are published
    lease_ttl_s: Duration = TTL_GRANT_INTERVALS * DEFAULT_GRANT_INTERVAL_S  # a usage report's life
    grant_ttl_s: Duration = TTL_GRANT_INTERVALS * DEFAULT_GRANT_INTERVAL_S  # how long a grant holds
    # signed control: the private key (PEM, `outrider keygen`) that signs what this collector
    # writes (None: a throwaway key, warned: sidecars reject its records), the public keys its
    # reads accept besides its own (files, directories of *.pub, `ed25519:<base64>`)
    signing_key_file: Path | None = None
    control_public_keys: tuple[str, ...] = ()
    control_verify: Literal["enforce", "warn"] = "enforce"
    # the current state of every agent is written again at start and this often
    republish_interval_s: Duration = DEFAULT_REPUBLISH_INTERVAL_S
    # how often the collector checks that the broker still holds its topics and marker
    broker_check_interval_s: Duration = DEFAULT_BROKER_CHECK_INTERVAL_S
    # the admin API: bearer tokens (a YAML file of hashed tokens) and/or mTLS (server cert and
    # key; client certificates signed by `admin_tls_client_ca`). Without either, every admin
    # call is refused with UNAUTHENTICATED.
    admin_tokens_file: Path | None = None
    admin_tls_cert: Path | None = None
    admin_tls_key: Path | None = None
    admin_tls_client_ca: Path | None = None
    admin_reflection: bool = False
    shutdown_grace_s: Duration = DEFAULT_SHUTDOWN_GRACE_S  # SIGTERM ends the process within this
    # webhooks told of rollout state changes (Slack incoming webhooks work as they are)
    notify: list[NotifySettings] = Field(default_factory=list)
    # this replica's name in the consumer group's answers (None: <hostname>-<pid>); replicas
    # share group_id, signing key and (for takeover with evidence) state_dir
    replica_id: str | None = Field(default=None, min_length=1)
    # an admin call for an agent another replica owns is relayed to it; UNAVAILABLE after this
    relay_timeout_s: Duration = 20.0

    @model_validator(mode="before")
    @classmethod
    def _ttls_follow_the_interval(cls, data: Any) -> Any:
        """Unset lease and grant TTLs are three grant intervals."""
        if not isinstance(data, dict) or "grant_interval_s" not in data:
            return data
        try:
            interval = parse_duration(data["grant_interval_s"])
        except ValueError:
            return data  # the field validator reports it
        data = dict(data)
        for key in ("lease_ttl_s", "grant_ttl_s"):
            if data.get(key) is None:
                data[key] = TTL_GRANT_INTERVALS * interval
        return data

    @field_validator("quotas")
    @classmethod
    def _resource_names(cls, value: dict[str, QuotaSettings]) -> dict[str, QuotaSettings]:
        for resource in value:
            provider, sep, model = resource.partition("/")
            if not sep or not provider.strip() or not model.strip():
                raise ValueError(f"{resource!r} is not named <provider>/<model>")
        return value

    @field_validator("admin_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{value!r}: expected host:port")
        return value

    @field_validator(
        "tick_interval_s",
        "bucket_s",
        "retention_s",
        "recovery_idle_s",
        "publish_timeout_s",
        "grant_interval_s",
        "lease_ttl_s",
        "grant_ttl_s",
        "checkpoint_interval_s",
        "republish_interval_s",
        "broker_check_interval_s",
        "shutdown_grace_s",
        "relay_timeout_s",
    )
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @model_validator(mode="after")
    def _retention_covers_buckets(self) -> CollectorSettings:
        if self.retention_s < self.bucket_s:
            raise ValueError("retention_s: must be at least bucket_s")
        if self.recovery_timeout_s < self.recovery_idle_s:
            raise ValueError("recovery_timeout_s: must be at least recovery_idle_s")
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms: must be at most a third of session_timeout_ms")
        if (self.admin_tls_cert is None) != (self.admin_tls_key is None):
            raise ValueError("admin_tls_cert: admin_tls_cert and admin_tls_key go together")
        if self.admin_tls_client_ca is not None and self.admin_tls_cert is None:
            raise ValueError("admin_tls_client_ca: needs admin_tls_cert and admin_tls_key")
        if self.grant_ttl_s <= self.grant_interval_s:
            raise ValueError("grant_ttl_s: must be greater than grant_interval_s (grants would lapse)")
        return self


def otlp_endpoint(settings: CollectorSettings, environ: Mapping[str, str] | None = None) -> str | None:
    """Where spans are relayed: the setting, else the standard OpenTelemetry variables, else None."""
    env = os.environ if environ is None else environ
    for value in (settings.otlp_endpoint, env.get(ENV_OTLP_TRACES_ENDPOINT), env.get(ENV_OTLP_ENDPOINT)):
        if value and value.strip():
            return value.strip()
    return None


def load_settings(path: Path | None = None, **overrides: Any) -> CollectorSettings:
    """Settings from a YAML file (or defaults) with `overrides` on top; SpecError names file and field."""
    if path is None:
        return parse_yaml_model(CollectorSettings, "", "<settings>", overrides)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    return parse_yaml_model(CollectorSettings, text, str(path), overrides)
