"""Collector settings: an immutable, validated value loaded from YAML plus overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collector._config_errors import SpecError, parse_yaml_model
from collector._duration import Duration

DEFAULT_KAFKA = "127.0.0.1:9092"
DEFAULT_GROUP_ID = "outrider-collector"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:50061"


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

    @field_validator("admin_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{value!r}: expected host:port")
        return value

    @field_validator("tick_interval_s", "bucket_s", "retention_s", "recovery_idle_s", "publish_timeout_s")
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
        return self


def load_settings(path: Path | None = None, **overrides: Any) -> CollectorSettings:
    """Settings from a YAML file (or defaults) with `overrides` on top; SpecError names file and field."""
    if path is None:
        return parse_yaml_model(CollectorSettings, "", "<settings>", overrides)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    return parse_yaml_model(CollectorSettings, text, str(path), overrides)
