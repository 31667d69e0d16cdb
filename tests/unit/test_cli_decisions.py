"""`outrider rollout plan` and `outrider rollout simulate`: the README's commands, word for word,
their output and their error messages, and the planner's maths."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from collector._spec import load_spec_file, load_spec_text
from collector.simulate import Traffic, plan
from collector.simulate._plan import detectable, metric_model, non_inferior, safety_detectable
from collector.stats import scale_mixture_detectable_effect
from devstack.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "rollout.yaml"
SUMMARY_KEYS = {
    "runs",
    "rolled_back",
    "promoted",
    "held",
    "undecided",
    "rolled_back_by_gate",
    "rolled_back_by_metric",
    "median_decision_s",
    "median_candidate_calls",
}


def readme_commands() -> list[str]:
    """The `.venv/bin/outrider ...` lines of the README's "How gates decide" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## How gates decide\n")
    end = text.index("\n## ", start + 1)
    return [line.strip() for line in text[start:end].splitlines() if line.startswith(".venv/bin/outrider ")]


def run_line(line: str) -> Result:
    """One README line, word for word: `.venv/bin/outrider` is the `devstack.cli:main` entry point."""
    words = shlex.split(line)
    assert words[0] == ".venv/bin/outrider"
    return CliRunner().invoke(main, words[1:], catch_exceptions=False)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(autouse=True)
def _at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository root


def test_the_readme_names_the_entry_point_it_runs() -> None:
    assert 'outrider = "devstack.cli:main"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    lines = readme_commands()
    assert [shlex.split(line)[2] for line in lines] == ["plan", "simulate"]


def test_readme_plan_command() -> None:
    (line,) = [c for c in readme_commands() if " rollout plan " in c]
    result = run_line(line)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "rollout plan for examples/rollout.yaml at 10 calls/s" in out
    assert "power 97.5%" in out
    spec = load_spec_file(EXAMPLE)
    for gate in spec.gates:
        assert any(row.split()[:2] == [gate.name, gate.metric] for row in out.splitlines()), gate.name
    rows = [row.split() for row in out.splitlines() if row[:1].isdigit()]
    assert [r[0] for r in rows] == [str(i + 1) for i in range(len(spec.steps))]
    assert "gate task (non-inferiority of an identical candidate)" in out.splitlines()[3 + len(spec.steps)]
    # the README's claim: about 2.5 h in the last stage, waiting on the task gate
    data = json.loads(invoke(*shlex.split(line)[1:], "--json").output.splitlines()[-1])
    last = data["stages"][-1]
    assert last["decided_by"].startswith("gate task")
    assert 2 * 3600 <= last["duration_s"] <= 3 * 3600


def test_readme_simulate_command() -> None:
    (line,) = [c for c in readme_commands() if " rollout simulate " in c]
    assert "--runs 20" in line  # small: this test runs it
    result = run_line(line)
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    assert out[0].startswith("simulated 20 rollouts of examples/rollout.yaml at 10 calls/s (seed 1")
    assert "candidate: error_rate=0.02" in out
    rolled = next(row for row in out if row.startswith("rolled back "))
    assert rolled.split()[2:] == ["20", "100.0%"]
    # the errors gate, or the error-rate trigger (3 % errors is past its 2 % limit too)
    by_gate = next(row for row in out if row.startswith("rolled back by gate"))
    assert "errors" in by_gate and set(by_gate.split()[4::2]) <= {"errors", "trigger:error_rate"}
    assert next(row for row in out if row.startswith("rolled back by metric")).endswith("error_rate 20")
    assert any(row.startswith("fixed horizon") for row in out)


def test_simulate_json_is_the_last_line_and_repeats_with_the_seed() -> None:
    args = (
        "rollout",
        "simulate",
        str(EXAMPLE),
        "--runs",
        "3",
        "--seed",
        "5",
        "--calls-per-second",
        "10",
        "--effect",
        "error_rate=0.1",
        "--max-virtual-time",
        "2h",
        "--json",
    )
    first, again = invoke(*args), invoke(*args, "--workers", "2")
    assert first.exit_code == 0, first.output
    data = json.loads(first.output.splitlines()[-1])
    assert set(data) >= SUMMARY_KEYS
    assert data["runs"] == 3
    assert data["rolled_back"] + data["promoted"] + data["held"] + data["undecided"] == 3
    assert data["rolled_back_by_metric"] == {"error_rate": 3}
    assert "fixed_horizon" in data and "oracle_median_candidate_calls" in data
    assert json.loads(again.output.splitlines()[-1]) == data


