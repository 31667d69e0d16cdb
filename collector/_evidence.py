"""The evidence of one rollout: cumulative sufficient statistics, by stage and randomization unit.

Gates test what accumulated since the rollout started, not a rolling window, so a slow
metric (task feedback) gets all its samples and the last stage never loses its baseline.

- **Arms**: stable (0) and candidate (1) of this rollout; other events are not evidence, nor
  are per-tenant canaries' opt-in and excluded sessions (`Event.cohort`): not randomized, they
  would bias the comparison (an empty cohort, no tenant lists or an old sidecar, is the split).
- **Strata**: a unit belongs to the stage during which it was first seen, so the tests can
  compare arms within a stage and traffic shifts between stages bias nothing.
- **Units**: calls of a session (user, tenant per `sticky_by`) are correlated, so every
  family keeps, per (stage, arm), the sums over units K, Σn, Σs, Σn², Σs², Σns of each unit's
  count n and sum s: enough for cluster-robust variances (`stats.ratio_mean_variance`).
  Each unit's own (n, s) is kept while it is live (bounded; the oldest are forgotten, their
  share of the sums stays) so late events still update it.
- **Safety**: an e-process over safety events, and the critical categories' counts.
- **Triggers**: per-minute counts for the absolute triggers (the last hour).

One batch path (`add`) serves the collector's ingest (`rows_from_event` per event, flushed
per consumed batch) and the simulator (rows built with numpy), so both run the same sums.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from collector._errclass import NOT_CAUSED, classify
from collector.stats import CountEProcess
from outrider.v1 import common_pb2, events_pb2, sidecar_pb2

STATE_FORMAT = 1
DEFAULT_MAX_UNITS = 200_000
TRIGGER_HORIZON_S = 3600.0
# the sessions the weights assigned (sidecar.routing._tenants): the only ones compared
RANDOMIZED_COHORTS = frozenset({"", "split"})

# families: each unit has a count n and a sum s in every one
REQ, TOOL, CALL, LAT, TTFT, COST, SPEND, TASK, THUMB, SCORE = range(10)
FAMILIES = ("requests", "tools", "calls", "latency", "ttft", "cost", "spend", "tasks", "thumbs", "scores")
F = len(FAMILIES)
# per (stratum, arm, family): K units, N = Σn, S = Σs, NN = Σn², SS = Σs², NS = Σns
K, N, S, NN, SS, NS = range(6)
# per-minute trigger columns, per arm
T_REQ, T_ERR, T_SLOW, T_CALLS, T_SPEND, T_SPEND2, T_SCORES, T_SCORE, T_SCORE2 = range(9)
TCOLS = 9

FloatArray = npt.NDArray[np.float64]


@dataclass
class Rows:
    """Observations to add: one row per event (or per simulated session), columns by family."""

    keys: list[Any] = field(default_factory=list)  # the unit of each row
    arms: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    dn: list[list[float]] = field(default_factory=list)  # F columns
    ds: list[list[float]] = field(default_factory=list)
    trig: list[list[float]] = field(default_factory=list)  # TCOLS columns
    # safety events in order: (time, arm, count, critical)
    safety: list[tuple[float, int, int, bool]] = field(default_factory=list)
    excluded: list[tuple[int, str]] = field(default_factory=list)  # (arm, error class) not caused

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, indices: Sequence[int]) -> Rows:
        """The rows at `indices` (no safety or excluded entries)."""
        return Rows(
            [self.keys[i] for i in indices],
            [self.arms[i] for i in indices],
            [self.times[i] for i in indices],
            [self.dn[i] for i in indices],
            [self.ds[i] for i in indices],
            [self.trig[i] for i in indices],
        )


@dataclass(frozen=True)
class ArmSums:
    """One family's sums for one arm (over the strata asked for)."""

    k: float = 0.0
    n: float = 0.0
    s: float = 0.0
    nn: float = 0.0
    ss: float = 0.0
    ns: float = 0.0


