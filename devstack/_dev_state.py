"""The ports and the run directory of `outrider dev`.

Every listener sits at a fixed offset from one port base, so a second stack (or a test) moves
them all with one number (`OUTRIDER_DEV_PORT_BASE`). Without a base they keep the ports the
example configs name. The run directory holds what a run leaves behind: the collector's
checkpoints, the sidecar's spill and the session key. It is emptied at every start unless
`--keep-state`: the broker is in memory, so a checkpoint or a spill from an earlier run names
offsets and rollouts the new broker has never seen.

The example configs point at the default ports; `write_configs` writes copies into the run
directory with the listeners, the spill and the state dir moved, and the simulated provider's
URL aliased (`upstream_aliases`) so that the version ids, and the rollout spec naming them,
stay the same on any port.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_RUN_DIR = Path(".outrider/dev")
SESSION_KEY_FILE = "session.key"
# everything a run writes in its directory, and all that a fresh start removes
RUN_FILES = ("collector-state", "spill", SESSION_KEY_FILE, "sidecar.yaml", "collector.yaml")
HOST = "127.0.0.1"

# offsets from the port base, and the ports used without one (the example configs' own)
_OFFSETS = {
    "simprovider": 0,
    "admin": 1,
    "sidecar": 2,
    "sidecar_metrics": 3,
    "collector_metrics": 4,
    "openai": 5,  # the sidecar's OpenAI-compatible endpoint
}
_DEFAULTS = {
    "simprovider": 8000,
    "admin": 50061,
    "sidecar": 50051,
    "sidecar_metrics": 9464,
    "collector_metrics": 9465,
    "openai": 8001,
}
PORT_SPAN = len(_OFFSETS)
_EXAMPLE_SIM_URL = f"http://{HOST}:{_DEFAULTS['simprovider']}"


@dataclass(frozen=True)
class DevPorts:
    simprovider: int
    admin: int
    sidecar: int
    sidecar_metrics: int
    collector_metrics: int
    openai: int

    @classmethod
    def from_base(cls, base: int | None) -> DevPorts:
        """Ports at ``base + offset``; today's fixed ports when ``base`` is None."""
        if base is None:
            return cls(**_DEFAULTS)
        if not 1024 <= base <= 65535 - PORT_SPAN:
            raise ValueError(f"port base {base}: expected 1024..{65535 - PORT_SPAN}")
        return cls(**{name: base + offset for name, offset in _OFFSETS.items()})

    @property
    def sim_url(self) -> str:
        return f"http://{HOST}:{self.simprovider}"


def prepare_run_dir(run_dir: Path, keep_state: bool) -> str:
    """Empty ``run_dir`` unless ``keep_state``; the session key to use (kept with the state)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not keep_state:  # only what a run writes: --state-dir may name a directory with more in it
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    key_file = run_dir / SESSION_KEY_FILE
    if keep_state and key_file.is_file() and key_file.read_text().strip():
        return key_file.read_text().strip()
    key = secrets.token_hex(32)
    key_file.write_text(key)
    key_file.chmod(0o600)
    return key


def write_configs(
    run_dir: Path, ports: DevPorts, sidecar_config: Path, collector_config: Path
) -> tuple[Path, Path]:
    """Copies of the sidecar and collector configs moved onto ``ports`` and ``run_dir``."""
    sidecar = _load(sidecar_config)
    if ports.sim_url != _EXAMPLE_SIM_URL:  # aliased, not rewritten: the version ids stay put
        sidecar.setdefault("upstream_aliases", {})[_EXAMPLE_SIM_URL] = ports.sim_url
    judge = (sidecar.get("shadow") or {}).get("judge")
    if isinstance(judge, dict) and str(judge.get("base_url", "")).startswith(_EXAMPLE_SIM_URL):
        judge["base_url"] = ports.sim_url + judge["base_url"][len(_EXAMPLE_SIM_URL) :]  # not in any id
    sidecar["listen"] = f"{HOST}:{ports.sidecar}"
    sidecar["metrics_port"] = ports.sidecar_metrics
    # the OpenAI-compatible endpoint is always on in the dev stack, whatever the source says
    openai_http = sidecar.get("openai_http") or {}
    openai_http["listen"] = f"{HOST}:{ports.openai}"
    sidecar["openai_http"] = openai_http
    telemetry = sidecar.setdefault("telemetry", {}) or {}
    if telemetry.get("spill_dir", "") is not None:  # null (off) stays off
        telemetry["spill_dir"] = str((run_dir / "spill" / "{agent}").resolve())
    sidecar["telemetry"] = telemetry
    collector = _load(collector_config)
    collector["admin_listen"] = f"{HOST}:{ports.admin}"
    collector["metrics_port"] = ports.collector_metrics
    if collector.get("state_dir", "") is not None:
        collector["state_dir"] = str((run_dir / "collector-state").resolve())
    out_sidecar, out_collector = run_dir / "sidecar.yaml", run_dir / "collector.yaml"
    out_sidecar.write_text(_header(sidecar_config) + yaml.safe_dump(sidecar, sort_keys=False))
    out_collector.write_text(_header(collector_config) + yaml.safe_dump(collector, sort_keys=False))
    return out_sidecar, out_collector


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")  # noqa: TRY004 - a bad file
    return data


def _header(source: Path) -> str:
    return f"# Written by `outrider dev` from {source} (ports and paths moved); edit the source.\n"
