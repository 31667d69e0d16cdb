"""Quota settings of the collector: defaults that follow the grant interval, errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector import CollectorSettings, SpecError, load_settings
from collector._settings import QuotaSettings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_ttls_following_the_interval() -> None:
    default = CollectorSettings()
    assert default.quotas == {}
    assert (default.grant_interval_s, default.lease_ttl_s, default.grant_ttl_s) == (5.0, 15.0, 15.0)
    fast = load_settings(None, grant_interval_s="300ms")
    assert fast.grant_interval_s == pytest.approx(0.3)
    assert fast.lease_ttl_s == pytest.approx(0.9) and fast.grant_ttl_s == pytest.approx(0.9)
    explicit = load_settings(None, grant_interval_s="2s", lease_ttl_s="10s")
    assert (explicit.lease_ttl_s, explicit.grant_ttl_s) == (10.0, 6.0)


def test_quotas_load_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "collector.yaml"
    path.write_text(
        "grant_interval_s: 1s\n"
        "quotas:\n"
        "  openai/gpt-4o: {limit_tpm: 30000, min_share_tpm: 500}\n"
        "  vllm/meta-llama/Llama-3-8B: {limit_tpm: 1e6}\n"
    )
    settings = load_settings(path)
    assert settings.quotas == {
        "openai/gpt-4o": QuotaSettings(limit_tpm=30000, min_share_tpm=500),
        "vllm/meta-llama/Llama-3-8B": QuotaSettings(limit_tpm=1e6),
    }
    assert settings.grant_ttl_s == 3.0
    with pytest.raises(Exception, match="frozen"):
        settings.quotas["openai/gpt-4o"].limit_tpm = 1  # type: ignore[misc]


def test_the_example_configures_a_quota() -> None:
    example = load_settings(ROOT / "examples" / "collector.yaml")
    assert example.quotas and all(q.limit_tpm > 0 for q in example.quotas.values())
    assert example.grant_ttl_s > example.grant_interval_s


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("quotas: {openai/gpt-4o: {limit_tpm: 0}}\n", "quotas.openai/gpt-4o.limit_tpm: must be > 0"),
        ("quotas: {openai/gpt-4o: {limit_tpm: -5}}\n", "quotas.openai/gpt-4o.limit_tpm: must be > 0"),
        ("quotas: {openai/gpt-4o: {limit_tpm: .inf}}\n", "quotas.openai/gpt-4o.limit_tpm: must be > 0"),
        ("quotas: {openai/gpt-4o: {limit_tpm: .nan}}\n", "quotas.openai/gpt-4o.limit_tpm: must be > 0"),
        ("quotas: {openai/gpt-4o: {}}\n", "quotas.openai/gpt-4o.limit_tpm: Field required"),
        (
            "quotas: {openai/gpt-4o: {limit_tpm: 10, min_share_tpm: -1}}\n",
            "quotas.openai/gpt-4o.min_share_tpm: must be >= 0",
        ),
        (
            "quotas: {openai/gpt-4o: {limit_tpm: 10, min_share_tpm: 11}}\n",
            "quotas.openai/gpt-4o.min_share_tpm: must be at most limit_tpm",
        ),
        (
            "quotas: {openai/gpt-4o: {limit_tpm: 10, limit_rpm: 1}}\n",
            "quotas.openai/gpt-4o.limit_rpm: Extra inputs are not permitted",
        ),
        ("quotas: {gpt-4o: {limit_tpm: 10}}\n", "quotas: 'gpt-4o' is not named <provider>/<model>"),
        ("quotas: {/gpt-4o: {limit_tpm: 10}}\n", "quotas: '/gpt-4o' is not named <provider>/<model>"),
        ("quotas: [openai/gpt-4o]\n", "quotas: Input should be a valid dictionary"),
        ("grant_interval_s: 0\n", "grant_interval_s: must be greater than 0"),
        ("grant_interval_s: soon\n", "grant_interval_s: 'soon' is not a duration"),
        ("lease_ttl_s: 0s\n", "lease_ttl_s: must be greater than 0"),
        (
            "grant_interval_s: 5s\ngrant_ttl_s: 5s\n",
            "grant_ttl_s: must be greater than grant_interval_s",
        ),
    ],
)
def test_bad_quota_settings_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "collector.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)
