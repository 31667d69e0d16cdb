"""The version registry's pieces without a broker: the shared id and record checks, the version
file and its CLI errors, the collector's view (require, listing) and the sightings of reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import outrider
from collector._control import ControlPublisher
from collector._errors import RolloutError, UnknownVersion
from collector._metrics import CollectorMetrics
from collector._registry import RegistryView
from collector._sightings import VersionSightings
from collector._spec import load_spec_text
from devstack.cli import main
from outrider.v1 import events_pb2, registry_pb2
from sidecar import ConfigError, load_config, load_version_file, parse_version_file
from sidecar.routing._registry import registry_state_path

ROOT = Path(__file__).resolve().parents[2]
SIGNER = outrider.SigningKey.generate()
AGENT = "support-bot"


def document(**version: Any) -> dict[str, Any]:
    return {
        "agent": AGENT,
        "label": "v9",
        "version": {"provider": {"base_url": "http://127.0.0.1:8000/v1"}, "model": "sim-fast", **version},
    }


def pushed(doc: dict[str, Any] | None = None) -> registry_pb2.RegistryVersion:
    found = parse_version_file(doc or document())
    return registry_pb2.RegistryVersion(
        agent=found.agent,
        version_id=found.version_id,
        label=found.label,
        canonical_json=found.canonical_json(),
    )


def record(
    version: registry_pb2.RegistryVersion, signer: outrider.SigningKey | None = SIGNER
) -> outrider.SignedRecord:
    key = outrider.version_key(version.agent, version.version_id)
    value = version.SerializeToString()
    return outrider.SignedRecord(key, value, tuple(signer.sign(key, value)) if signer else ())


def test_registry_ids_are_the_sidecars_and_the_examples_v3() -> None:
    config = load_config(ROOT / "examples" / "sidecar.yaml", resolve_secrets=False)
    for label, version_id in config.version_ids().items():
        assert outrider.version_id_of(config.versions[label].canonical_json()) == version_id
    v3 = load_version_file(ROOT / "examples" / "version-v3.yaml")
    assert v3.agent == AGENT and v3.label == "v3"
    assert outrider.version_id_of(v3.canonical_json()) == v3.version_id
    assert outrider.canonical_form(v3.canonical_json()) == v3.canonical_json()


def test_registry_open_version_rejects_what_a_reader_must_not_take() -> None:
    verifier = outrider.Verifier([SIGNER.public], "warn")  # even `warn` takes no unsigned version
    good = pushed()
    ok = record(good)
    verdict, opened = outrider.open_version(verifier, ok.key, ok.value, ok.headers)
    assert verdict.ok and opened == good

    def reason(r: outrider.SignedRecord) -> str:
        verdict, opened = outrider.open_version(verifier, r.key, r.value, r.headers)
        assert opened is None and not verdict.ok
        return verdict.reason

    assert reason(record(good, None)) == "unsigned"
    assert reason(record(good, outrider.SigningKey.generate())) == "unknown_key"
    assert reason(outrider.SignedRecord(ok.key, ok.value + b"x", ok.headers)) == "bad_signature"
    moved = outrider.version_key("other", good.version_id)
    assert reason(outrider.SignedRecord(moved, ok.value, tuple(SIGNER.sign(moved, ok.value)))) == "bad_key"
    mismatch = registry_pb2.RegistryVersion()
    mismatch.CopyFrom(good)
    mismatch.version_id = "0123456789ab"
    assert reason(record(mismatch)) == "id_mismatch"
    spaced = registry_pb2.RegistryVersion()
    spaced.CopyFrom(good)
    spaced.canonical_json = json.dumps(json.loads(good.canonical_json), indent=1)
    spaced.version_id = outrider.version_id_of(spaced.canonical_json)
    assert reason(record(spaced)) == "not_canonical"
    garbage = outrider.SignedRecord(ok.key, b"\xff\xff", tuple(SIGNER.sign(ok.key, b"\xff\xff")))
    assert reason(garbage) == "undecodable"


def test_registry_version_file_errors_name_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "v9.yaml"
    doc = document(tools=[{"name": "x", "endpoint": "http://127.0.0.1:1/x", "timeout": "soon"}])
    del doc["version"]["model"]
    doc["version"]["temprature"] = 1
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as error:
        load_version_file(bad)
    message = str(error.value)
    assert f"{bad}: version.model: Field required" in message
    assert f"{bad}: version.tools[0].timeout: 'soon' is not a duration" in message
    assert f"{bad}: version.temprature: Extra inputs are not permitted" in message
    runner = CliRunner()
    result = runner.invoke(main, ["version", "push", str(bad), "--admin", "127.0.0.1:1"])
    assert result.exit_code == 4 and f"{bad}: version.model: Field required" in result.output
    (tmp_path / "list.yaml").write_text("- not a mapping\n")
    result = runner.invoke(main, ["version", "push", str(tmp_path / "list.yaml")])
    assert result.exit_code == 4 and "expected a mapping with agent, label and version" in result.output
    result = runner.invoke(main, ["version", "push", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 4
    (tmp_path / "broken.yaml").write_text("agent: [\n")
    result = runner.invoke(main, ["version", "push", str(tmp_path / "broken.yaml")])
    assert result.exit_code == 4 and "invalid YAML at line" in result.output


def spec_for(stable: str, candidate: str) -> Any:
    text = yaml.safe_dump(
        {
            "agent": AGENT,
            "stable": stable,
            "candidate": candidate,
            "steps": [{"weight": 10, "min_duration": "1m", "min_samples": 10}],
            "gates": [],
        }
    )
    return load_spec_text(text, "r.yaml")


def report(sidecar_id: str, *ids: str, at: float) -> events_pb2.Event:
    event = events_pb2.Event(agent=AGENT, sidecar_id=sidecar_id, time_unix_nano=round(at * 1e9))
    for version_id in ids:
        event.versions_report.versions.add(
            version_id=version_id, label="v1", source="config", model="sim-good"
        )
    return event


def test_registry_require_and_listing() -> None:
    sightings = VersionSightings()
    metrics = CollectorMetrics()
    publisher = ControlPublisher("127.0.0.1:1", 1.0, SIGNER)
    view = RegistryView("127.0.0.1:1", publisher, outrider.Verifier([SIGNER.public]), sightings, metrics)
    v9 = pushed()
    stable = "eb2cd9c81498"
    with pytest.raises(UnknownVersion) as unknown:
        view.require(spec_for(stable, v9.version_id))
    assert isinstance(unknown.value, RolloutError)
    assert f"stable version {stable} of {AGENT} is not in the version registry" in str(unknown.value)
    assert "outrider version push" in str(unknown.value)

    sightings.report(report("sidecar-a", stable, at=100.0), now=200.0)
    sightings.report(report("sidecar-b", stable, at=150.0), now=200.0)
    with pytest.raises(UnknownVersion) as unknown:
        view.require(spec_for(stable, v9.version_id))
    assert f"candidate version {v9.version_id}" in str(unknown.value)

    assert view.add(record(v9)) and not view.add(record(v9))  # the same record twice: once
    assert not view.add(record(v9, None))  # unsigned: dropped and counted
    assert (
        metrics.registry.get_sample_value(
            "outrider_collector_versions_rejected_total", {"reason": "unsigned"}
        )
        == 1
    )
    view.require(spec_for(stable, v9.version_id))  # both known now

    listing = {v.version_id: v for v in view.listing(AGENT).versions}
    assert listing[v9.version_id].in_registry and listing[v9.version_id].model == "sim-fast"
    assert listing[v9.version_id].label == "v9" and not listing[v9.version_id].sidecars
    reported = listing[stable]
    assert not reported.in_registry and reported.label == "v1" and reported.model == "sim-good"
    assert [s.sidecar_id for s in reported.sidecars] == ["sidecar-a", "sidecar-b"]
    assert reported.last_seen_unix_nano == round(150.0 * 1e9)
    assert view.listing("other-bot").versions == []


def test_registry_state_sits_beside_the_control_state() -> None:
    assert registry_state_path(None) is None
    control = Path("/var/spill/support-bot.control.json")
    assert registry_state_path(control) == Path("/var/spill/support-bot.versions.json")
    assert registry_state_path(Path("/x/state.json")) == Path("/x/state.versions.json")


def test_registry_pushed_versions_use_only_the_sidecars_key_sources() -> None:
    from sidecar._config import parse_config
    from sidecar.routing._registry import key_sources, resolve_keys

    base = document()["version"]
    config = parse_config(
        {
            "agent": AGENT,
            "stable": "v1",
            "versions": {"v1": {**base, "provider": {**base["provider"], "api_key_env": "OPENAI_KEY"}}},
        }
    )
    allowed = key_sources(config)
    assert allowed == {"env:OPENAI_KEY"}
    same = parse_version_file(document(provider={**base["provider"], "api_key_env": "OPENAI_KEY"})).config
    assert resolve_keys("v9", same, {"OPENAI_KEY": "sk-1"}, allowed)["v9"].get_secret_value() == "sk-1"
    other = parse_version_file(document(provider={**base["provider"], "api_key_env": "OUTRIDER_SESSION_KEY"}))
    with pytest.raises(
        ValueError, match=r"provider\.api_key_env: OUTRIDER_SESSION_KEY is not a key source"
    ) as exc:
        resolve_keys("v9", other.config, {"OUTRIDER_SESSION_KEY": "secret"}, allowed)
    assert "secret" not in str(exc.value)
    with pytest.raises(
        ValueError, match=r"provider\.api_key_env: environment variable OPENAI_KEY is not set"
    ):
        resolve_keys("v9", same, {}, allowed)
