"""`outrider dev`'s ports and run directory: one port base moves every listener, each run
starts fresh unless told to keep its state, and the moved configs keep the version ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from devstack._dev_state import DevPorts, prepare_run_dir, write_configs
from sidecar import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_ports_sit_at_offsets_from_the_base_or_keep_the_example_ports() -> None:
    assert DevPorts.from_base(None) == DevPorts(8000, 50061, 50051, 9464, 9465, 8001)
    assert DevPorts.from_base(41000) == DevPorts(41000, 41001, 41002, 41003, 41004, 41005)
    with pytest.raises(ValueError, match="port base"):
        DevPorts.from_base(80)


def test_each_run_starts_fresh_unless_state_is_kept(tmp_path: Path) -> None:
    run = tmp_path / "dev"
    key = prepare_run_dir(run, keep_state=False)
    (run / "collector-state").mkdir()
    (run / "collector-state" / "outrider-collector.ckpt").write_bytes(b"an earlier run")
    assert prepare_run_dir(run, keep_state=True) == key
    assert (run / "collector-state" / "outrider-collector.ckpt").exists()
    (run / "notes.txt").write_text("not ours")
    fresh = prepare_run_dir(run, keep_state=False)
    assert fresh != key and not (run / "collector-state").exists()
    assert (run / "notes.txt").read_text() == "not ours"  # only what a run writes goes
    assert (run / "session.key").stat().st_mode & 0o077 == 0


def test_moved_configs_keep_version_ids_and_point_at_the_run(tmp_path: Path) -> None:
    ports = DevPorts.from_base(41000)
    sidecar_yaml, collector_yaml = write_configs(
        tmp_path, ports, ROOT / "examples" / "sidecar.yaml", ROOT / "examples" / "collector.yaml"
    )
    example = load_config(ROOT / "examples" / "sidecar.yaml", env={})
    moved = load_config(sidecar_yaml, env={})
    assert moved.version_ids() == example.version_ids()
    assert moved.listen == "127.0.0.1:41002" and moved.metrics_port == 41003
    assert moved.openai_http is not None and moved.openai_http.listen == "127.0.0.1:41005"
    assert moved.versions["v2"].provider.base_url == "http://127.0.0.1:41000/v1"
    assert str(moved.telemetry.spill_dir).startswith(str(tmp_path.resolve()))
    collector = yaml.safe_load(collector_yaml.read_text())
    assert collector["admin_listen"] == "127.0.0.1:41001" and collector["metrics_port"] == 41004
    assert collector["state_dir"] == str((tmp_path / "collector-state").resolve())
