"""The evidence of an A/B test: one control-against-variant `RolloutEvidence` per variant.

Each pair is the canary evidence with the control as its stable arm (ROLE_STABLE) and one
variant as its candidate arm (ROLE_VARIANT), so the guardrail gates (collector._gates) test
every variant against the control exactly as a canary gate tests a candidate. The control's
events go to every pair (its sums are the same in each). `ABEvidence` is itself the first pair
(the second variant), which keeps the evidence book and the manager unchanged; the others ride
along in `pairs` and in its checkpoint.

`variant_stats` reads the primary metric per variant as `stats.VariantStats` over users:

    task_success     the tasks family, successes = n - failures
    thumbs_up_rate   the thumbs family, ups = n - downs
    judge_score      the scores family
    cost_per_task    the spend family (USD per model call)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from collector._evidence import REQ, SCORE, SPEND, TASK, THUMB, ArmSums, RolloutEvidence, Rows
from collector.stats import VariantStats
from outrider.v1 import common_pb2, events_pb2

FAMILY = {"task_success": TASK, "thumbs_up_rate": THUMB, "judge_score": SCORE, "cost_per_task": SPEND}
COMPLEMENT = frozenset({"task_success", "thumbs_up_rate"})  # the family counts the bad outcome


class PairEvidence(RolloutEvidence):
    """The control (arm 0) against one variant (arm 1) of an A/B test."""

    def arm_of(self, event: events_pb2.Event) -> int | None:
        if event.rollout_id != self.rollout_id:
            return None
        if event.version_id == self.candidate and event.role == common_pb2.ROLE_VARIANT:
            return 1
        if event.version_id == self.stable and event.role == common_pb2.ROLE_STABLE:
            return 0
        return None


class ABEvidence(PairEvidence):
    """Every variant's evidence; the instance is the pair of the second variant."""

    def __init__(self, *args: Any, variants: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.variants = tuple(variants) or (self.stable, self.candidate)
        self.others = [
            PairEvidence(self.rollout_id, self.stable, version, self.stage_starts[0], **kwargs)
            for version in self.variants[2:]
        ]
        self._pending = [Rows() for _ in self.others]

    @property
    def pairs(self) -> list[PairEvidence]:
        """The pair of each non-control variant, in the variants' order."""
        return [self, *self.others]

    def rows_from_event(self, event: events_pb2.Event, now: float, rows: Rows) -> bool:
        used = super().rows_from_event(event, now, rows)
        for pair, pending in zip(self.others, self._pending, strict=True):
            used = pair.rows_from_event(event, now, pending) or used
        return used

    def add(self, rows: Rows, now: float) -> None:
        super().add(rows, now)
        for i, pair in enumerate(self.others):
            pending, self._pending[i] = self._pending[i], Rows()
            if len(pending) or pending.safety or pending.excluded:
                pair.add(pending, now)

    # -- reading -----------------------------------------------------------------------------

    def arm(self, index: int, family: int) -> ArmSums:
        """Variant `index`'s sums of one family (0: the control)."""
        if index == 0:
            return self.arm_sums(family, 0)
        return self.pairs[index - 1].arm_sums(family, 1)

    def units(self) -> list[int]:
        """Users (units) with a call or tool call, per variant: what the SRM check counts."""
        return [round(self.arm(i, REQ).k) for i in range(len(self.variants))]

    def variant_stats(self, metric: str) -> list[VariantStats]:
        """The primary metric's sufficient statistics per variant (see the module doc)."""
        family = FAMILY[metric]
        out = []
        for i in range(len(self.variants)):
            a = self.arm(i, family)
            if metric in COMPLEMENT:  # s' = n - s per unit: Σs' = N - S, Σs'² = NN - 2NS + SS, Σns' = NN - NS
                out.append(VariantStats(a.k, a.n, a.n - a.s, a.nn, a.nn - 2 * a.ns + a.ss, a.nn - a.ns))
            else:
                out.append(VariantStats(a.k, a.n, a.s, a.nn, a.ss, a.ns))
        return out

    # -- checkpoints -------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        state = super().to_state()
        state["ab_variants"] = list(self.variants)
        state["ab_others"] = [pair.to_state() for pair in self.others]
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ABEvidence:
        evidence = super().from_state(state)
        assert isinstance(evidence, ABEvidence)
        evidence.variants = tuple(str(v) for v in state["ab_variants"])
        evidence.others = [_pair_from_state(s) for s in state["ab_others"]]
        evidence._pending = [Rows() for _ in evidence.others]
        return evidence


def _pair_from_state(state: Mapping[str, Any]) -> PairEvidence:
    pair = PairEvidence.from_state(state)
    assert isinstance(pair, PairEvidence)
    return pair


def evidence_from_state(state: Mapping[str, Any]) -> RolloutEvidence:
    """A checkpointed evidence: an A/B test's or a canary's."""
    return ABEvidence.from_state(state) if "ab_variants" in state else RolloutEvidence.from_state(state)
