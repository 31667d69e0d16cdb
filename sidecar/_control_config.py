"""The sidecar's `control:` settings: which keys sign control records, how strictly they are
checked, where the last verified state is kept, and how long health waits for a state."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

import outrider
from outrider.durations import Duration

# comma-separated public keys (PEM file paths, directories of *.pub, or `ed25519:<base64>`),
# added to `control.public_keys`
ENV_CONTROL_PUBLIC_KEYS = "OUTRIDER_CONTROL_PUBLIC_KEYS"
DEFAULT_READY_TIMEOUT_S = 10.0
DEFAULT_VERSIONS_REPORT_INTERVAL_S = 30.0
AUTO = "auto"


class ControlConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    public_keys: tuple[str, ...] = ()
    # enforce: only records signed by one of `public_keys` are applied; warn: unsigned records
    # (from a collector older than signing) are applied too, and counted
    verify: Literal["enforce", "warn"] = "enforce"
    # the last verified control state; "auto": beside the spill directory
    # (`<spill dir>.control.json`), null: not kept
    state_file: str | None = AUTO
    # health reports SERVING once a control state is known (persisted or replayed) or after this
    ready_timeout: Duration = Field(default=DEFAULT_READY_TIMEOUT_S, ge=0)
    # how often the sidecar reports the versions it serves (also at start and on every change)
    versions_report_interval: Duration = Field(default=DEFAULT_VERSIONS_REPORT_INTERVAL_S, gt=0)

    def key_specs(self, env: Mapping[str, str] | None = None) -> list[str]:
        env = os.environ if env is None else env
        extra = [s.strip() for s in env.get(ENV_CONTROL_PUBLIC_KEYS, "").split(",") if s.strip()]
        return [*self.public_keys, *extra]

    def verifier(self, env: Mapping[str, str] | None = None) -> outrider.Verifier:
        """A Verifier with the configured keys; SigningKeyError for one that cannot be loaded."""
        return outrider.Verifier(outrider.load_public_keys(self.key_specs(env)), self.verify)

    def state_path(self, spill_path: Path | None, agent: str) -> Path | None:
        if self.state_file is None:
            return None
        if self.state_file != AUTO:
            return Path(self.state_file.replace("{agent}", agent))
        if spill_path is None:
            return None
        return spill_path.with_name(spill_path.name + ".control.json")
