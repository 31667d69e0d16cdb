"""The shadow evidence of one rollout: every mirrored pair of its candidate against stable.

A pair is one stable call mirrored to the candidate (a `ShadowRecord`), and its judge verdict (a
`JudgeRecord` of kind "pair", which arrives apart, same `pair_id`). The randomization unit is
the stable session (`event.unit_id` or `session_id`): pairs of one session are correlated, so
each family keeps, over units, K, Σn, Σs, Σn², Σs², Σns of each unit's count n and sum s (the
cluster-robust variance of `stats.ratio_mean_variance`), plus Q = Σ value² per pair (a light
prior on the per-pair variance, so a run of identical pairs is not taken for certainty).

    family   per pair                                 gates
    AGREE    1 if the tool decisions agree            tool_agreement
    SIM      text similarity in [0, 1]                text_similarity
    JDELTA   judge: candidate - stable score          judge_score
    PREF     judge: +1 stable, -1 candidate, 0 tie    judge_preference
    ERR      candidate error - stable error           shadow_error_rate
    LAT      log(candidate / stable latency)          latency_ratio
    COST     log(candidate / stable cost)             cost_ratio

Beside the families, plain figures for status and dashboards (similarity histogram, latency
deltas sketch, judge scores and preferences, unparsed answers, intercepted writes, judge cost).
Pure, times passed in; `to_state` / `from_state` for the checkpoints (with the EvidenceBook).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ddsketch import DDSketch
from ddsketch.pb.ddsketch_pb2 import DDSketch as DDSketchMessage
from ddsketch.pb.proto import DDSketchProto

from collector._errclass import NOT_CAUSED, classify
from collector._evidence import sum_by_unit
from outrider.v1 import admin_pb2, common_pb2, events_pb2

STATE_FORMAT = 1
DEFAULT_MAX_UNITS = 100_000
AGREE, SIM, JDELTA, PREF, ERR, LAT, COST = range(7)
SHADOW_FAMILIES = ("agreement", "similarity", "judge_delta", "preference", "errors", "latency", "cost")
FS = len(SHADOW_FAMILIES)
# per family: K units, N = Σn, S = Σs, NN = Σn², SS = Σs², NS = Σns, Q = Σ value² per pair
K, N, S, NN, SS, NS, Q = range(7)
SIM_BINS = 100
_PREFERENCE = {"stable": 1.0, "candidate": -1.0, "tie": 0.0}


@dataclass
class ShadowRows:
    """Pair observations to add: one row per event, FS columns of counts and values. A row may
    hold several pairs of its unit (the simulator's one row per session): then `dq` carries
    their Σ value² (without `dq`, each row is one pair and Σ value² is ds²)."""

    keys: list[Any] = field(default_factory=list)
    dn: list[list[float]] = field(default_factory=list)
    ds: list[list[float]] = field(default_factory=list)
    dq: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def append(self, key: Any, values: Mapping[int, float]) -> None:
        dn, ds = [0.0] * FS, [0.0] * FS
        for family, value in values.items():
            dn[family], ds[family] = 1.0, value
        self.keys.append(key)
        self.dn.append(dn)
        self.ds.append(ds)


def _dump(sketch: DDSketch) -> str:
    message = DDSketchProto.to_proto(sketch)  # type: ignore[no-untyped-call]
    return base64.b64encode(message.SerializeToString()).decode("ascii")


def _load(text: str) -> DDSketch:
    message = DDSketchMessage()
    message.ParseFromString(base64.b64decode(text))
    return DDSketchProto.from_proto(message)  # type: ignore[no-untyped-call,no-any-return]


def _finite(x: float) -> bool:
    return math.isfinite(x) and x > 0


class ShadowEvidence:
    """The pairs of one rollout's shadow phase. Pure: times are passed in."""

    def __init__(
        self, rollout_id: str, stable: str, candidate: str, max_units: int = DEFAULT_MAX_UNITS
    ) -> None:
        self.rollout_id, self.stable, self.candidate = rollout_id, stable, candidate
        self.max_units = max_units
        self.sums = np.zeros((FS, 7))
        self.pairs = 0
        self.errors = [0, 0]  # stable, candidate (caused errors of the mirrored calls)
        self.excluded = 0  # pairs whose candidate error the candidate did not cause
        self.similarity_hist = [0] * SIM_BINS
        self.latency_delta = DDSketch(0.01)  # candidate - stable, ms
        self.cost_delta = 0.0  # Σ candidate - stable, USD
        self.tokens_delta = 0.0  # Σ candidate - stable, input + output
        self.judged = 0
        self.judge_unparsed = 0
        self.judge_scores = [0.0, 0.0]  # Σ stable, Σ candidate
        self.preferences = {"candidate": 0, "stable": 0, "tie": 0}
        self.judge_cost_usd = 0.0
        self.intercepted_writes = 0
        self._units: dict[Any, int] = {}
        self._n = np.zeros((0, FS))
        self._s = np.zeros((0, FS))
        self._seen = np.zeros(0)
        self._free: list[int] = []
        self.forgotten_units = 0

    # -- the event path ----------------------------------------------------------------------

    def rows_from_event(self, event: events_pb2.Event, rows: ShadowRows) -> bool:
        """Add what `event` says (figures at once, family values to `rows`); False if not ours."""
        if event.rollout_id != self.rollout_id:
            return False
        body = event.WhichOneof("body")
        key = event.unit_id or event.session_id or event.event_id
        if body == "judge":
            return self._judge(event, key, rows)
        if event.version_id != self.candidate or event.role != common_pb2.ROLE_SHADOW:
            return False
        if body == "tool":
            tool = event.tool
            self.intercepted_writes += bool(tool.intercepted)
            return bool(tool.intercepted)
        if body != "shadow":
            return False
        pair = event.shadow
        self.pairs += 1
        values: dict[int, float] = {AGREE: float(pair.tools_agree)}
        if math.isfinite(pair.text_similarity):
            similarity = min(max(pair.text_similarity, 0.0), 1.0)
            values[SIM] = similarity
            self.similarity_hist[min(int(similarity * SIM_BINS), SIM_BINS - 1)] += 1
        candidate_error = classify(pair.error_class) if pair.outcome == events_pb2.OUTCOME_ERROR else ""
        if candidate_error in NOT_CAUSED:
            self.excluded += 1  # an upstream's fault, not the candidate's: no error comparison
        else:
            stable_error = float(pair.stable_outcome == events_pb2.OUTCOME_ERROR)
            values[ERR] = float(bool(candidate_error)) - stable_error
            self.errors[0] += int(stable_error)
            self.errors[1] += bool(candidate_error)
        if _finite(pair.candidate_latency_ms) and _finite(pair.stable_latency_ms):
            values[LAT] = math.log(pair.candidate_latency_ms / pair.stable_latency_ms)
            self.latency_delta.add(pair.candidate_latency_ms - pair.stable_latency_ms)
        if _finite(pair.candidate_cost_usd) and _finite(pair.stable_cost_usd):
            values[COST] = math.log(pair.candidate_cost_usd / pair.stable_cost_usd)
        self.cost_delta += max(pair.candidate_cost_usd, 0.0) - max(pair.stable_cost_usd, 0.0)
        self.tokens_delta += (pair.candidate_input_tokens + pair.candidate_output_tokens) - (
            pair.stable_input_tokens + pair.stable_output_tokens
        )
        rows.append(key, values)
        return True

    def _judge(self, event: events_pb2.Event, key: Any, rows: ShadowRows) -> bool:
        judge = event.judge
        if math.isfinite(judge.cost_usd) and judge.cost_usd > 0:
            self.judge_cost_usd += judge.cost_usd  # every judge call of the rollout, single ones too
        if judge.kind != "pair" or event.version_id != self.candidate:
            return judge.cost_usd > 0
        if not judge.parsed or not (math.isfinite(judge.score) and math.isfinite(judge.stable_score)):
            self.judge_unparsed += 1  # counted, never guessed
            return True
        self.judged += 1
        self.judge_scores[0] += judge.stable_score
        self.judge_scores[1] += judge.score
        values = {JDELTA: judge.score - judge.stable_score}
        if judge.preference in _PREFERENCE:
            self.preferences[judge.preference] += 1
            values[PREF] = _PREFERENCE[judge.preference]
        rows.append(key, values)
        return True

    # -- the batch path ----------------------------------------------------------------------

    def add(self, rows: ShadowRows, now: float) -> None:
        """Add the rows to the per-unit sums (the one way the families grow)."""
        if not len(rows):
            return
        slots = np.fromiter((self._slot(k, now) for k in rows.keys), dtype=np.int64, count=len(rows))
        dn = np.asarray(rows.dn, dtype=np.float64).reshape(len(rows), FS)
        ds = np.asarray(rows.ds, dtype=np.float64).reshape(len(rows), FS)
        dq = np.asarray(rows.dq, dtype=np.float64).reshape(len(rows), FS) if rows.dq else ds * ds
        self.sums[:, Q] += dq.sum(axis=0)
        slots, dn, ds = sum_by_unit(slots, dn, ds)
        old_n, old_s = self._n[slots], self._s[slots]
        new_n, new_s = old_n + dn, old_s + ds
        self._n[slots], self._s[slots] = new_n, new_s
        self._seen[slots] = now
        self.sums[:, K] += ((old_n == 0) & (new_n > 0)).sum(axis=0)
        self.sums[:, N] += dn.sum(axis=0)
        self.sums[:, S] += ds.sum(axis=0)
        self.sums[:, NN] += (new_n * new_n - old_n * old_n).sum(axis=0)
        self.sums[:, SS] += (new_s * new_s - old_s * old_s).sum(axis=0)
        self.sums[:, NS] += (new_n * new_s - old_n * old_s).sum(axis=0)

    def _slot(self, key: Any, now: float) -> int:
        slot = self._units.get(key)
        if slot is not None:
            return slot
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._units[key] = slot
        self._n[slot], self._s[slot], self._seen[slot] = 0.0, 0.0, now
        return slot

    def _grow(self) -> None:
        size = len(self._seen)
        if size >= self.max_units:  # forget the least recently seen quarter (their sums stay)
            cut = np.partition(self._seen, size // 4)[size // 4]
            gone = {s for s in self._units.values() if self._seen[s] <= cut}
            self._units = {k: v for k, v in self._units.items() if v not in gone}
            self._free.extend(gone)
            self.forgotten_units += len(gone)
            return
        new = min(self.max_units, max(256, size * 2))
        self._n = np.vstack([self._n, np.zeros((new - size, FS))])
        self._s = np.vstack([self._s, np.zeros((new - size, FS))])
        self._seen = np.resize(self._seen, new)
        self._free.extend(range(new - 1, size - 1, -1))

    # -- reading -----------------------------------------------------------------------------

    def family(self, family: int) -> tuple[float, ...]:
        """(K, N, S, NN, SS, NS, Q) of one family."""
        return tuple(float(x) for x in self.sums[family])

    def similarity_quantile(self, q: float) -> float:
        total = sum(self.similarity_hist)
        if not total:
            return 0.0
        running = 0
        for i, count in enumerate(self.similarity_hist):
            running += count
            if running >= q * total:
                return (i + 0.5) / SIM_BINS
        return 1.0

    def summary(self) -> admin_pb2.ShadowSummary:
        """The figures of `RolloutStatus.shadow`."""
        agree, sim = self.family(AGREE), self.family(SIM)
        compared = self.pairs - self.excluded
        judged = max(self.judged, 1)
        median = self.latency_delta.get_quantile_value(0.5) if self.latency_delta.count else None
        return admin_pb2.ShadowSummary(
            candidate_version_id=self.candidate,
            pairs=self.pairs,
            tool_agreement=agree[S] / agree[N] if agree[N] else 0.0,
            similarity_mean=sim[S] / sim[N] if sim[N] else 0.0,
            similarity_p10=self.similarity_quantile(0.1),
            similarity_p50=self.similarity_quantile(0.5),
            judged=self.judged,
            judge_score=self.judge_scores[1] / judged,
            stable_judge_score=self.judge_scores[0] / judged,
            prefer_candidate=self.preferences["candidate"] / judged,
            prefer_stable=self.preferences["stable"] / judged,
            prefer_tie=self.preferences["tie"] / judged,
            judge_unparsed=self.judge_unparsed,
            error_rate=self.errors[1] / compared if compared > 0 else 0.0,
            stable_error_rate=self.errors[0] / compared if compared > 0 else 0.0,
            latency_delta_ms=float(median) if median is not None else 0.0,
            cost_delta_usd=self.cost_delta / self.pairs if self.pairs else 0.0,
            intercepted_writes=self.intercepted_writes,
            judge_cost_usd=self.judge_cost_usd,
            tokens_delta=self.tokens_delta / self.pairs if self.pairs else 0.0,
        )

    # -- checkpoints -------------------------------------------------------------------------

    _SCALARS = (
        "pairs",
        "excluded",
        "cost_delta",
        "tokens_delta",
        "judged",
        "judge_unparsed",
        "judge_cost_usd",
        "intercepted_writes",
        "forgotten_units",
    )

    def to_state(self) -> dict[str, Any]:
        live = sorted(self._units.items(), key=lambda kv: kv[1])
        slots = np.asarray([slot for _, slot in live], dtype=np.int64)
        state: dict[str, Any] = {name: getattr(self, name) for name in self._SCALARS}
        state.update(
            format=STATE_FORMAT,
            rollout_id=self.rollout_id,
            stable=self.stable,
            candidate=self.candidate,
            max_units=self.max_units,
            sums=self.sums.tolist(),
            errors=self.errors,
            similarity_hist=self.similarity_hist,
            latency_delta=_dump(self.latency_delta),
            judge_scores=self.judge_scores,
            preferences=self.preferences,
            unit_keys=[key for key, _ in live],
            unit_n=self._n[slots].tolist(),
            unit_s=self._s[slots].tolist(),
            unit_seen=self._seen[slots].tolist(),
        )
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ShadowEvidence:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"shadow evidence format {state.get('format')!r}, expected {STATE_FORMAT}")
        ev = cls(
            str(state["rollout_id"]), str(state["stable"]), str(state["candidate"]), int(state["max_units"])
        )
        for name in cls._SCALARS:
            setattr(ev, name, type(getattr(ev, name))(state[name]))
        ev.sums = np.asarray(state["sums"], dtype=np.float64).reshape(FS, 7)
        ev.errors = [int(x) for x in state["errors"]]
        ev.similarity_hist = [int(x) for x in state["similarity_hist"]]
        ev.latency_delta = _load(state["latency_delta"])
        ev.judge_scores = [float(x) for x in state["judge_scores"]]
        ev.preferences = {str(k): int(v) for k, v in state["preferences"].items()}
        keys = [k if isinstance(k, str) else int(k) for k in state["unit_keys"]]
        if keys:
            size = max(256, len(keys))
            ev._n, ev._s, ev._seen = np.zeros((size, FS)), np.zeros((size, FS)), np.zeros(size)
            ev._n[: len(keys)] = np.asarray(state["unit_n"], dtype=np.float64).reshape(len(keys), FS)
            ev._s[: len(keys)] = np.asarray(state["unit_s"], dtype=np.float64).reshape(len(keys), FS)
            ev._seen[: len(keys)] = np.asarray(state["unit_seen"], dtype=np.float64)
            ev._units = {key: i for i, key in enumerate(keys)}
            ev._free = list(range(size - 1, len(keys) - 1, -1))
        return ev
