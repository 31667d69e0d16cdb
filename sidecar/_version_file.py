"""A version file for `outrider version push`: one version of one agent, validated with the
sidecar's own `VersionConfig`, so a version the CLI accepts is one every sidecar accepts.

    agent: support-bot
    label: v3                 # optional, for people; not part of the id
    version:                  # the same shape as one entry of a sidecar config's `versions:`
      provider: {name: openai, base_url: http://127.0.0.1:8000/v1}
      model: sim-good
      system_prompt: ...
      tools: [...]

Errors name the file and the field (`v3.yaml: version.tools[0].timeout: ...`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sidecar._config import ConfigError, read_yaml
from sidecar._config_format import format_validation_error
from sidecar._version_config import VersionConfig

MAX_LABEL_LENGTH = 64


class _VersionFileModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    agent: str = Field(min_length=1, max_length=200)
    label: str = Field(default="", max_length=MAX_LABEL_LENGTH)
    version: VersionConfig


@dataclass(frozen=True, slots=True)
class VersionFile:
    agent: str
    label: str
    config: VersionConfig

    @property
    def version_id(self) -> str:
        return self.config.version_id()

    def canonical_json(self) -> str:
        return self.config.canonical_json()


def parse_version_file(data: object, *, source: str = "version") -> VersionFile:
    """Validate an already-parsed mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with agent, label and version")
    try:
        model = _VersionFileModel.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None
    return VersionFile(model.agent, model.label, model.version)


def load_version_file(path: Path | str) -> VersionFile:
    """Read and validate a version file; ConfigError naming the file and field."""
    data, source = read_yaml(path)
    return parse_version_file(data, source=source)
