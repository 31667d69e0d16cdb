"""The `shadow:` phase of a rollout spec: defaults, limits per metric, errors naming the field."""

from __future__ import annotations

import pytest

from collector import SpecError, load_spec_text

HEAD = "agent: a\nstable: s1\ncandidate: c1\n"
STEPS = "steps:\n  - {weight: 10}\n"


def test_shadow_defaults_and_a_pure_shadow_run() -> None:
    spec = load_spec_text(HEAD + "shadow: {}\n", "r.yaml")
    assert spec.shadow is not None
    assert (spec.shadow.sample, spec.shadow.min_pairs, spec.shadow.max_duration) == (100.0, 200, None)
    assert spec.steps == [] and spec.shadow_only
    assert spec.effective_weight(0) == 0.0
    assert not load_spec_text(HEAD + "shadow: {}\n" + STEPS).shadow_only


def test_shadow_gates_parse_with_their_limit() -> None:
    spec = load_spec_text(
        HEAD
        + STEPS
        + """shadow:
  sample: 20
  min_duration: 10m
  min_pairs: 500
  max_duration: 6h
  gates:
    - {name: tools, metric: tool_agreement, min: 0.9}
    - {name: text, metric: text_similarity, min: 0.6}
    - {name: quality, metric: judge_score, max_decrease: 0.05}
    - {name: preferred, metric: judge_preference, max_increase: 0.1, on_failure: hold}
    - {name: errors, metric: shadow_error_rate, max_increase: 0.02}
    - {name: slower, metric: latency_ratio, max_ratio: 1.3}
    - {name: dearer, metric: cost_ratio, max_ratio: 1.5}
"""
    )
    shadow = spec.shadow
    assert shadow is not None
    assert (shadow.sample, shadow.min_duration, shadow.min_pairs, shadow.max_duration) == (
        20,
        600,
        500,
        21600,
    )
    assert [g.limit for g in shadow.gates] == [0.9, 0.6, 0.05, 0.1, 0.02, 1.3, 1.5]
    assert shadow.gates[3].on_failure == "hold"


def test_shadow_gates_share_the_family_alpha_with_canary_gates() -> None:
    gates = "gates:\n  - {name: e, metric: error_rate, max_increase: 0.01}\n"
    shadow = "shadow:\n  gates:\n    - {name: t, metric: tool_agreement, min: 0.9}\n"
    without = load_spec_text(HEAD + STEPS + gates).test_alphas()
    with_shadow = load_spec_text(HEAD + STEPS + gates + shadow).test_alphas()
    assert with_shadow[0] == pytest.approx(without[0] / 2)  # Bonferroni over 2 gates now
    assert with_shadow[1] == pytest.approx(without[1])


@pytest.mark.parametrize(
    ("shadow", "expected"),
    [
        ("{sample: 0}", "r.yaml: shadow.sample: Input should be greater than 0"),
        ("{sample: 101}", "r.yaml: shadow.sample: Input should be less than or equal to 100"),
        ("{min_pairs: -1}", "r.yaml: shadow.min_pairs: Input should be greater than or equal to 0"),
        (
            "{min_duration: 1h, max_duration: 1m}",
            "r.yaml: shadow.max_duration: must be at least min_duration",
        ),
        ("{gates: [{name: t, metric: tool_agreement}]}", "r.yaml: shadow.gates[0].min: required for metric"),
        (
            "{gates: [{name: t, metric: tool_agreement, min: 0.9, max_ratio: 2}]}",
            "r.yaml: shadow.gates[0].max_ratio: not allowed for metric tool_agreement (use min)",
        ),
        (
            "{gates: [{name: t, metric: tool_agreement, min: 1.5}]}",
            "r.yaml: shadow.gates[0].min: Input should be less",
        ),
        (
            "{gates: [{name: q, metric: judge_score, min: 0.5}]}",
            "r.yaml: shadow.gates[0].max_decrease: required",
        ),
        (
            "{gates: [{name: x, metric: nonsense, min: 0.5}]}",
            "r.yaml: shadow.gates[0].metric: Input should be",
        ),
        ("{bogus: 1}", "r.yaml: shadow.bogus: Extra inputs are not permitted"),
    ],
)
def test_shadow_errors_name_the_field(shadow: str, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec_text(HEAD + STEPS + f"shadow: {shadow}\n", "r.yaml")
    assert str(info.value).startswith(expected), str(info.value)


def test_shadow_gate_names_are_unique_across_both_kinds() -> None:
    text = (
        HEAD
        + STEPS
        + "gates:\n  - {name: q, metric: error_rate, max_increase: 0.01}\n"
        + "shadow:\n  gates:\n    - {name: q, metric: tool_agreement, min: 0.9}\n"
    )
    with pytest.raises(SpecError, match=r"shadow.gates\[0\].name: duplicate gate name 'q'"):
        load_spec_text(text, "r.yaml")


def test_steps_are_required_without_shadow() -> None:
    with pytest.raises(SpecError, match=r"steps: at least one step is required \(or a shadow phase\)"):
        load_spec_text(HEAD, "r.yaml")


def test_shadow_example_loads_and_plans() -> None:
    from pathlib import Path

    from collector import load_spec_file
    from collector.simulate import plan

    spec = load_spec_file(Path(__file__).resolve().parents[2] / "examples" / "shadow-rollout.yaml")
    assert spec.shadow is not None and len(spec.shadow.gates) == 4 and len(spec.steps) == 3
    shadow = plan(spec, 10.0).shadow
    assert shadow is not None and shadow.duration_s is not None
    # the judge gates wait for judged pairs: a tenth of the pairs with the default judge_share
    quality = next(g for g in shadow.gates if g.name == "judge")
    assert quality.pairs is not None and shadow.duration_s >= quality.pairs / (shadow.pairs_per_second * 0.1)
