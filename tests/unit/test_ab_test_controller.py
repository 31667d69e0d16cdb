"""A/B tests (`strategy: ab_test`): the spec, the router's split and the controller on a
manual clock, fed real events through the collector's EvidenceBook."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from collector import EvidenceBook, ManualClock, RolloutController, SpecError, load_spec_text
from collector._ab_evidence import ABEvidence
from outrider.v1 import common_pb2, control_pb2
from sidecar.routing._router import Router
from tests.unit.ab_support import AGENT, VERSIONS, ab_spec, user_events

RUNNING = control_pb2.ROLLOUT_PHASE_RUNNING
PROMOTED = control_pb2.ROLLOUT_PHASE_PROMOTED
ABORTED = control_pb2.ROLLOUT_PHASE_ABORTED
ROLLED_BACK = control_pb2.ROLLOUT_PHASE_ROLLED_BACK
ERRORS_GATE = "  - {name: errors, metric: error_rate, max_increase: 0.02}\n"


class ABHarness:
    def __init__(self, spec_yaml: str, seed: int = 1) -> None:
        self.clock = ManualClock()
        self.yaml = spec_yaml
        self.spec = load_spec_text(spec_yaml, "ab.yaml")
        self.ctl = RolloutController(AGENT)
        self.book = EvidenceBook()
        self.rng = random.Random(seed)
        self.state = self.ctl.start(self.spec, spec_yaml, self.clock.now(), "test")
        self.book.sync(self.state, self.spec)

    def run(
        self,
        success: tuple[float, ...],
        users_per_second: tuple[int, ...],
        seconds: int,
        error_rate: tuple[float, ...] | None = None,
    ) -> control_pb2.RolloutState | None:
        """Traffic each second, then a look; the first state the controller publishes."""
        errors = error_rate or tuple(0.0 for _ in success)
        for _ in range(seconds):
            now = self.clock.now()
            events = [
                e
                for v, count in enumerate(users_per_second)
                for _ in range(count)
                for e in user_events(
                    self.state.rollout_id, v, now, self.rng, success=success[v], error_rate=errors[v]
                )
            ]
            self.book.add_events(events, now)
            self.clock.advance(1.0)
            evidence = self.book.get(AGENT)
            assert evidence is not None
            new = self.ctl.evaluate(evidence, self.clock.now())
            if new is not None:
                self.state = new
                self.book.sync(new, self.ctl.spec)
                return new
        return None


# -- the spec ----------------------------------------------------------------------------------


def test_ab_test_spec_variants_replace_stable_and_candidate() -> None:
    spec = load_spec_text(ab_spec(variants=3, weights=(30, 30, 40)))
    assert spec.ab is not None and spec.strategy == "ab_test"
    assert (spec.stable, spec.candidate) == (VERSIONS[0], VERSIONS[1])
    assert spec.sticky_by == "user"  # the A/B default
    assert spec.ab.weights() == [0.3, 0.3, 0.4]
    tenant = load_spec_text(ab_spec(extra="sticky_by: tenant\n"))
    assert tenant.sticky_by == "tenant"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (ab_spec(weights=(50, 40)), "variants: weights must sum to 100"),
        (
            ab_spec(variants=2).replace(f"version: {VERSIONS[1]}", f"version: {VERSIONS[0]}"),
            "variants[1].version",
        ),
        (ab_spec().replace("name: B", "name: A"), "variants[1].name: duplicate"),
        (ab_spec(extra="stable: ffffffffffff\n"), "stable: must be the control"),
        (ab_spec(extra="candidate: ffffffffffff\n"), "candidate: not used by strategy ab_test"),
        (ab_spec(extra="steps: [{weight: 5}]\n"), "steps: not used by strategy ab_test"),
        (ab_spec().replace("metric: task_success", "metric: latency"), "ab.primary.metric"),
        (
            ab_spec().replace("task_success", "judge_score").replace(", baseline: 0.85", ""),
            "ab.primary.sd: required for metric judge_score",
        ),
        (ab_spec().replace("task_success", "judge_score"), "ab.primary.baseline: not allowed"),
        (ab_spec().replace("power: 0.8", "power: 1.5"), "ab.primary.power"),
        (ab_spec().replace("analysis: fixed", "analysis: bayesian"), "ab.analysis"),
        (ab_spec().replace("on_decision: promote_winner", "on_decision: ship"), "ab.on_decision"),
        (
            ab_spec().replace("strategy: ab_test\n", "stable: 1a2b3c4d5e6f\ncandidate: 9f8e7d6c5b4a\n"),
            "ab: required",
        ),
    ],
)
def test_ab_test_spec_errors_name_the_field(text: str, field: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec_text(text, "ab.yaml")
    assert field in str(err.value)


def test_ab_test_spec_one_variant_or_six_is_refused() -> None:
    one = ab_spec().replace(f"    - {{name: B, version: {VERSIONS[1]}, weight: 50}}\n", "")
    with pytest.raises(SpecError, match=r"ab\.variants"):
        load_spec_text(one.replace("weight: 50", "weight: 99"))


# -- routing ------------------------------------------------------------------------------------


def _router_state(weights: tuple[float, ...]) -> control_pb2.RolloutState:
    ctl = RolloutController(AGENT)
    text = ab_spec(variants=len(weights), weights=weights)
    return ctl.start(load_spec_text(text), text, 100.0)


def test_ab_test_router_splits_by_weight_and_sticks_per_user() -> None:
    state = _router_state((30, 30, 40))
    router = Router(AGENT, VERSIONS[0], VERSIONS)
    assert router.apply(state)
    seen = Counter()
    for u in range(6000):
        a = router.assign(f"nonce{u}", user_id=f"user{u}")
        seen[(a.version_id, a.role)] += 1
        again = router.assign(f"other-nonce{u}", user_id=f"user{u}")  # a new session of the same user
        assert (again.version_id, again.role) == (a.version_id, a.role)
    assert set(seen) == {
        (VERSIONS[0], common_pb2.ROLE_STABLE),
        (VERSIONS[1], common_pb2.ROLE_VARIANT),
        (VERSIONS[2], common_pb2.ROLE_VARIANT),
    }
    # 6000 draws: each share within 4 standard errors (about 2.5 points) of its weight
    for version, weight in zip(VERSIONS, (0.3, 0.3, 0.4), strict=True):
        share = sum(n for (v, _), n in seen.items() if v == version) / 6000
        assert abs(share - weight) < 4 * (weight * (1 - weight) / 6000) ** 0.5


def test_ab_test_router_without_a_variant_serves_the_config_stable() -> None:
    state = _router_state((30, 30, 40))
    router = Router(AGENT, VERSIONS[0], VERSIONS[:2])  # lacks C
    router.apply(state)
    assert {router.assign(f"n{u}", user_id=f"u{u}").version_id for u in range(200)} == {VERSIONS[0]}
    assert router.unknown_version_states == 1


# -- the controller ---------------------------------------------------------------------------


def test_ab_test_fixed_finds_the_winner_and_promotes_it() -> None:
    h = ABHarness(ab_spec(gates=ERRORS_GATE))
    planned = h.state.ab.planned_units
    assert h.state.strategy == control_pb2.ROLLOUT_STRATEGY_AB_TEST and planned > 0
    assert "fixed horizon" in h.state.reason and "sequential cap" in h.state.reason
    new = h.run((0.85, 0.93), (40, 40), seconds=200)
    assert new is not None and new.phase == PROMOTED, new
    assert new.candidate_version_id == VERSIONS[1]
    assert new.ab.verdict == "winner" and new.ab.winner == "B"
    (cmp,) = new.ab.comparisons
    assert cmp.significant and cmp.lower < cmp.effect < cmp.upper and cmp.p_value < 0.05
    assert min(v.samples for v in new.ab.variants) >= planned
    # the router's PROMOTED path serves the winner
    router = Router(AGENT, VERSIONS[0], VERSIONS)
    router.apply(new)
    assert router.assign("n", user_id="anyone").version_id == VERSIONS[1]


def test_ab_test_fixed_no_winner_keeps_the_control() -> None:
    h = ABHarness(ab_spec(variants=3), seed=3)
    new = h.run((0.85, 0.85, 0.85), (40, 40, 40), seconds=400)
    assert new is not None and new.phase == ABORTED, new
    assert new.ab.verdict == "no_winner" and not new.ab.winner
    assert "no winner" in new.reason and "the control stays" in new.reason
    assert len(new.ab.comparisons) == 3
    retired = {e.version_id for e in new.retired}
    assert retired == {VERSIONS[1], VERSIONS[2]}  # both variants drain
    router = Router(AGENT, VERSIONS[0], VERSIONS)
    router.apply(new)
    assert router.assign("n", user_id="anyone").version_id == VERSIONS[0]


def test_ab_test_sequential_stops_early_and_reports_only() -> None:
    h = ABHarness(ab_spec(analysis="sequential", on_decision="report"))
    new = h.run((0.80, 0.95), (20, 20), seconds=400)
    assert new is not None and new.phase == ABORTED, new
    assert "winner B, report only" in new.reason
    assert new.ab.winner == "B" and new.ab.method == "sequential"
    (cmp,) = new.ab.comparisons
    assert cmp.e_value >= 1 / 0.05 and cmp.significant
    # stopped before the sequential cap
    assert max(v.samples for v in new.ab.variants) < new.ab.planned_units


def test_ab_test_sample_ratio_mismatch_stops_the_test() -> None:
    h = ABHarness(ab_spec(analysis="sequential"))
    new = h.run((0.85, 0.85), (30, 20), seconds=100)
    assert new is not None and new.phase == ABORTED, new
    assert "sample ratio mismatch" in new.reason
    assert new.ab.verdict == "sample_ratio_mismatch" and new.ab.srm_p_value < 0.001


def test_ab_test_guardrail_harm_blocks_the_winner() -> None:
    """C is best on task success but errs: it is reported and cannot win; B still can."""
    h = ABHarness(ab_spec(variants=3, gates=ERRORS_GATE), seed=5)
    new = h.run((0.80, 0.92, 0.97), (40, 40, 40), seconds=400, error_rate=(0.0, 0.0, 0.2))
    assert new is not None, h.ctl.ab_analysis
    by_name = {v.name: v for v in new.ab.variants}
    assert "errors" in by_name["C"].guardrails_failed  # and the error-rate trigger
    assert not by_name["B"].guardrails_failed
    assert new.ab.winner != "C"
    assert any(r.name == "errors[C]" and r.verdict == "harm" for r in new.gate_results)


def test_ab_test_every_variant_harmed_rolls_back() -> None:
    h = ABHarness(ab_spec(gates=ERRORS_GATE))
    new = h.run((0.85, 0.95), (40, 40), seconds=300, error_rate=(0.0, 0.3))
    assert new is not None and new.phase == ROLLED_BACK, new
    assert "every variant failed a guardrail" in new.reason
    assert [e.version_id for e in new.retired] == [VERSIONS[1]]


def test_ab_test_evidence_survives_a_checkpoint() -> None:
    h = ABHarness(ab_spec(variants=3))
    h.run((0.85, 0.85, 0.85), (5, 5, 5), seconds=3)
    before = h.book.get(AGENT)
    assert isinstance(before, ABEvidence)
    restored = EvidenceBook()
    restored.load_state(h.book.to_state())
    after = restored.get(AGENT)
    assert isinstance(after, ABEvidence)
    assert after.units() == before.units() == [15, 15, 15]
    assert after.variant_stats("task_success") == before.variant_stats("task_success")


# -- status, record, simulate CLI ---------------------------------------------------------------


def test_ab_test_status_and_record_show_the_analysis() -> None:
    from collector._deployments import build_record
    from devstack._history_cli import show_lines
    from devstack._status import render_status, status_view
    from outrider.v1 import admin_pb2

    h = ABHarness(ab_spec(gates=ERRORS_GATE))
    new = h.run((0.85, 0.93), (40, 40), seconds=200)
    assert new is not None and new.phase == PROMOTED
    status = admin_pb2.RolloutStatus(
        state=new, timeline=h.ctl.timeline, now_unix_nano=new.decided_at_unix_nano
    )
    text = "\n".join(render_status(status))
    assert "A/B test of 2 variants" in text and "winner B" in text
    assert f"control     A    {VERSIONS[0]}" in text and f"variant     B    {VERSIONS[1]}" in text
    assert "compare     A - B:" in text and "significant" in text
    assert status_view(status)["ab"]["winner"] == "B"
    record = build_record(new, h.ctl.timeline, 0.0, h.clock.now())
    assert record.ab.winner == "B" and len(record.ab.variants) == 2
    assert any(line.startswith("a/b test    task_success, fixed: winner B") for line in show_lines(record))


def test_ab_test_simulate_cli_per_variant_effects(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from devstack.cli import main

    spec = tmp_path / "ab.yaml"
    spec.write_text(ab_spec(analysis="fixed"))
    args = ["rollout", "simulate", str(spec), "--variants", "3", "--runs", "20", "--calls-per-second", "5"]
    result = CliRunner().invoke(main, [*args, "--effect", "B:task_success=+0.1"])
    assert result.exit_code == 0, result.output
    assert "A/B tests of A, B, C on task_success" in result.output
    assert "the right winner (B)" in result.output and "sequential cap" in result.output
    bad = CliRunner().invoke(main, [*args, "--effect", "D:task_success=+0.1"])
    assert bad.exit_code != 0 and "no variant 'D'" in bad.output
    bare = CliRunner().invoke(main, [*args, "--effect", "task_success=+0.1"])
    assert bare.exit_code != 0 and "name the variant" in bare.output


def test_ab_test_readme_simulate_line_runs_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    import shlex

    from click.testing import CliRunner

    from devstack.cli import main

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    text = (root / "README.md").read_text(encoding="utf-8")
    start = text.index("\n### A/B test\n")
    section = text[start : text.index("\n## ", start)]
    (line,) = [ln for ln in section.splitlines() if ln.startswith(".venv/bin/outrider rollout simulate ")]
    result = CliRunner().invoke(main, shlex.split(line)[1:], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "A/B tests of A, B, C on task_success (fixed" in result.output
    assert "the right winner (B)" in result.output
    assert load_spec_text((root / "examples/ab-test.yaml").read_text()).ab is not None


def test_ab_test_past_max_duration_ends_with_no_winner() -> None:
    h = ABHarness(ab_spec().replace("max_duration: 1d", "max_duration: 20s"))
    new = h.run((0.85, 0.85), (5, 5), seconds=60)  # far below the planned sample
    assert new is not None and new.phase == ABORTED, new
    assert "no winner" in new.reason and "max_duration 20s passed" in new.reason
    # the absolute triggers watch each variant as guardrails do
    assert any(r.name == "trigger:error_rate[B]" for r in new.gate_results)


def test_ab_test_operator_promote_is_refused_and_time_scale_scales_max_duration() -> None:
    from collector._errors import WrongPhase

    h = ABHarness(ab_spec())
    with pytest.raises(WrongPhase, match="A/B test"):
        h.ctl.propose_promote("ship B", h.clock.now(), "op")
    scaled = load_spec_text(ab_spec(extra="time_scale: 0.001\n"))
    assert scaled.ab is not None and scaled.ab.max_duration == pytest.approx(86.4)


def test_ab_test_start_requires_every_variant_known() -> None:
    from types import SimpleNamespace

    from collector._errors import UnknownVersion
    from collector._registry import RegistryView
    from collector._sightings import VersionSightings

    known = {VERSIONS[0], VERSIONS[1]}  # C is neither pushed nor reported
    view = SimpleNamespace(
        get=lambda agent, v: object() if v in known else None, _sightings=VersionSightings()
    )
    with pytest.raises(UnknownVersion, match=f"variant C version {VERSIONS[2]}"):
        RegistryView.require(view, load_spec_text(ab_spec(variants=3)))  # type: ignore[arg-type]


def test_ab_test_plan_cli_shows_both_sample_sizes(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from devstack.cli import main

    spec = tmp_path / "ab.yaml"
    spec.write_text(ab_spec(variants=3))
    result = CliRunner().invoke(main, ["rollout", "plan", str(spec), "--calls-per-second", "10"])
    assert result.exit_code == 0, result.output
    fixed = next(ln for ln in result.output.splitlines() if ln.startswith("fixed horizon"))
    sequential = next(ln for ln in result.output.splitlines() if ln.startswith("sequential"))
    assert fixed.split()[2] != sequential.split()[2]  # the fixed n and the sequential cap differ
    assert "expected" in sequential and "this test         fixed" in result.output


def test_ab_test_srm_checks_agree_with_scipy_and_stay_quiet_on_a_fair_split() -> None:
    import numpy as np

    from collector._ab_phase import srm_e_value, srm_p_value
    from collector.stats import sample_ratio_mismatch

    for units in ([50, 61], [50, 60, 71], [10, 20, 30, 25], [100, 120, 90, 110, 80]):
        weights = [1 / len(units)] * len(units)
        assert srm_p_value(units, weights) == pytest.approx(sample_ratio_mismatch(units, weights).p_value)
    # a fair 30/30/40 split looked at every 50 users up to 50,000: the e-value never reaches 1000
    rng = np.random.default_rng(7)
    weights = [0.3, 0.3, 0.4]
    counts = np.cumsum(rng.multinomial(1, weights, size=50_000), axis=0)[49::50]
    assert max(srm_e_value(c.tolist(), weights) for c in counts) < 1000
    # a broken 35/25/40 one reaches it well before that
    broken = np.cumsum(rng.multinomial(1, [0.35, 0.25, 0.4], size=5_000), axis=0)[-1]
    assert srm_e_value(broken.tolist(), weights) >= 1000
