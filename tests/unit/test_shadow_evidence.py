"""The shadow evidence: pairs from real events, their figures, clustering and checkpoints; and
judge "single" verdicts, which count as scores for the canary's judge_score gate and windows."""

from __future__ import annotations

import json

import pytest

from collector import EvidenceBook, RollingWindows, ShadowEvidence
from collector._evidence import SCORE
from collector._ingest import Ingestor
from collector._metrics import CollectorMetrics
from collector._shadow_evidence import AGREE, ERR, JDELTA, LAT, PREF, SIM, K, N, S
from outrider.v1 import common_pb2
from tests.unit.rollout_support import AGENT, CANDIDATE_V, STABLE_V
from tests.unit.shadow_support import ShadowHarness, intercepted_write, judge_event, shadow_event
from tests.unit.test_shadow_rollout import SPEC


def _harness() -> tuple[ShadowHarness, str]:
    h = ShadowHarness(SPEC)
    return h, h.start().rollout_id


def test_pairs_figures_and_sessions_as_clusters() -> None:
    h, rid = _harness()
    events = [
        shadow_event(
            rid, 0, "a", agree=True, similarity=0.95, latency_ms=(100, 150), cost_usd=(0.002, 0.003)
        ),
        shadow_event(rid, 0, "a", agree=False, similarity=0.35, error=True, tokens=(100, 160)),
        shadow_event(rid, 0, "b", agree=True, similarity=0.85, stable_error=True),
        shadow_event(rid, 0, "c", agree=True, similarity=0.75),
        intercepted_write(rid, 0, "shadow-a"),
        judge_event(rid, 0, "a", score=0.9, stable_score=0.7, preference="candidate"),
        judge_event(rid, 0, "b", score=0.6, stable_score=0.8, preference="stable"),
        judge_event(rid, 0, "c", parsed=False),
        judge_event(
            rid, 0, "x", kind="single", version=STABLE_V, role=common_pb2.ROLE_STABLE, cost_usd=0.004
        ),
    ]
    assert h.add(events) >= 8
    ev = h.shadow
    assert ev.pairs == 4 and ev.judged == 2 and ev.judge_unparsed == 1 and ev.intercepted_writes == 1
    agree = ev.family(AGREE)
    assert (agree[K], agree[N], agree[S]) == (3, 4, 3)  # 3 stable sessions: the clusters
    assert ev.family(SIM)[S] == pytest.approx(0.95 + 0.35 + 0.85 + 0.75)
    assert ev.family(ERR)[S] == 0  # one candidate error, one stable error
    assert ev.family(JDELTA)[S] == pytest.approx(0.2 - 0.2)
    assert ev.family(PREF)[N] == 2 and ev.family(PREF)[S] == 0
    assert ev.family(LAT)[N] == 4
    summary = ev.summary()
    assert summary.candidate_version_id == CANDIDATE_V
    assert summary.tool_agreement == pytest.approx(0.75)
    assert summary.similarity_p50 == pytest.approx(0.755) and summary.similarity_p10 == pytest.approx(0.355)
    assert (summary.error_rate, summary.stable_error_rate) == (0.25, 0.25)
    assert (summary.judge_score, summary.stable_judge_score) == (pytest.approx(0.75), pytest.approx(0.75))
    assert (summary.prefer_candidate, summary.prefer_stable, summary.prefer_tie) == (0.5, 0.5, 0.0)
    assert summary.judge_cost_usd == pytest.approx(0.001 * 3 + 0.004)
    assert summary.cost_delta_usd == pytest.approx(0.001 / 4)
    assert summary.tokens_delta == pytest.approx(60 / 4)
    assert summary.latency_delta_ms == pytest.approx(0.0, abs=1)


def test_other_rollouts_and_versions_are_not_shadow_evidence() -> None:
    h, rid = _harness()
    other = shadow_event("someone-else", 0, "a")
    wrong_role = shadow_event(rid, 0, "a")
    wrong_role.role = common_pb2.ROLE_CANARY
    h.add([other, wrong_role])
    assert h.shadow.pairs == 0


def test_checkpoint_round_trip_keeps_units_live() -> None:
    h, rid = _harness()
    h.add([shadow_event(rid, 0, "a"), shadow_event(rid, 0, "b", agree=False), judge_event(rid, 0, "a")])
    state = json.loads(json.dumps(h.book.to_state()))  # checkpoints are JSON
    book = EvidenceBook()
    book.load_state(state)
    loaded = book.shadow(AGENT)
    assert loaded is not None
    assert loaded.to_state() == h.shadow.to_state()
    # a later pair of a known session is the same cluster, not a new one
    book.add_events([shadow_event(rid, 1, "a")], 1.0)
    assert loaded.family(AGREE)[K] == 2 and loaded.family(AGREE)[N] == 3
    # a checkpoint written before the shadow phase existed has no "shadow" key
    del state["shadow"]
    EvidenceBook().load_state(state)
    book.forget(lambda agent: agent == AGENT)
    assert book.shadow(AGENT) is None


def test_forgotten_units_keep_their_share_of_the_sums() -> None:
    ev = ShadowEvidence("r", STABLE_V, CANDIDATE_V, max_units=256)
    from collector._shadow_evidence import ShadowRows

    for i in range(600):
        rows = ShadowRows()
        rows.append(f"u{i}", {AGREE: 1.0})
        ev.add(rows, float(i))
    assert ev.family(AGREE)[K] == 600 and ev.family(AGREE)[N] == 600
    assert ev.forgotten_units > 0 and len(ev._units) <= 256


def test_single_judge_verdicts_are_scores_of_their_version_and_role() -> None:
    h, rid = _harness()
    h.clock.advance(1)
    now = h.clock.now()
    single = [
        judge_event(rid, now, "s1", kind="single", score=0.7, version=STABLE_V, role=common_pb2.ROLE_STABLE),
        judge_event(rid, now, "s2", kind="single", score=0.9, version=STABLE_V, role=common_pb2.ROLE_STABLE),
        judge_event(
            rid, now, "s3", kind="single", parsed=False, version=STABLE_V, role=common_pb2.ROLE_STABLE
        ),
    ]
    h.add(single)
    assert h.evidence.arm_sums(SCORE, 0).n == 2 and h.evidence.arm_sums(SCORE, 0).s == pytest.approx(1.6)
    windows = RollingWindows()
    for event in single:
        windows.add_event(event, now)
    stats = windows.snapshot(AGENT, STABLE_V, common_pb2.ROLE_STABLE, 60, now)
    assert stats.judge_scores == 2 and stats.judge_score == pytest.approx(0.8)
    assert stats.scores == 0  # feedback scores stay apart


def test_ingest_drops_duplicate_shadow_records_and_counts_metrics() -> None:
    h, rid = _harness()
    metrics = CollectorMetrics()
    ingest = Ingestor(RollingWindows(), metrics, evidence=h.book)
    pair = shadow_event(rid, 0, "a", agree=False)

    class Record:
        def __init__(self, offset: int) -> None:
            import outrider

            self.topic, self.partition, self.offset, self.key = "outrider.events", 0, offset, b"bot"
            self.value, self.headers = outrider.encode_event(pair)

    ingest.apply([Record(0), Record(1)], 1.0)
    assert h.shadow.pairs == 1
    labels = (AGENT, CANDIDATE_V, "shadow")
    assert metrics.totals.value("outrider_shadow_pairs_total", labels) == 1
    assert metrics.totals.value("outrider_shadow_tool_disagreements_total", labels) == 1
