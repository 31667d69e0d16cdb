"""Rollout specs and collector settings: valid files load, bad ones name the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

import collector
from collector import CollectorSettings, SpecError, load_settings, load_spec_file, load_spec_text

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
agent: support-bot
stable: 1a2b3c4d5e6f
candidate: 9f8e7d6c5b4a
steps:
  - {weight: 5, min_duration: 500ms, min_samples: 50}
  - {weight: 25, min_duration: 1m, min_samples: 200}
  - {weight: 100, min_duration: 1h}
gates:
  - {name: errors, metric: error_rate, max_increase: 0.05, window: 1m, min_samples: 20}
  - {name: latency, metric: latency_p95_ms, max_ratio: 1.5, window: 30, on_failure: hold}
"""


def test_public_surface() -> None:
    assert sorted(collector.__all__) == sorted(
        [
            "Clock",
            "Collector",
            "CollectorSettings",
            "EvidenceBook",
            "Gate",
            "Ingest",
            "ManualClock",
            "NoRollout",
            "PublishError",
            "RollingWindows",
            "RolloutConflict",
            "RolloutController",
            "RolloutEvidence",
            "RolloutError",
            "RolloutFinished",
            "RolloutSpec",
            "Rows",
            "Shadow",
            "ShadowEvidence",
            "ShadowGate",
            "ShadowRows",
            "SpecError",
            "Step",
            "SystemClock",
            "Trigger",
            "WindowStats",
            "WrongPhase",
            "load_settings",
            "load_spec_file",
            "load_spec_text",
            "run",
        ]
    )


def test_example_spec_loads() -> None:
    spec = load_spec_file(ROOT / "examples" / "rollout.yaml")
    assert spec.agent == "support-bot"
    assert [s.weight for s in spec.steps] == [5, 25, 50]
    assert [s.min_duration for s in spec.steps] == [60.0, 300.0, 600.0]
    assert [s.min_samples for s in spec.steps] == [100, 1000, 0]
    assert spec.steps[-1].max_duration == 24 * 3600.0  # the last stage confirms, then NO_DATA
    assert (spec.alpha, spec.look_interval, spec.sticky_by) == (0.02, 30.0, "session")
    # every gate of the design but quality, with the margins of the issue
    assert {g.metric: g.limit for g in spec.gates} == {
        "task_failure_rate": 0.025,
        "error_rate": 0.01,
        "latency_p95_ms": 1.10,
        "cost_per_call": 1.125,
        "thumbs_down_rate": 0.025,
        "safety_event_rate": 0.0,
    }
    assert all(g.on_failure == "rollback" for g in spec.gates)
    # the triggers keep the design's defaults
    t = spec.triggers
    assert (t.error_rate.limit, t.error_rate.window, t.error_rate.action) == (0.02, 300.0, "rollback")
    assert (t.latency_p99_ms.limit, t.latency_p99_ms.consecutive) == (10_000.0, 3)
    assert (t.cost_ratio.limit, t.cost_ratio.window, t.cost_ratio.action) == (3.0, 3600.0, "hold")
    assert (t.judge_drop.limit, t.judge_drop.action) == (0.10, "rollback")


