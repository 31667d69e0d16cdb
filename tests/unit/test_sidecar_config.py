"""Sidecar config: validation errors name the file and field, version ids hash content,
secrets never leak."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import sidecar
from sidecar import ConfigError, load_config, parse_duration
from sidecar._config import parse_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sidecar.yaml"
SECRET = "sk-live-very-secret-value-42"


def base() -> dict[str, Any]:
    return {
        "agent": "support-bot",
        "stable": "v1",
        "versions": {
            "v1": {
                "provider": {"base_url": "http://127.0.0.1:8000/v1", "api_key_env": "OPENAI_API_KEY"},
                "model": "sim-good",
                "system_prompt": "You are helpful.",
                "parameters": {"temperature": 0.2, "max_tokens": 256},
                "tools": [
                    {
                        "name": "lookup_order",
                        "endpoint": "http://127.0.0.1:8000/tools/lookup_order",
                        "timeout": "5s",
                        "side_effects": "read",
                        "idempotent": True,
                    }
                ],
            },
            "v2": {"provider": {"base_url": "http://127.0.0.1:8000/v1"}, "model": "sim-bad"},
        },
    }


def write(tmp_path: Path, data: dict[str, Any], name: str = "sidecar.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def load_error(tmp_path: Path, data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"OPENAI_API_KEY": SECRET} if env is None else env)
    return str(info.value)


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE, env={})
    assert config.agent == "support-bot"
    assert config.listen == "127.0.0.1:50051"
    assert config.session_ttl == 3600 and config.shutdown_grace == 10
    assert config.versions["v1"].model == "sim-good" and config.versions["v2"].model == "sim-bad"
    assert config.versions["v1"].tools[0].timeout == 5
    ids = config.version_ids()
    assert set(ids) == {"v1", "v2"} and ids["v1"] != ids["v2"]
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids.values())
    assert config.stable_version_id == ids["v1"]


def test_defaults_and_durations(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, base()), env={"OPENAI_API_KEY": SECRET})
    assert config.metrics_port == 9464 and config.telemetry_queue_size == 10_000
    assert str(config.metrics_host) == "127.0.0.1"  # loopback unless a deploy opens it
    assert config.versions["v2"].request_timeout == 30
    assert [parse_duration(v) for v in ("500ms", "30s", "5m", "1h", 2, 0.25, "1.5s")] == [
        0.5,
        30,
        300,
        3600,
        2,
        0.25,
        1.5,
    ]
    for bad in ("soon", "0s", -1, True, "5 days"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (
            lambda d: d["versions"]["v1"]["tools"][0].update(timeout="fast"),
            ["versions.v1.tools[0].timeout", "duration"],
        ),
        (
            lambda d: d["versions"]["v1"]["tools"][0].update(side_effects="maybe"),
            ["versions.v1.tools[0].side_effects"],
        ),
        (lambda d: d.update(stable="v9"), ["stable", "v9"]),
        (lambda d: d.update(metrics_host="all"), ["metrics_host", "IPv4 or IPv6"]),
        (lambda d: d.pop("agent"), ["agent", "Field required"]),
        (lambda d: d.update(listen="nowhere"), ["listen", "host:port"]),
        (lambda d: d.update(bogus=1), ["bogus", "Extra inputs"]),
        (
            lambda d: d["versions"]["v2"]["provider"].update(base_url="ftp://x"),
            ["versions.v2.provider.base_url"],
        ),
        (
            lambda d: d["versions"]["v2"].update(parameters={"model": "x"}),
            ["versions.v2.parameters.model: set by the sidecar"],
        ),
        (
            lambda d: d["versions"]["v1"]["tools"].append(dict(d["versions"]["v1"]["tools"][0])),
            ["versions.v1.tools[1].name", "duplicate"],
        ),
        (lambda d: d["versions"]["v1"]["tools"][0].update(name="bad name!"), ["versions.v1.tools[0].name"]),
        (
            lambda d: d["versions"]["v2"]["provider"].update(api_key_env="A", api_key_file="/f"),
            ["versions.v2.provider", "at most one"],
        ),
        (lambda d: d.update(versions={}), ["versions"]),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, mutate: Any, fragments: list[str]) -> None:
    data = base()
    mutate(data)
    message = load_error(tmp_path, data)
    assert message.startswith(str(tmp_path / "sidecar.yaml") + ": "), message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_api_key_names_field_and_env_var(tmp_path: Path) -> None:
    message = load_error(tmp_path, base(), env={})
    assert "versions.v1.provider.api_key_env" in message and "OPENAI_API_KEY" in message


def test_api_key_from_file(tmp_path: Path) -> None:
    data = base()
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    data["versions"]["v1"]["provider"] = {"base_url": "http://h/v1", "api_key_file": str(key_file)}
    config = load_config(write(tmp_path, data), env={})
    key = config.api_key("v1")
    assert key is not None and key.get_secret_value() == SECRET
    assert config.api_key("v2") is None
    data["versions"]["v1"]["provider"]["api_key_file"] = str(tmp_path / "missing")
    message = load_error(tmp_path, data, env={})
    assert "versions.v1.provider.api_key_file" in message


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("agent: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML at line"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml", env={})
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path, env={})


def test_secret_never_appears(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, base()), env={"OPENAI_API_KEY": SECRET, "OUTRIDER_SESSION_KEY": "sess-k"}
    )
    rendered = [
        repr(config),
        str(config),
        config.model_dump_json(),
        repr(config.api_key("v1")),
        str(config.api_key("v1")),
        config.versions["v1"].canonical_json(),
    ]
    for text in rendered:
        assert SECRET not in text and "sess-k" not in text
    from sidecar.routing._versions import build_versions

    versions = build_versions(config)
    assert all(SECRET not in repr(v) for v in versions.values())
    assert config.session_key() == b"sess-k"


def test_version_id_is_content_hash(tmp_path: Path) -> None:
    data = base()
    ids = parse_config(data).version_ids()
    # key order in the YAML does not matter, nor does the label
    shuffled = copy.deepcopy(data)
    v1 = shuffled["versions"]["v1"]
    shuffled["versions"] = {"renamed": dict(reversed(list(v1.items()))), "v2": shuffled["versions"]["v2"]}
    shuffled["versions"]["renamed"]["parameters"] = dict(reversed(list(v1["parameters"].items())))
    shuffled["stable"] = "renamed"
    assert parse_config(shuffled).version_ids()["renamed"] == ids["v1"]
    # the key's value is not part of the id, its env var name is
    a = parse_config(data).load_secrets({"OPENAI_API_KEY": "one"}).version_ids()["v1"]
    b = parse_config(data).load_secrets({"OPENAI_API_KEY": "two"}).version_ids()["v1"]
    assert a == b == ids["v1"]
    renamed_env = copy.deepcopy(data)
    renamed_env["versions"]["v1"]["provider"]["api_key_env"] = "OTHER_KEY"
    assert parse_config(renamed_env).version_ids()["v1"] != ids["v1"]
    # equal values written differently validate to the same content
    durations = copy.deepcopy(data)
    durations["versions"]["v1"]["tools"][0]["timeout"] = 5
    assert parse_config(durations).version_ids()["v1"] == ids["v1"]
    for field, value in (
        ("system_prompt", "You are terse."),
        ("model", "sim-x"),
        ("parameters", {"temperature": 1}),
    ):
        changed = copy.deepcopy(data)
        changed["versions"]["v1"][field] = value
        assert parse_config(changed).version_ids()["v1"] != ids["v1"], field


def test_with_overrides_keeps_secrets(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, base()), env={"OPENAI_API_KEY": SECRET})
    changed = config.with_overrides(
        listen="unix:///tmp/x.sock", kafka_bootstrap="127.0.0.1:1", disable_metrics=True
    )
    assert changed.listen == "unix:///tmp/x.sock" and changed.kafka.bootstrap_servers == "127.0.0.1:1"
    assert changed.metrics_port is None
    assert changed.api_key("v1") is not None
    assert changed.version_ids() == config.version_ids()
    assert config.with_overrides().metrics_port == 9464
    assert config.with_overrides(metrics_port=0).metrics_port == 0
    with pytest.raises(ConfigError, match="listen"):
        config.with_overrides(listen="unix://relative")
    with pytest.raises(ConfigError, match="metrics_port"):
        config.with_overrides(metrics_port=70000)
    with pytest.raises(Exception, match="frozen"):
        config.agent = "x"  # type: ignore[misc]


def test_public_surface() -> None:
    assert sorted(sidecar.__all__) == sorted(
        [
            "Assignment",
            "Clock",
            "ConfigError",
            "ManualClock",
            "Router",
            "Session",
            "SessionCodec",
            "SessionError",
            "SessionExpired",
            "Sidecar",
            "SidecarConfig",
            "SidecarError",
            "SystemClock",
            "ToolConfig",
            "UnknownSession",
            "UpstreamConnectError",
            "UpstreamError",
            "UpstreamInvalidResponse",
            "UpstreamStatusError",
            "UpstreamTimeout",
            "VersionConfig",
            "VersionFile",
            "load_config",
            "load_version_file",
            "parse_version_file",
            "parse_duration",
            "run",
        ]
    )
    for name in sidecar.__all__:
        assert getattr(sidecar, name) is not None


def test_load_without_secrets_for_version_ids(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, base()), env={}, resolve_secrets=False)
    assert config.api_key("v1") is None
    assert config.version_ids() == parse_config(base()).version_ids()


def test_telemetry_section_defaults_and_overrides(tmp_path: Path) -> None:
    config = parse_config(base())
    telemetry = config.telemetry
    assert telemetry.enabled and telemetry.spill_max_bytes == 256 * 1024 * 1024 and not telemetry.spill_fsync
    assert telemetry.spill_path("support-bot") == Path(".outrider/spill/support-bot")
    assert telemetry.spill_path("../evil/bot") == Path(".outrider/spill/_evil_bot")  # never outside
    data = base()
    data["telemetry"] = {"enabled": False, "spill_dir": None, "spill_max_bytes": 1 << 20}
    off = parse_config(data).telemetry
    assert not off.enabled and off.spill_path("support-bot") is None and off.spill_max_bytes == 1 << 20
    # the telemetry section is process wiring, never part of a version id
    assert parse_config(data).version_ids() == config.version_ids()


@pytest.mark.parametrize(
    ("telemetry", "fragments"),
    [
        ({"spill_max_bytes": 10}, ["telemetry.spill_max_bytes", "65536"]),
        ({"spill_dir": ""}, ["telemetry.spill_dir"]),
        ({"enabled": "perhaps"}, ["telemetry.enabled"]),
        ({"spill": "x"}, ["telemetry.spill", "Extra inputs"]),
    ],
)
def test_telemetry_errors_name_the_field(
    tmp_path: Path, telemetry: dict[str, Any], fragments: list[str]
) -> None:
    data = base()
    data["telemetry"] = telemetry
    message = load_error(tmp_path, data)
    for fragment in fragments:
        assert fragment in message, message


def test_upstream_aliases_move_calls_but_not_version_ids() -> None:
    data = base()
    plain = parse_config(copy.deepcopy(data))
    data["versions"]["v1"]["fallback"] = [
        {"provider": {"base_url": "http://127.0.0.1:8000/v1"}, "model": "m"}
    ]
    data["upstream_aliases"] = {"http://127.0.0.1:8000": "http://127.0.0.1:41200"}
    moved = parse_config(data)
    unaliased = parse_config({k: v for k, v in data.items() if k != "upstream_aliases"})
    assert moved.version_ids() == unaliased.version_ids() != plain.version_ids()  # fallback is content
    v1 = moved.versions["v1"]
    assert v1.provider.base_url == "http://127.0.0.1:41200/v1"
    assert v1.tools[0].endpoint == "http://127.0.0.1:41200/tools/lookup_order"
    assert v1.fallback[0].provider is not None
    assert v1.fallback[0].provider.base_url == "http://127.0.0.1:41200/v1"
