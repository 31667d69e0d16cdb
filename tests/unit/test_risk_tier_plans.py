"""Risk tiers (collector._risk): each tier's default plan, how a spec's own fields override it,
`time_scale`, and `outrider rollout plan --risk` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from collector import SpecError, load_spec_text
from collector._risk import (
    MAX_DURATION_FACTOR,
    RISK_TIERS,
    TIER_MIN_SAMPLES,
    TIER_SHADOW_SAMPLE,
    apply_risk,
)
from collector._shadow_spec import DEFAULT_MIN_PAIRS
from collector.simulate import format_plan, plan
from devstack._simulate_cli import rollout_plan
from devstack.cli import main

HEAD = "agent: a\nstable: s1\ncandidate: c1\n"
H = 3600.0
D = 86400.0
MEDIUM = [(1, 4 * H), (5, 8 * H), (25, 24 * H), (50, 24 * H), (100, 4 * H)]
# the table: (shadow minimum or None, [(weight, minimum duration)])
EXPECTED: dict[str, tuple[float | None, list[tuple[float, float]]]] = {
    "low": (None, [(1, 4 * H), (25, 4 * H), (100, 4 * H)]),
    "medium": (4 * D, MEDIUM),
    "high": (6 * D, MEDIUM),
    "critical": (14 * D, [(1, 2 * D), (5, 4 * D), (25, 7 * D), (50, 7 * D), (100, 7 * D)]),
}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("tier", RISK_TIERS)
def test_risk_tier_default_plan(tier: str) -> None:
    shadow_s, stages = EXPECTED[tier]
    spec = load_spec_text(HEAD + f"risk: {tier}\n", "r.yaml")
    assert spec.risk == tier and spec.time_scale == 1.0 and not spec.scaled
    assert [(s.weight, s.min_duration) for s in spec.steps] == stages
    assert [s.max_duration for s in spec.steps] == [3 * d for _, d in stages]
    assert all(s.min_samples == TIER_MIN_SAMPLES for s in spec.steps)
    # the 100 % stage is the confirmation stage, at 100 - holdback %
    assert spec.steps[-1].weight == 100 and spec.effective_weight(len(stages) - 1) == pytest.approx(0.95)
    if shadow_s is None:
        assert spec.shadow is None
        return
    assert spec.shadow is not None and not spec.shadow_only
    assert spec.shadow.min_duration == shadow_s
    assert spec.shadow.max_duration == MAX_DURATION_FACTOR * shadow_s
    assert (spec.shadow.sample, spec.shadow.min_pairs) == (TIER_SHADOW_SAMPLE, DEFAULT_MIN_PAIRS)
    gates = {(g.name, g.metric, g.limit) for g in spec.shadow.gates}
    assert gates == {("tools", "tool_agreement", 0.9), ("shadow_errors", "shadow_error_rate", 0.01)}
    # the shadow gates take their share of alpha
    assert spec.test_alphas()[0] == pytest.approx(spec.alpha * 0.9 / 2)


def test_risk_tier_absent_changes_nothing() -> None:
    spec = load_spec_text(HEAD + "steps:\n  - {weight: 10, min_duration: 1h}\n")
    assert spec.risk is None and spec.time_scale == 1.0 and spec.shadow is None
    assert [(s.weight, s.min_duration, s.max_duration, s.min_samples) for s in spec.steps] == [
        (10, H, None, 0)
    ]
    with pytest.raises(SpecError, match="steps: at least one step is required"):
        load_spec_text(HEAD)


def test_risk_tier_spec_steps_replace_the_tiers_whole() -> None:
    spec = load_spec_text(
        HEAD + "risk: high\nsteps:\n  - {weight: 10, min_duration: 1h}\n  - {weight: 100}\n"
    )
    assert [(s.weight, s.min_duration, s.max_duration, s.min_samples) for s in spec.steps] == [
        (10, H, None, 0),
        (100, 0.0, None, 0),
    ]
    assert spec.shadow is not None and spec.shadow.min_duration == 6 * D  # the tier's shadow stays


def test_risk_tier_shadow_merges_field_by_field() -> None:
    spec = load_spec_text(HEAD + "risk: medium\nshadow: {sample: 25}\n")
    assert spec.shadow is not None
    assert (spec.shadow.sample, spec.shadow.min_duration, spec.shadow.max_duration) == (25, 4 * D, 12 * D)
    assert [g.name for g in spec.shadow.gates] == ["tools", "shadow_errors"]
    # a longer minimum than the tier's maximum: the maximum follows at 3x
    longer = load_spec_text(HEAD + "risk: medium\nshadow: {min_duration: 20d}\n").shadow
    assert longer is not None and (longer.min_duration, longer.max_duration) == (20 * D, 60 * D)
    shorter = load_spec_text(HEAD + "risk: medium\nshadow: {min_duration: 1d}\n").shadow
    assert shorter is not None and (shorter.min_duration, shorter.max_duration) == (D, 12 * D)
    quality = "    - {name: quality, metric: judge_score, max_decrease: 0.05}\n"
    gates = load_spec_text(HEAD + "risk: critical\nshadow:\n  gates:\n" + quality).shadow
    assert gates is not None and [g.name for g in gates.gates] == ["quality"] and gates.min_duration == 14 * D


def test_risk_tier_shadow_null_and_pure_shadow() -> None:
    none = load_spec_text(HEAD + "risk: high\nshadow: null\n")
    assert none.shadow is None and len(none.steps) == 5
    pure = load_spec_text(HEAD + "risk: high\nsteps: []\n")
    assert pure.shadow_only and pure.shadow is not None and pure.shadow.min_duration == 6 * D
    with pytest.raises(SpecError, match="steps: at least one step is required"):
        load_spec_text(HEAD + "risk: low\nsteps: []\n")


def test_risk_tier_low_uses_a_spec_shadow_as_written() -> None:
    spec = load_spec_text(HEAD + "risk: low\nshadow: {min_duration: 1h}\n")
    assert spec.shadow is not None
    assert (spec.shadow.sample, spec.shadow.max_duration, spec.shadow.gates) == (100.0, None, [])
    assert len(spec.steps) == 3


@pytest.mark.parametrize("bad", ["extreme", "LOW", "1", "[low]"])
def test_risk_tier_bad_tier_names_the_field(bad: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec_text(HEAD + f"risk: {bad}\n", "r.yaml")
    assert str(info.value).startswith("r.yaml: risk: ")
    assert "'low', 'medium', 'high' or 'critical'" in str(info.value)


@pytest.mark.parametrize("bad", ["0", "-1", "2", "abc", "true"])
def test_risk_tier_bad_time_scale_names_the_field(bad: str) -> None:
    with pytest.raises(SpecError, match=r"^r\.yaml: time_scale: "):
        load_spec_text(HEAD + f"risk: low\ntime_scale: {bad}\n", "r.yaml")


def test_risk_tier_bad_step_under_a_tier_still_names_the_field() -> None:
    with pytest.raises(SpecError, match=r"steps\[0\]\.min_duration: "):
        load_spec_text(HEAD + "risk: low\ntime_scale: 0.5\nsteps:\n  - {weight: 10, min_duration: soon}\n")


def test_risk_tier_time_scale_scales_every_plan_duration() -> None:
    spec = load_spec_text(HEAD + "risk: critical\ntime_scale: 0.001\nlook_interval: 1s\n")
    assert spec.time_scale == 0.001 and spec.scaled
    _, stages = EXPECTED["critical"]
    assert [s.min_duration for s in spec.steps] == pytest.approx([d * 0.001 for _, d in stages])
    assert [s.max_duration for s in spec.steps] == pytest.approx([3 * d * 0.001 for _, d in stages])
    assert spec.shadow is not None
    assert (spec.shadow.min_duration, spec.shadow.max_duration) == pytest.approx(
        (14 * D * 0.001, 42 * D * 0.001)
    )
    # not scaled: windows, intervals, sample counts
    assert spec.look_interval == 1.0 and spec.drain_timeout == 600.0
    assert spec.steps[0].min_samples == TIER_MIN_SAMPLES
    # a spec's own durations are scaled too, and strings as YAML numbers
    own = load_spec_text(
        HEAD + "time_scale: '0.5'\nsteps:\n  - {weight: 10, min_duration: 1h, max_duration: 2h}\n"
    )
    assert (own.time_scale, own.steps[0].min_duration, own.steps[0].max_duration) == (0.5, H / 2, H)


def test_risk_tier_time_scale_applies_once_to_the_raw_mapping() -> None:
    raw = {"risk": "low", "time_scale": 0.01}
    once = apply_risk(raw)
    assert raw == {"risk": "low", "time_scale": 0.01}  # the input is not changed
    assert [s["min_duration"] for s in once["steps"]] == pytest.approx([144.0] * 3)
    assert "shadow" not in once


def test_risk_tier_time_scale_is_shown_by_the_plan() -> None:
    spec = load_spec_text(HEAD + "risk: low\ntime_scale: 0.001\n")
    result = plan(spec, 10.0)
    assert (result.risk, result.time_scale) == ("low", 0.001)
    assert result.to_json()["time_scale"] == 0.001
    lines = format_plan(result, "r.yaml")
    assert lines[2] == "risk tier low: steps and shadow the spec leaves out are the tier's defaults"
    assert lines[3].startswith("*** TIME SCALE 0.001: every stage and shadow duration below is x0.001")
    plain = format_plan(plan(load_spec_text(HEAD + "steps:\n  - {weight: 10}\n"), 10.0), "r.yaml")
    assert not any("TIME SCALE" in line or "risk tier" in line for line in plain)


def test_risk_tier_cli_prints_the_default_plan() -> None:
    result = invoke("rollout", "plan", "--risk", "high")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "schedule of risk tier high"
    assert "shadow 10% mirrored: at least 6d00h and 200 pairs, NO_DATA after 18d00h" in lines
    rows = [line.split() for line in lines if line[:1].isdigit()]
    assert [r[1:5] for r in rows] == [
        ["1%", "1%", "4h00m", "12h00m"],
        ["5%", "5%", "8h00m", "1d00h"],
        ["25%", "25%", "1d00h", "3d00h"],
        ["50%", "50%", "1d00h", "3d00h"],
        ["100%", "95%", "4h00m", "12h00m"],
    ]
    assert "confirmation" in lines[-1]
    assert "TIME SCALE" not in result.output and "rollout plan for" not in result.output


def test_risk_tier_cli_sizes_the_plan_at_a_rate() -> None:
    result = invoke("rollout", "plan", "--risk", "low", "--calls-per-second", "0.5", "--json")
    assert result.exit_code == 0, result.output
    assert "rollout plan for risk tier low at 0.5 calls/s" in result.output
    data = json.loads(result.output.splitlines()[-1])
    assert data["risk"] == "low" and data["shadow"] is None
    assert [s["weight"] for s in data["stages"]] == [1, 25, 100]
    assert [s["max_duration_s"] for s in data["stages"]] == [12 * H] * 3
    # 200 requests at 1 % of 0.5 calls/s take longer than the 4 h minimum: the stage waits for them
    assert data["stages"][0]["decided_by"] == "min_samples 200"
    assert data["stages"][0]["duration_s"] > 4 * H


def test_risk_tier_cli_json_without_a_rate_and_time_scale() -> None:
    result = invoke("rollout", "plan", "--risk", "critical", "--time-scale", "0.001", "--json")
    assert result.exit_code == 0, result.output
    assert "*** TIME SCALE 0.001" in result.output.splitlines()[2]
    data = json.loads(result.output.splitlines()[-1])
    assert data["time_scale"] == 0.001 and data["risk"] == "critical"
    assert data["shadow"]["min_duration"] == pytest.approx(14 * D * 0.001)
    assert [s["min_duration"] for s in data["steps"]] == pytest.approx(
        [d * 0.001 for _, d in EXPECTED["critical"][1]]
    )


def test_risk_tier_cli_shows_a_spec_files_time_scale(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(HEAD + "risk: medium\ntime_scale: 0.001\n", encoding="utf-8")
    result = invoke("rollout", "plan", str(path), "--calls-per-second", "10")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"rollout plan for {path} at 10 calls/s"
    assert lines[2].startswith("risk tier medium") and lines[3].startswith("*** TIME SCALE 0.001")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--risk", "extreme"], "Invalid value for '--risk': 'extreme' is not one of"),
        (["--risk", "high", "--time-scale", "0"], "Invalid value for '--time-scale'"),
        (["--risk", "high", "--calls-per-second", "0"], "Invalid value for '--calls-per-second'"),
        ([], "Missing argument 'SPEC' (or --risk TIER"),
        (["--time-scale", "0.5"], "Missing argument 'SPEC'"),
    ],
)
def test_risk_tier_cli_errors_name_the_option(args: list[str], message: str) -> None:
    result = invoke("rollout", "plan", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_risk_tier_cli_refuses_a_spec_and_a_tier(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + "risk: low\n", encoding="utf-8")
    both = invoke("rollout", "plan", str(path), "--risk", "low", "--calls-per-second", "1")
    assert both.exit_code == 2 and "give SPEC or --risk TIER, not both" in both.output
    scaled = invoke("rollout", "plan", str(path), "--time-scale", "0.5", "--calls-per-second", "1")
    assert scaled.exit_code == 2 and "--time-scale goes with --risk" in scaled.output
    assert "Missing option '--calls-per-second'" in invoke("rollout", "plan", str(path)).output


def test_risk_tier_cli_choices_are_the_tiers() -> None:
    (risk,) = [p for p in rollout_plan.params if p.name == "risk"]
    assert tuple(risk.type.choices) == RISK_TIERS  # type: ignore[attr-defined]


def test_risk_tier_scaled_plan_runs_through_the_controller() -> None:
    """The controller reads the scaled stages: a low tier at 0.01 promotes in minutes, not 12 h."""
    from collector.simulate import Scenario, Traffic, run_once

    text = HEAD + "risk: low\ntime_scale: 0.01\nlook_interval: 1s\n"
    result = run_once(Scenario(text, Traffic(), Traffic(), 20.0, D), 1)
    assert result.outcome == "promoted"
    assert result.decided_s is not None and 3 * 144 <= result.decided_s < 3 * H