class RolloutEvidence:
    """Everything the gates and triggers of one rollout test. Pure: times are passed in."""

    def __init__(
        self,
        rollout_id: str,
        stable: str,
        candidate: str,
        started_at: float,
        *,
        stages: int,
        slow_ms: float = 10_000.0,
        critical: Sequence[str] = ("secret", "pii"),
        max_units: int = DEFAULT_MAX_UNITS,
    ) -> None:
        self.rollout_id, self.stable, self.candidate = rollout_id, stable, candidate
        self.stage_starts = [started_at]
        self.slow_ms = slow_ms
        self.critical = tuple(critical)
        self.max_units = max_units
        self.sums = np.zeros((max(1, stages), 2, F, 6))
        self.safety = CountEProcess()
        self.safety_events = [0, 0]
        self.critical_events = [0, 0]
        self.excluded: dict[str, list[int]] = {}  # error class -> [stable, candidate]
        self.minutes: dict[int, FloatArray] = {}  # minute -> (2, TCOLS)
        self._slots: dict[Any, int] = {}
        self._free: list[int] = []
        self._arm = np.zeros(0, dtype=np.int8)
        self._stratum = np.zeros(0, dtype=np.int16)
        self._seen = np.zeros(0)
        self._n = np.zeros((0, F))
        self._s = np.zeros((0, F))
        self.forgotten_units = 0

    # -- stages ------------------------------------------------------------------------------

    @property
    def stage(self) -> int:
        return len(self.stage_starts) - 1

    def begin_stage(self, index: int, at: float) -> None:
        """Units first seen from `at` on belong to stage `index` (called on each advance)."""
        while len(self.stage_starts) <= index:
            self.stage_starts.append(at)
        if self.sums.shape[0] <= index:
            grown = np.zeros((index + 1, 2, F, 6))
            grown[: self.sums.shape[0]] = self.sums
            self.sums = grown

    def stratum_at(self, t: float) -> int:
        return max(0, bisect.bisect_right(self.stage_starts, t) - 1)

    # -- the event path ----------------------------------------------------------------------

    def arm_of(self, event: events_pb2.Event) -> int | None:
        if event.rollout_id != self.rollout_id or event.cohort not in RANDOMIZED_COHORTS:
            return None
        if event.version_id == self.candidate and event.role == common_pb2.ROLE_CANARY:
            return 1
        if event.version_id == self.stable and event.role == common_pb2.ROLE_STABLE:
            return 0
        return None

    def rows_from_event(self, event: events_pb2.Event, now: float, rows: Rows) -> bool:
        """Append what `event` says to `rows`; False when it is not evidence of this rollout."""
        arm = self.arm_of(event)
        if arm is None:
            return False
        stamp = event.time_unix_nano  # each field read once: a read costs about what using it does
        t = min(stamp / 1e9 if stamp > 0 else now, now)
        body = event.WhichOneof("body")
        dn, ds, trig = [0.0] * F, [0.0] * F, [0.0] * TCOLS
        if body == "call":
            call = event.call
            error = classify(call.error_class) if call.outcome == events_pb2.OUTCOME_ERROR else ""
            if error in NOT_CAUSED:
                rows.excluded.append((arm, error))
                return True
            # reliability: what the agent saw, and what retries and fallback tiers hid from it
            fell_back = call.fallback_tier > 0
            hidden = call.attempts > 1 or fell_back
            dn[REQ], ds[REQ] = 1.0, float(bool(error) or hidden)
            dn[CALL], ds[CALL] = 1.0, float(fell_back)
            trig[T_REQ], trig[T_ERR], trig[T_CALLS] = 1.0, float(bool(error)), 1.0
            latency, ttft, cost = call.latency_ms, call.time_to_first_token_ms, call.cost_usd
            if math.isfinite(latency) and latency > 0:
                dn[LAT], ds[LAT] = 1.0, math.log(latency)
                trig[T_SLOW] = float(latency > self.slow_ms)
            if math.isfinite(ttft) and ttft > 0:
                dn[TTFT], ds[TTFT] = 1.0, math.log(ttft)
            cost = cost if math.isfinite(cost) and cost > 0 else 0.0
            if cost > 0:
                dn[COST], ds[COST] = 1.0, math.log(cost)
            dn[SPEND], ds[SPEND] = 1.0, cost
            trig[T_SPEND], trig[T_SPEND2] = cost, cost * cost
        elif body == "tool":
            tool = event.tool
            error = classify(tool.error_class, tool=True) if tool.outcome == events_pb2.OUTCOME_ERROR else ""
            if error in NOT_CAUSED or tool.intercepted:
                if error:
                    rows.excluded.append((arm, error))
                return True
            dn[REQ], ds[REQ] = 1.0, float(bool(error) or tool.attempts > 1)
            dn[TOOL], ds[TOOL] = 1.0, float(bool(error))
            trig[T_REQ], trig[T_ERR] = 1.0, float(bool(error))
            latency = tool.latency_ms
            if math.isfinite(latency) and latency > 0:
                dn[LAT], ds[LAT] = 1.0, math.log(latency)
        elif body == "feedback":
            kind, score = event.feedback.kind, event.feedback.score
            if kind in (sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS, sidecar_pb2.FEEDBACK_KIND_TASK_FAILURE):
                dn[TASK], ds[TASK] = 1.0, float(kind == sidecar_pb2.FEEDBACK_KIND_TASK_FAILURE)
            elif kind in (sidecar_pb2.FEEDBACK_KIND_THUMBS_UP, sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN):
                dn[THUMB], ds[THUMB] = 1.0, float(kind == sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN)
            elif kind == sidecar_pb2.FEEDBACK_KIND_SCORE and math.isfinite(score):
                dn[SCORE], ds[SCORE] = 1.0, score
                trig[T_SCORES], trig[T_SCORE], trig[T_SCORE2] = 1.0, score, score * score
            else:
                return True
        elif body == "judge":
            judge = event.judge  # a judge's score of one production answer counts as a score
            if judge.kind != "single" or not judge.parsed or not math.isfinite(judge.score):
                return True
            dn[SCORE], ds[SCORE] = 1.0, judge.score
            trig[T_SCORES], trig[T_SCORE], trig[T_SCORE2] = 1.0, judge.score, judge.score * judge.score
        elif body == "safety":
            safety = event.safety
            critical = safety.direction == "output" and safety.category.startswith(self.critical)
            rows.safety.append((t, arm, max(safety.count, 1), critical))
            return True
        else:
            return False
        rows.keys.append(event.unit_id or event.session_id or event.event_id)
        rows.arms.append(arm)
        rows.times.append(t)
        rows.dn.append(dn)
        rows.ds.append(ds)
        rows.trig.append(trig)
        return True

    # -- the batch path ----------------------------------------------------------------------

    def add(self, rows: Rows, now: float) -> None:
        """Add every row and safety event. The one way evidence grows.

        A safety event's exposure share counts the requests before it in time, so where a
        batch ends changes nothing: rows are added in time order up to each safety event.
        """
        for arm, error in rows.excluded:
            self.excluded.setdefault(error, [0, 0])[arm] += 1
        if not rows.safety:
            if len(rows):
                self._add_rows(rows, now)
            return
        order = sorted(range(len(rows)), key=rows.times.__getitem__)
        done = 0
        for t, arm, count, critical in sorted(rows.safety, key=lambda s: s[0]):
            upto = done
            while upto < len(order) and rows.times[order[upto]] < t:
                upto += 1
            if upto > done:
                self._add_rows(rows.take(order[done:upto]), now)
                done = upto
            self._add_safety(t, arm, count, critical)
        if done < len(order):
            self._add_rows(rows.take(order[done:]), now)

    def _add_rows(self, rows: Rows, now: float) -> None:
        times = np.asarray(rows.times, dtype=np.float64)
        arms = np.asarray(rows.arms, dtype=np.int8)
        slots = np.fromiter(
            (self._slot(key, arm, t) for key, arm, t in zip(rows.keys, rows.arms, rows.times, strict=True)),
            dtype=np.int64,
            count=len(rows),
        )
        dn, ds = _matrix(rows.dn, F), _matrix(rows.ds, F)
        slots, dn, ds = sum_by_unit(slots, dn, ds)
        old_n, old_s = self._n[slots], self._s[slots]
        new_n, new_s = old_n + dn, old_s + ds
        self._n[slots], self._s[slots] = new_n, new_s
        np.maximum.at(self._seen, slots, now)
        contrib = np.empty((len(slots), F, 6))
        contrib[:, :, K] = (old_n == 0) & (new_n > 0)
        contrib[:, :, N] = dn
        contrib[:, :, S] = ds
        contrib[:, :, NN] = new_n * new_n - old_n * old_n
        contrib[:, :, SS] = new_s * new_s - old_s * old_s
        contrib[:, :, NS] = new_n * new_s - old_n * old_s
        np.add.at(self.sums, (self._stratum[slots], self._arm[slots]), contrib)
        # the triggers' minutes (rows of the last hour only)
        trig = _matrix(rows.trig, TCOLS)
        minutes = np.floor(times / 60.0).astype(np.int64)
        horizon = math.floor((now - TRIGGER_HORIZON_S) / 60.0)
        for minute in np.unique(minutes):
            if minute < horizon:
                continue
            mask = minutes == minute
            bucket = self.minutes.setdefault(int(minute), np.zeros((2, TCOLS)))
            np.add.at(bucket, arms[mask], trig[mask])
        for minute in [m for m in self.minutes if m < horizon]:
            del self.minutes[minute]

    def _add_safety(self, t: float, arm: int, count: int, critical: bool) -> None:
        self.safety_events[arm] += count
        if critical:
            self.critical_events[arm] += count
        share = self.exposure_share(self.stratum_at(t))
        for _ in range(count):
            self.safety.update(arm == 1, share)

    def exposure_share(self, stratum: int, prior: float = 20.0) -> float:
        """The candidate's share of requests in a stratum, shrunk toward an even split early on."""
        n0, n1 = float(self.sums[stratum, 0, REQ, N]), float(self.sums[stratum, 1, REQ, N])
        share = (n1 + 0.5 * prior) / (n0 + n1 + prior)
        return min(max(share, 1e-6), 1 - 1e-6)

    def _slot(self, unit: Any, arm: int, t: float) -> int:
        # a user or tenant the router moves to the candidate as the weight rises is a new unit
        # of the candidate's arm, not more of its stable self
        key = (arm, unit)
        slot = self._slots.get(key)
        if slot is not None:
            return slot
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._slots[key] = slot
        self._arm[slot], self._stratum[slot], self._seen[slot] = arm, self.stratum_at(t), t
        self._n[slot], self._s[slot] = 0.0, 0.0
        return slot

    def _grow(self) -> None:
        size = len(self._arm)
        if size >= self.max_units:  # forget the least recently seen quarter (their sums stay)
            live = np.fromiter(self._slots.values(), dtype=np.int64, count=len(self._slots))
            cut = np.partition(self._seen[live], len(live) // 4)[len(live) // 4]
            gone = {slot for slot in live[self._seen[live] <= cut].tolist()}
            self._slots = {k: v for k, v in self._slots.items() if v not in gone}
            self._free.extend(gone)
            self.forgotten_units += len(gone)
            return
        new = min(self.max_units, max(1024, size * 2))
        self._arm = np.resize(self._arm, new)
        self._stratum = np.resize(self._stratum, new)
        self._seen = np.resize(self._seen, new)
        self._n = np.vstack([self._n, np.zeros((new - size, F))])
        self._s = np.vstack([self._s, np.zeros((new - size, F))])
        self._free.extend(range(new - 1, size - 1, -1))

    # -- reading -----------------------------------------------------------------------------

    def arm_sums(self, family: int, arm: int, stratum: int | None = None) -> ArmSums:
        rows = self.sums[:, arm, family] if stratum is None else self.sums[stratum : stratum + 1, arm, family]
        total = rows.sum(axis=0)
        return ArmSums(*(float(x) for x in total))

    def family(self, family: int) -> list[list[list[float]]]:
        """One family's sums as plain floats: [stratum][arm] -> [K, N, S, NN, SS, NS]."""
        return self.sums[:, :, family, :].tolist()  # type: ignore[no-any-return]

    def strata(self) -> int:
        return int(self.sums.shape[0])

    def window(self, now: float, window_s: float) -> FloatArray:
        """The trigger columns per arm (2, TCOLS) over the minutes of the last `window_s`."""
        first = math.floor((now - window_s) / 60.0)
        total = np.zeros((2, TCOLS))
        for minute, bucket in self.minutes.items():
            if minute >= first:
                total += bucket
        return total

    def minute(self, index: int) -> FloatArray:
        return self.minutes.get(index, np.zeros((2, TCOLS)))

    def candidate_requests(self, stratum: int) -> int:
        return int(self.sums[stratum, 1, REQ, N]) if stratum < self.sums.shape[0] else 0

    # -- checkpoints -------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        live = sorted(self._slots.items(), key=lambda kv: kv[1])
        slots = np.asarray([slot for _, slot in live], dtype=np.int64)
        return {
            "format": STATE_FORMAT,
            "rollout_id": self.rollout_id,
            "stable": self.stable,
            "candidate": self.candidate,
            "stage_starts": self.stage_starts,
            "slow_ms": self.slow_ms,
            "critical": list(self.critical),
            "max_units": self.max_units,
            "sums": _b64(self.sums),
            "safety": self.safety.to_state(),
            "safety_events": self.safety_events,
            "critical_events": self.critical_events,
            "excluded": self.excluded,
            "minutes": [[m, _b64(b)] for m, b in self.minutes.items()],
            "forgotten_units": self.forgotten_units,
            "unit_keys": [[arm, unit] for (arm, unit), _ in live],
            "unit_arm": _b64(self._arm[slots].astype(np.int8)),
            "unit_stratum": _b64(self._stratum[slots].astype(np.int16)),
            "unit_seen": _b64(self._seen[slots]),
            "unit_n": _b64(self._n[slots]),
            "unit_s": _b64(self._s[slots]),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RolloutEvidence:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"evidence state format {state.get('format')!r}, expected {STATE_FORMAT}")
        sums = _unb64(state["sums"], np.float64)
        stages = sums.size // (2 * F * 6)
        evidence = cls(
            str(state["rollout_id"]),
            str(state["stable"]),
            str(state["candidate"]),
            float(state["stage_starts"][0]),
            stages=stages,
            slow_ms=float(state["slow_ms"]),
            critical=[str(c) for c in state["critical"]],
            max_units=int(state["max_units"]),
        )
        evidence.stage_starts = [float(t) for t in state["stage_starts"]]
        evidence.sums = sums.reshape(stages, 2, F, 6)
        evidence.safety = CountEProcess.from_state(state["safety"])
        evidence.safety_events = [int(x) for x in state["safety_events"]]
        evidence.critical_events = [int(x) for x in state["critical_events"]]
        evidence.excluded = {str(k): [int(a), int(b)] for k, (a, b) in state["excluded"].items()}
        evidence.minutes = {int(m): _unb64(b, np.float64).reshape(2, TCOLS) for m, b in state["minutes"]}
        evidence.forgotten_units = int(state["forgotten_units"])
        keys = [(int(arm), unit if isinstance(unit, str) else int(unit)) for arm, unit in state["unit_keys"]]
        if keys:
            count = len(keys)
            size = max(1024, count)
            evidence._arm = np.zeros(size, dtype=np.int8)
            evidence._stratum = np.zeros(size, dtype=np.int16)
            evidence._seen = np.zeros(size)
            evidence._n, evidence._s = np.zeros((size, F)), np.zeros((size, F))
            evidence._arm[:count] = _unb64(state["unit_arm"], np.int8)
            evidence._stratum[:count] = _unb64(state["unit_stratum"], np.int16)
            evidence._seen[:count] = _unb64(state["unit_seen"], np.float64)
            evidence._n[:count] = _unb64(state["unit_n"], np.float64).reshape(count, F)
            evidence._s[:count] = _unb64(state["unit_s"], np.float64).reshape(count, F)
            evidence._slots = {key: i for i, key in enumerate(keys)}
            evidence._free = list(range(size - 1, count - 1, -1))
        return evidence


def _matrix(rows: Sequence[Sequence[float]], columns: int) -> FloatArray:
    """Rows of floats as an array: flattened first, which numpy takes at a third of the cost
    of working out the shape of a list of lists."""
    flat = itertools.chain.from_iterable(rows)
    return np.fromiter(flat, dtype=np.float64, count=len(rows) * columns).reshape(len(rows), columns)


def sum_by_unit(
    slots: npt.NDArray[Any], dn: npt.NDArray[np.float64], ds: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """A batch's rows with a unit twice added up first (fancy assignment keeps only the last)."""
    unique, inverse = np.unique(slots, return_inverse=True)
    if len(unique) == len(slots):
        return slots, dn, ds
    agg_n, agg_s = np.zeros((len(unique), dn.shape[1])), np.zeros((len(unique), ds.shape[1]))
    np.add.at(agg_n, inverse, dn)
    np.add.at(agg_s, inverse, ds)
    return unique, agg_n, agg_s


def _b64(array: npt.NDArray[Any]) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _unb64(text: str, dtype: type[np.generic]) -> npt.NDArray[Any]:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()