def test_good_spec_parses_durations_and_defaults() -> None:
    spec = load_spec_text(GOOD, "rollout.yaml")
    assert [s.min_duration for s in spec.steps] == [0.5, 60.0, 3600.0]
    assert spec.steps[2].min_samples == 0
    assert spec.sticky_by == "session"
    assert spec.gates[1].window == 30.0 and spec.gates[1].on_failure == "hold"
    assert spec.gates[0].on_failure == "rollback"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("weight: 25,", "weight: 0,", "rollout.yaml: steps[1].weight: must be in (0, 100]"),
        ("weight: 100,", "weight: 101,", "rollout.yaml: steps[2].weight: must be in (0, 100]"),
        ("weight: 25,", "weight: 4,", "rollout.yaml: steps[1].weight: must be greater than the previous"),
        (
            "min_duration: 1m,",
            "min_duration: soon,",
            "rollout.yaml: steps[1].min_duration: 'soon' is not a duration",
        ),
        ("min_samples: 50", "min_samples: -1", "rollout.yaml: steps[0].min_samples:"),
        (
            "candidate: 9f8e7d6c5b4a",
            "candidate: 1a2b3c4d5e6f",
            "rollout.yaml: candidate: must differ from stable",
        ),
        ("name: latency", "name: errors", "rollout.yaml: gates[1].name: duplicate gate name 'errors'"),
        (
            "max_increase: 0.05",
            "max_ratio: 2",
            "rollout.yaml: gates[0].max_increase: required for metric error_rate",
        ),
        ("max_ratio: 1.5", "max_ratio: 0.9", "rollout.yaml: gates[1].max_ratio: Input should be greater"),
        ("max_increase: 0.05", "max_increase: 0", "rollout.yaml: gates[0].max_increase: Input should be"),
        (
            "on_failure: hold",
            "on_failure: hold, max_decrease: 0.1",
            "rollout.yaml: gates[1].max_decrease: not allowed for metric latency_p95_ms",
        ),
        (
            "metric: error_rate, max_increase: 0.05",
            "metric: judge_score, max_increase: 0.05",
            "rollout.yaml: gates[0].max_decrease: required for metric judge_score",
        ),
        (
            "min_duration: 1h}",
            "min_duration: 1h, max_duration: 30m}",
            "rollout.yaml: steps[2].max_duration: must be at least min_duration",
        ),
        ("agent: support-bot", "agent: support-bot\nalpha: 0.5", "rollout.yaml: alpha: Input should be less"),
        ("agent: support-bot", "agent: support-bot\nholdback: 0", "rollout.yaml: holdback: Input should be"),
        (
            "agent: support-bot",
            "agent: support-bot\ntriggers: {error_rate: {limit: 0}}",
            "rollout.yaml: triggers.error_rate.limit: Input should be greater than 0",
        ),
        (
            "max_ratio: 1.5",
            "max_ratio: 1.5, max_increase: 0.1",
            "rollout.yaml: gates[1].max_increase: not allowed for metric latency_p95_ms",
        ),
        ("metric: error_rate", "metric: p99", "rollout.yaml: gates[0].metric:"),
        ("window: 30,", "window: 0s,", "rollout.yaml: gates[1].window: must be longer than 0s"),
        ("on_failure: hold", "on_failure: panic", "rollout.yaml: gates[1].on_failure:"),
        (
            "agent: support-bot",
            "agent: support-bot\ncolour: red",
            "rollout.yaml: colour: Extra inputs are not permitted",
        ),
        ("agent: support-bot\n", "", "rollout.yaml: agent: Field required"),
        ("stable: 1a2b3c4d5e6f", "stable: 'has space'", "rollout.yaml: stable: String should match pattern"),
    ],
)
def test_bad_spec_names_file_and_field(old: str, new: str, expected: str) -> None:
    assert old in GOOD
    with pytest.raises(SpecError) as info:
        load_spec_text(GOOD.replace(old, new, 1), "rollout.yaml")
    assert str(info.value).startswith(expected), str(info.value)
    assert info.value.source == "rollout.yaml"


def test_empty_steps_and_bad_yaml() -> None:
    with pytest.raises(
        SpecError, match=r"^r.yaml: steps: at least one step is required \(or a shadow phase\)"
    ):
        load_spec_text("agent: a\nstable: a1\ncandidate: b2\nsteps: []\n", "r.yaml")
    with pytest.raises(SpecError, match=r"^r.yaml: not valid YAML at line 1"):
        load_spec_text("agent: [", "r.yaml")
    with pytest.raises(SpecError, match=r"^r.yaml: expected a mapping at the top level"):
        load_spec_text("- 1\n- 2\n", "r.yaml")


def test_every_problem_is_reported() -> None:
    with pytest.raises(SpecError) as info:
        load_spec_text(
            GOOD.replace("weight: 25,", "weight: 0,").replace("metric: error_rate", "metric: x"), "s"
        )
    assert len(info.value.problems) == 2


def test_spec_file_errors_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "rollout.yaml"
    path.write_text(GOOD.replace("weight: 25,", "weight: 200,"))
    with pytest.raises(SpecError, match=rf"^{path}: steps\[1\].weight"):
        load_spec_file(path)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec_file(tmp_path / "missing.yaml")


def test_settings_defaults_file_and_overrides(tmp_path: Path) -> None:
    assert load_settings(None) == CollectorSettings()
    example = load_settings(ROOT / "examples" / "collector.yaml", kafka_bootstrap="127.0.0.1:1234")
    assert example.kafka_bootstrap == "127.0.0.1:1234"
    assert example.retention_s == 900.0 and example.tick_interval_s == 1.0
    path = tmp_path / "c.yaml"
    path.write_text("tick_interval_s: 200ms\nmetrics_port: 0\n")
    settings = load_settings(path)
    assert settings.tick_interval_s == 0.2 and settings.metrics_port == 0
    with pytest.raises(Exception, match="frozen"):
        settings.tick_interval_s = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tick_interval_s: 0\n", "tick_interval_s: must be greater than 0"),
        ("admin_listen: nowhere\n", "admin_listen: 'nowhere': expected host:port"),
        ("bucket_s: 10s\nretention_s: 5s\n", "retention_s: must be at least bucket_s"),
        ("metrics_port: 70000\n", "metrics_port:"),
        ("kafka: x\n", "kafka: Extra inputs are not permitted"),
    ],
)
def test_bad_settings_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "collector.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)
