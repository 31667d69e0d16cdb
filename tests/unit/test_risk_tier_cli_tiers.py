"""Every risk tier's default plan as a user gets it from the CLI: `outrider rollout plan --risk
TIER` (JSON and text) and `outrider rollout plan SPEC` of a spec that names the tier and no
steps, each against the issue's table (tests.unit.test_risk_tier_plans.EXPECTED)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector._risk import MAX_DURATION_FACTOR, RISK_TIERS, TIER_MIN_SAMPLES
from devstack.cli import main
from tests.unit.test_risk_tier_plans import EXPECTED, HEAD


def plan_json(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(main, ["rollout", "plan", *args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.output.splitlines()[-1])
    return data


@pytest.mark.parametrize("tier", RISK_TIERS)
def test_risk_tier_cli_plan_of_every_tier_is_the_table(tier: str, tmp_path: Path) -> None:
    shadow_s, stages = EXPECTED[tier]
    data = plan_json("--risk", tier)
    assert data["risk"] == tier and data["time_scale"] == 1.0
    steps = data["steps"]
    assert isinstance(steps, list)
    assert [(s["weight"], s["min_duration"]) for s in steps] == stages
    assert [s["max_duration"] for s in steps] == [MAX_DURATION_FACTOR * d for _, d in stages]
    assert {s["min_samples"] for s in steps} == {TIER_MIN_SAMPLES}
    shadow = data["shadow"]
    if shadow_s is None:
        assert shadow is None
    else:
        assert isinstance(shadow, dict) and shadow["min_duration"] == shadow_s
        assert shadow["max_duration"] == MAX_DURATION_FACTOR * shadow_s
    # a user's spec that names the tier and no steps, sized at a rate: the same stages, each
    # lasting at least its minimum
    path = tmp_path / "rollout.yaml"
    path.write_text(HEAD + f"risk: {tier}\n", encoding="utf-8")
    sized = plan_json(str(path), "--calls-per-second", "100")
    assert sized["risk"] == tier
    sized_stages = sized["stages"]
    assert isinstance(sized_stages, list)
    assert [s["weight"] for s in sized_stages] == [w for w, _ in stages]
    assert all(
        s["duration_s"] >= d and not s["no_data"] for s, (_, d) in zip(sized_stages, stages, strict=True)
    )
    assert [s["max_duration_s"] for s in sized_stages] == [MAX_DURATION_FACTOR * d for _, d in stages]
    sized_shadow = sized["shadow"]
    assert (sized_shadow is None) == (shadow_s is None)
    if isinstance(sized_shadow, dict):
        assert sized_shadow["duration_s"] >= (shadow_s or 0) and not sized_shadow["no_data"]
    text = CliRunner().invoke(main, ["rollout", "plan", "--risk", tier], catch_exceptions=False).output
    rows = [line.split() for line in text.splitlines() if line[:1].isdigit()]
    assert [float(r[1].rstrip("%")) for r in rows] == [w for w, _ in stages]
    assert rows[-1][2] == "95%" and "confirmation" in text.splitlines()[-1]
    assert ("shadow 10% mirrored" in text) == (shadow_s is not None)