def test_plan_json_has_every_stage_and_gate() -> None:
    result = invoke(
        "rollout",
        "plan",
        str(EXAMPLE),
        "--calls-per-second",
        "10",
        "--json",
        "--baseline",
        "task_success=0.9,feedback_share=0.5",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.splitlines()[-1])
    spec = load_spec_file(EXAMPLE)
    assert len(data["stages"]) == len(spec.steps)
    assert data["gate_alpha"] == pytest.approx(spec.test_alphas()[0])
    for stage in data["stages"]:
        assert [g["name"] for g in stage["gates"]] == [g.name for g in spec.gates]


@pytest.mark.parametrize("command", ["plan", "simulate"])
@pytest.mark.parametrize(
    ("baseline", "message"),
    [
        ("nope=1", "--baseline: unknown key 'nope' (known: error_rate,"),
        ("error_rate=abc", "--baseline: error_rate='abc' is not a number"),
        ("error_rate", "--baseline: 'error_rate' is not key=value"),
        ("error_rate=2", "--baseline: error_rate: must be in [0, 1]"),
        ("judge_sd=0.9", "--baseline: judge_sd: must be in"),
    ],
)
def test_bad_baseline_is_a_usage_error_naming_the_key(command: str, baseline: str, message: str) -> None:
    result = invoke("rollout", command, str(EXAMPLE), "--calls-per-second", "10", "--baseline", baseline)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--effect", "speed=x2"], "--effect: unknown key 'speed'"),
        (["--effect", "task_success=+0.5"], "--effect: the candidate's task_success: must be in (0, 1)"),
        (["--effect", "latency_p50_ms=xfast"], "--effect: latency_p50_ms='xfast' is not a number or xF"),
        (["--max-virtual-time", "7x"], "Invalid value for '--max-virtual-time': '7x' is not a duration"),
        (["--max-virtual-time", "0s"], "Invalid value for '--max-virtual-time': must be longer than 0s"),
        (["--runs", "0"], "Invalid value for '--runs'"),
    ],
)
def test_bad_simulate_options_name_the_option(args: list[str], message: str) -> None:
    result = invoke("rollout", "simulate", str(EXAMPLE), "--calls-per-second", "10", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize("rate", ["0", "-1", "inf", "nan"])
def test_bad_rate_names_the_option(rate: str) -> None:
    result = invoke("rollout", "plan", str(EXAMPLE), "--calls-per-second", rate)
    assert result.exit_code == 2, result.output
    assert "'--calls-per-second'" in result.output


def test_missing_rate_and_bad_spec(tmp_path: Path) -> None:
    assert "Missing option '--calls-per-second'" in invoke("rollout", "plan", str(EXAMPLE)).output
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text(encoding="utf-8").replace("max_increase: 0.01", "max_increase: 7"))
    for command in ("plan", "simulate"):
        result = invoke("rollout", command, str(bad), "--calls-per-second", "10")
        assert result.exit_code == 1
        assert str(bad) in result.output and "max_increase" in result.output


# -- the planner's maths ----------------------------------------------------------------------------

SPEC = """
agent: a
stable: s1
candidate: c1
steps:
  - {weight: 10, min_duration: 5m, min_samples: 100}
  - {weight: 100, min_duration: 10m}
gates:
  - {name: latency, metric: latency_p95_ms, max_ratio: 1.1}
  - {name: errors, metric: error_rate, max_increase: 0.01}
  - {name: quality, metric: judge_score, max_decrease: 0.05}
  - {name: spend, metric: cost_per_session, max_ratio: 1.2}
  - {name: safety, metric: safety_event_rate}
"""


