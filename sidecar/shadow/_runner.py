"""Shadow mode in the sidecar: mirrored calls, their comparison, and the judge.

After every stable answer the pipeline calls `after_chat`. While a rollout is in its shadow
phase, a sampled share of stable sessions (sticky per session, so a mirrored conversation is
mirrored whole) has each call mirrored to the candidate in the background: the same
conversation so far, with the candidate's own system prompt, model, parameters and tools (the
executor builds the request from the version). The user has stable's answer already; the
mirrored call never delays or fails it:

- it is a job on `BackgroundWork` (bounded queue, bounded concurrency, dropped and counted when
  full) and a unary call whatever the user's was (a comparison needs the whole answer);
- it is non-priority under every quota, with its own budget (`max_tpm_share`) and refused
  first above the priority threshold; it never counts against a user's or tenant's quota;
- it stops at once when the rollout leaves its shadow phase (`on_state`).

Each mirrored call gives one ShadowRecord event (role SHADOW, the candidate's version, the
stable session). The judge (when configured and content capture is on) scores a sample of
the pairs, every divergent pair, and a share of every role's production answers
(continuous evaluation), each verdict a JudgeRecord event. Text reaches the judge only after
the guards' redaction: the conversation as stable got it, each answer as its version's output
guards leave it.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace

from outrider.v1 import common_pb2, control_pb2, events_pb2
from sidecar._record import ChatState, Recorder, elapsed_ms, role_name
from sidecar.flags._effects import SessionFlags
from sidecar.resilience._executor import ChatFailed, Executor
from sidecar.routing._router import Router, ShadowTarget, in_shadow, sticky_fraction
from sidecar.routing._session import Session
from sidecar.routing._versions import Version
from sidecar.shadow._compare import Answer, ToolDecision, compare
from sidecar.shadow._judge import Judge, JudgeResult
from sidecar.shadow._load import LoopLoad
from sidecar.shadow._settings import ShadowConfig
from sidecar.shadow._work import BackgroundWork, Job
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.upstream._provider import ChatResult

log = logging.getLogger(__name__)

_OK, _ERROR = events_pb2.OUTCOME_OK, events_pb2.OUTCOME_ERROR
Conversation = list[dict[str, str]]


def answer_of(
    result: ChatResult | None, *, latency_ms: float, cost_usd: float, error_class: str = ""
) -> Answer:
    """A ChatResult (or a failure) as the comparison sees it."""
    if result is None or error_class:
        return Answer(latency_ms=latency_ms, ok=False, error_class=error_class or "error")
    return Answer(
        text=result.content,
        tool_calls=tuple(ToolDecision(c.name, c.arguments or "{}") for c in result.tool_calls),
        latency_ms=latency_ms,
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        cost_usd=cost_usd,
    )


def conversation_of(messages: Sequence[common_pb2.ChatMessage]) -> Conversation:
    return [{"role": m.role, "content": m.content} for m in messages]


class ShadowRunner:
    def __init__(
        self,
        *,
        config: ShadowConfig,
        router: Router,
        versions: Mapping[str, Version],
        executor: Executor,
        recorder: Recorder,
        metrics: SidecarMetrics,
        judge: Judge | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._router = router
        self._versions = versions
        self.flags: SessionFlags | None = None  # the agent's feature flags (set by the sidecar)
        self._executor = executor
        self._recorder = recorder
        self._metrics = metrics
        self.judge = judge
        self._rng = rng or random.Random()
        self.work = BackgroundWork(
            queue_size=config.queue_size,
            concurrency=config.concurrency,
            metrics=metrics,
            load=LoopLoad(),
            max_busy=config.max_busy,
        )
        self._shadowing: str | None = None  # the rollout in its shadow phase, as last seen

    async def start(self) -> None:
        self.work.start()

    async def stop(self) -> None:
        await self.work.stop()
        if self.judge is not None:
            await self.judge.aclose()

    def on_state(self, state: control_pb2.RolloutState) -> None:
        """A rollout state was applied: if the rollout in shadow left its shadow phase (or another
        rollout took over), its mirrored work stops now.

        A rollout is in shadow from its SHADOW state on, whether or not this sidecar has its
        candidate yet: the registry may teach the router the candidate later (no new state), and
        the work mirrored from then on must stop with the phase too."""
        current = state.rollout_id if in_shadow(state) else None
        if self._shadowing is not None and self._shadowing != current:
            ended = self.work.end(self._shadowing)
            log.info(
                "shadow: rollout %s left its shadow phase; %d mirrored calls stopped", self._shadowing, ended
            )
        self._shadowing = current

    # the pipeline's hook ---------------------------------------------------------------

    def after_chat(
        self,
        session: Session,
        version: Version,
        messages: Sequence[common_pb2.ChatMessage],
        state: ChatState,
    ) -> None:
        """A served, priced, guarded answer: mirror it and/or evaluate it. Never blocks."""
        if state.result is None:
            return
        judge = self.judge
        evaluate = judge is not None and judge.config.should_evaluate(role_name(session.role), self._rng)
        target = self._router.shadow_target()
        mirror = target is not None and session.role == common_pb2.ROLE_STABLE
        if not (evaluate or mirror):  # most calls: nothing to do, nothing built
            return
        stable = answer_of(state.result, latency_ms=elapsed_ms(state.start), cost_usd=state.cost_usd)
        if evaluate:
            conversation = conversation_of(messages)
            self.work.offer(Job("", lambda: self._evaluate(session, conversation, stable), "evaluate"))
        if target is None or not mirror:
            return
        if session.version_id != target.stable_version_id or not self._sampled(target, session):
            return
        candidate = self._versions.get(target.candidate_version_id)
        if candidate is None:
            return
        if self.flags is not None:  # the session's flags on the candidate too: a like-for-like pair
            candidate = self.flags.version_for(session, candidate)
        frozen = tuple(messages)
        self.work.offer(
            Job(
                target.rollout_id,
                lambda: self._mirror(target, session, candidate, frozen, stable, state.operation),
            )
        )

    @staticmethod
    def _sampled(target: ShadowTarget, session: Session) -> bool:
        return sticky_fraction(f"shadow\x00{target.rollout_id}", session.nonce) < target.sample

    # the jobs ---------------------------------------------------------------------------

    async def _mirror(
        self,
        target: ShadowTarget,
        session: Session,
        candidate: Version,
        messages: Sequence[common_pb2.ChatMessage],
        stable: Answer,
        operation: str,
    ) -> None:
        deadline = time.monotonic() + self.config.deadline
        start = time.perf_counter()
        try:
            served = await self._executor.chat(candidate, messages, deadline, False, None, shadow=True)
        except ChatFailed as exc:
            if exc.error_class == "quota":  # no room in the shadow budget: not the candidate's fault
                self._metrics.shadow_dropped.labels("quota").inc()
                return
            answer = answer_of(None, latency_ms=elapsed_ms(start), cost_usd=0.0, error_class=exc.error_class)
        else:
            self._executor.settle(served)
            result = served.result
            target_model = served.tier.target
            cost = (
                candidate.prices.cost(
                    target_model.model,
                    result.input_tokens,
                    result.output_tokens,
                    min(result.cached_input_tokens, result.input_tokens),
                )
                if target_model is not None
                else 0.0
            )
            blocked = False
            if candidate.guards.rules_for("output") and result.content:
                outcome = candidate.guards.scan_output(result.content)
                blocked, result.content = outcome.blocked, outcome.text
            answer = answer_of(result, latency_ms=elapsed_ms(start), cost_usd=cost)
            if blocked:  # what a user would have got: an error, not an empty answer (nor judged)
                answer = replace(answer, ok=False, error_class="guard_blocked_output", text="", tool_calls=())
        comparison = compare(stable, answer, divergence=self.config.divergence)
        pair_id = uuid.uuid4().hex[:16]
        event = self._event(session, candidate.version_id, common_pb2.ROLE_SHADOW, target.rollout_id)
        record = event.shadow
        record.stable_version_id = session.version_id
        record.operation = operation
        record.outcome = _OK if answer.ok else _ERROR
        record.error_class = answer.error_class
        record.stable_outcome = _OK if stable.ok else _ERROR
        record.tools_agree = comparison.tools_agree
        record.differing_fields.extend(comparison.differing_fields)
        record.stable_tool_calls = comparison.stable_tool_calls
        record.candidate_tool_calls = comparison.candidate_tool_calls
        record.text_similarity = comparison.text_similarity
        record.similarity_measure = comparison.similarity_measure
        if comparison.embedding_similarity is not None:
            record.embedding_similarity = comparison.embedding_similarity
            record.has_embedding_similarity = True
        record.divergent = comparison.divergent
        record.stable_latency_ms, record.candidate_latency_ms = stable.latency_ms, answer.latency_ms
        record.stable_input_tokens, record.stable_output_tokens = stable.input_tokens, stable.output_tokens
        record.candidate_input_tokens, record.candidate_output_tokens = (
            answer.input_tokens,
            answer.output_tokens,
        )
        record.stable_cost_usd, record.candidate_cost_usd = stable.cost_usd, answer.cost_usd
        record.pair_id = pair_id
        self._recorder.emit(event)
        self._metrics.shadow_calls.labels("ok" if answer.ok else "error").inc()
        judge = self.judge
        if (
            judge is None
            or not answer.ok
            or not judge.config.should_judge_pair(comparison.divergent, self._rng)
        ):
            return
        verdict = await judge.judge_pair(
            conversation_of(messages), answer, stable, pair_id=pair_id, divergent=comparison.divergent
        )
        self._record_verdict(
            verdict, "pair", session, candidate.version_id, common_pb2.ROLE_SHADOW, target.rollout_id
        )

    async def _evaluate(self, session: Session, conversation: Conversation, answer: Answer) -> None:
        assert self.judge is not None
        verdict = await self.judge.judge_single(conversation, answer)
        self._record_verdict(verdict, "single", session, session.version_id, session.role, session.rollout_id)

    def _record_verdict(
        self,
        verdict: JudgeResult | None,
        kind: str,
        session: Session,
        version_id: str,
        role: int,
        rollout_id: str,
    ) -> None:
        if verdict is None:
            self._metrics.judge_calls.labels(kind, "refused").inc()
            return
        result = "error" if not verdict.ok else "parsed" if verdict.parsed else "unparsed"
        self._metrics.judge_calls.labels(kind, result).inc()
        if verdict.cost_usd > 0:
            self._metrics.judge_cost_usd.inc(verdict.cost_usd)
        event = self._event(session, version_id, role, rollout_id)
        record = event.judge
        record.kind = verdict.kind
        record.judge = verdict.judge
        record.parsed = verdict.parsed
        record.score = verdict.score
        record.stable_score = verdict.stable_score
        record.preference = verdict.preference
        record.pair_id = verdict.pair_id
        record.cost_usd = verdict.cost_usd
        record.latency_ms = verdict.latency_ms
        record.outcome = _OK if verdict.ok else _ERROR
        record.error_class = verdict.error_class
        record.divergent = verdict.divergent
        self._recorder.emit(event)

    def _event(self, session: Session, version_id: str, role: int, rollout_id: str) -> events_pb2.Event:
        event = self._recorder.event(session)
        event.version_id = version_id
        event.role = role  # type: ignore[assignment]
        event.rollout_id = rollout_id
        return event