def test_plan_stages_weights_and_accumulating_power() -> None:
    spec = load_spec_text(SPEC)
    result = plan(spec, 20.0)
    first, last = result.stages
    assert first.effective_weight == 0.1 and last.effective_weight == pytest.approx(0.95)  # holdback 5 %
    assert first.duration_s == 300 and first.decided_by.startswith("min_duration")
    assert last.final and last.duration_s is not None and last.ends_at_s == 300 + last.duration_s
    assert first.judge_scores_per_hour == pytest.approx((20 * 3600 * 0.1 * 0.9, 20 * 3600 * 0.1 * 0.1))
    for a, b in zip(first.gates, last.gates, strict=True):
        assert a.detectable is not None and b.detectable is not None
        assert b.detectable < a.detectable  # evidence accumulates over the stages
        assert b.candidate_samples > a.candidate_samples


def test_the_last_stage_ends_when_the_slowest_gate_is_non_inferior() -> None:
    spec = load_spec_text(SPEC)
    result = plan(spec, 20.0)
    last = result.stages[-1]
    slowest = last.decided_by.split()[1]
    gate = next(g for g in last.gates if g.name == slowest)
    assert gate.detectable is not None and gate.margin is not None
    # at the decision the limiting gate detects about its margin (the non-inferiority bound mirrors it)
    scale = math.log if gate.unit == "ratio" else (lambda x: x)
    assert scale(gate.detectable) == pytest.approx(scale(gate.margin), rel=0.05)
    assert all(
        g.detectable is not None and (g.margin is None or g.detectable <= g.margin * 1.01)
        for g in last.gates
        if g.unit != "ratio"
    )


def test_mean_gate_matches_the_library_bound() -> None:
    traffic = Traffic(latency_sigma=0.4)
    model = metric_model("latency_p95_ms", traffic)
    strata = [(1000.0, 0.05), (4000.0, 0.5)]
    weight = 1000 * 0.05 * 0.95 + 4000 * 0.25
    expected = scale_mixture_detectable_effect(0.16 / weight, math.log(1.1), 0.004, 0.975)
    assert detectable(model, strata, math.log(1.1), 0.004, 0.975) == pytest.approx(expected)


def test_proportion_bound_reduces_to_p_times_1_minus_p_without_an_effect() -> None:
    traffic = Traffic(error_rate=0.05, session_effect_sd=0.0)
    model = metric_model("error_rate", traffic)
    strata = [(10_000.0, 0.5)]
    margin = 0.01
    v = 0.05 * 0.95 * (1 / 5000 + 1 / 5000)
    bound = scale_mixture_detectable_effect(v, margin, 0.003, 0.975)
    assert non_inferior(model, [(10_000.0 * (bound / margin) ** 2 * 1.05, 0.5)], margin, 0.003, 0.975)
    assert not non_inferior(model, [(10_000.0 * (bound / margin) ** 2 * 0.95, 0.5)], margin, 0.003, 0.975)
    harm = detectable(model, strata, margin, 0.003, 0.975)
    assert harm is not None and harm >= bound  # a regression raises the pooled rate the gate sees


def test_safety_detectable_is_deterministic_and_shrinks_with_calls() -> None:
    few = safety_detectable(0.0, [(2000.0, 0.05)], 0.003, 0.975)
    many = safety_detectable(0.0, [(2000.0, 0.05), (40_000.0, 0.5)], 0.003, 0.975)
    assert few is not None and many is not None and many < few
    assert safety_detectable(0.0, [(2000.0, 0.05)], 0.003, 0.975) == few
    # stable had events too: an increase needs more than when it had none
    base = safety_detectable(0.001, [(2000.0, 0.05), (40_000.0, 0.5)], 0.003, 0.975)
    assert base is not None and base > many


def test_a_gate_without_data_never_decides() -> None:
    spec = load_spec_text(SPEC)
    result = plan(spec, 20.0, Traffic(judge_share=0.0))
    last = result.stages[-1]
    assert last.duration_s is None and last.ends_at_s is None
    assert last.decided_by.startswith("gate quality")
    assert next(g for g in last.gates if g.name == "quality").detectable is None
