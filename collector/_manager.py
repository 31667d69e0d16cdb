"""Every agent's rollout controller, and the rule that a state counts only once published.

Admin commands and the tick loop share one lock, so each decision is proposed from the
current state, written to `outrider.control`, and only then applied: a failed write leaves
the controller where it was and the tick loop tries again.

With an `Ownership` (a collector in a consumer group), only the agents this replica owns are
decided, commanded and republished here; a command for another agent raises `NotOwner` (the
admin API relays it to the owner). `take_over` installs the rollouts of partitions just
assigned, `release` drops those of partitions another replica holds now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from aiokafka.errors import KafkaError

from collector._book import EvidenceBook
from collector._config_errors import SpecError
from collector._errors import NoRollout, NotOwner
from collector._metrics import CollectorMetrics
from collector._ownership import Ownership
from collector._rollout import RolloutController
from collector._sightings import VersionSightings
from collector._spec import RolloutSpec
from collector._windows import RollingWindows
from outrider import SignedRecord
from outrider.clock import Clock
from outrider.v1 import admin_pb2, common_pb2, control_pb2, deployment_pb2

log = logging.getLogger(__name__)

DEFAULT_METRICS_WINDOW_S = 60.0
# judge verdicts are sampled and slow: status shows them over at least this long
JUDGE_WINDOW_S = 900.0


class PublishError(Exception):
    """A rollout state could not be written to the control topic; nothing changed."""


class StatePublisher(Protocol):
    async def publish(self, state: control_pb2.RolloutState) -> None: ...

    @property
    def latest(self) -> dict[str, SignedRecord]: ...

    async def send(self, record: SignedRecord) -> int: ...


# told about every state once it is published and applied (the notifier); must not block
StateListener = Callable[[control_pb2.RolloutState, control_pb2.RolloutState | None], None]


class RolloutManager:
    def __init__(
        self,
        publisher: StatePublisher,
        windows: RollingWindows,
        metrics: CollectorMetrics,
        clock: Clock,
        evidence: EvidenceBook | None = None,
        retention_s: float | None = None,
        listener: StateListener | None = None,
        ownership: Ownership | None = None,
    ) -> None:
        self._publisher, self._windows, self._metrics, self._clock = publisher, windows, metrics, clock
        self.evidence = evidence if evidence is not None else EvidenceBook()
        self._retention_s = retention_s if retention_s is not None else windows.retention_s
        self._controllers: dict[str, RolloutController] = {}
        self._lock = asyncio.Lock()
        # events that never arrived from the agent's sidecars (set by the collector)
        self.events_missing: Callable[[str], int] = lambda agent: 0
        self._listener = listener
        self.sightings = VersionSightings()
        self.ownership = ownership
        # blue-green: blue's baseline snapshot (agent, version), from the deployment history
        self.baseline_of: Callable[[str, str], deployment_pb2.BaselineSnapshot | None] = lambda a, v: None

    def owns(self, agent: str) -> bool:
        """Is this replica the one that decides for `agent`? (Always, without an Ownership.)"""
        return self.ownership is None or self.ownership.owns(agent)

    def _require_owner(self, agent: str) -> None:
        if not self.owns(agent):
            raise NotOwner(f"this collector replica does not own agent {agent!r}")

    async def take_over(self, states: Mapping[str, Sequence[control_pb2.RolloutState]]) -> None:
        """Install the rollouts of agents whose partition was just assigned, from the states
        read back from the control topic (under the lock: no decision runs meanwhile)."""
        async with self._lock:
            for agent in states:
                self._controllers.pop(agent, None)
            self.restore(states)

    def release(self, agents: Callable[[str], bool]) -> None:
        """Forget the rollouts of agents another replica owns now."""
        for agent in [a for a in self._controllers if agents(a)]:
            del self._controllers[agent]

    async def quiesce(self) -> None:
        """Return once the decision in hand (if any) is published: the lock is free."""
        async with self._lock:
            pass

    def restore(self, states: Mapping[str, Sequence[control_pb2.RolloutState]]) -> None:
        """Take over the states read back from the control topic; generations continue from them."""
        for agent, agent_states in states.items():
            if not agent_states:
                continue
            ctl = RolloutController.restore(agent_states)
            self._controllers[agent] = ctl
            assert ctl.state is not None
            self.evidence.sync(ctl.state, ctl.spec)
            self._metrics.observe_state(ctl.state)
            phase = control_pb2.RolloutPhase.Name(ctl.state.phase)
            if ctl.running and ctl.spec is None:
                log.error(
                    "rollout %s of %s cannot resume: its spec no longer validates; abort it",
                    ctl.state.rollout_id,
                    agent,
                )
            log.info(
                "recovered %s: rollout %s generation %d %s",
                agent,
                ctl.state.rollout_id,
                ctl.state.generation,
                phase,
            )

    async def republish(self) -> int:
        """Write the newest signed record of every agent again, as it is (under the lock, so a
        decision is never overtaken by an older state); how many were written."""
        written = 0
        async with self._lock:
            for agent, record in list(self._publisher.latest.items()):
                if not self.owns(agent):
                    continue
                try:
                    await self._publisher.send(record)
                except (KafkaError, TimeoutError) as exc:
                    # the broker is away: stop here rather than hold the lock for every agent
                    log.warning(
                        "republishing %s failed: %s; trying again later", agent, exc or type(exc).__name__
                    )
                    break
                written += 1
                self._metrics.republished.inc()
        return written

    def get(self, agent: str) -> RolloutController | None:
        return self._controllers.get(agent)

    def agents(self) -> list[str]:
        return list(self._controllers)

    async def _publish(self, ctl: RolloutController, state: control_pb2.RolloutState) -> None:
        try:
            await self._publisher.publish(state)
        except (KafkaError, TimeoutError) as exc:
            self._metrics.publish_failures.inc()
            ctl.reserve(state.generation)
            raise PublishError(
                f"could not write generation {state.generation} of {state.agent!r} to the "
                f"control topic: {exc or type(exc).__name__}"
            ) from exc
        self._metrics.observe_state(state)
        log.info(
            "%s generation %d: %s weight %.2f step %d/%d (%s, by %s)",
            state.agent,
            state.generation,
            control_pb2.RolloutPhase.Name(state.phase),
            state.candidate_weight,
            state.step_index + 1,
            state.step_count,
            state.reason,
            state.decided_by,
        )

    def _applied(self, previous: control_pb2.RolloutState | None, state: control_pb2.RolloutState) -> None:
        if self._listener is not None:
            try:
                self._listener(state, previous)
            except Exception:  # a listener's bug must never stop a decision
                log.exception("state listener failed for %s generation %d", state.agent, state.generation)

    def check_windows(self, spec: RolloutSpec, source: str) -> None:
        """A gate or trigger window longer than the collector keeps cannot be served: refuse it."""
        problems = [
            f"gates[{i}].window: {g.window:g}s exceeds what this collector keeps "
            f"(retention_s {self._retention_s:g}s)"
            for i, g in enumerate(spec.gates)
            if g.window > self._retention_s
        ]
        problems += [
            f"triggers.{name}.window: {t.window:g}s exceeds what this collector keeps "
            f"(the larger of retention_s {self._retention_s:g}s and an hour)"
            for name, t in spec.triggers.active()
            if t.window > max(self._retention_s, 3600.0)
        ]
        if spec.baseline is not None and spec.baseline > self._retention_s:
            problems.append(
                f"baseline: {spec.baseline:g}s exceeds what this collector keeps "
                f"(retention_s {self._retention_s:g}s)"
            )
        if problems:
            raise SpecError(source, problems)

    async def start(self, spec: RolloutSpec, spec_yaml: str, decided_by: str) -> RolloutController:
        async with self._lock:
            self._require_owner(spec.agent)
            ctl = self._controllers.setdefault(spec.agent, RolloutController(spec.agent))
            previous = ctl.state
            state = ctl.propose_start(spec, spec_yaml, self._clock.now(), decided_by or "admin")
            await self._publish(ctl, state)
            ctl.apply(state, spec)
            self.evidence.sync(state, spec)
            self._applied(previous, state)
            return ctl

    async def abort(self, agent: str, reason: str, decided_by: str) -> RolloutController:
        return await self._command(agent, "abort", reason, decided_by)

    async def pause(self, agent: str, reason: str, decided_by: str) -> RolloutController:
        """RUNNING or NO_DATA -> HOLD until an operator resumes."""
        return await self._command(agent, "pause", reason, decided_by)

    async def resume(self, agent: str, reason: str, decided_by: str) -> RolloutController:
        """HOLD -> RUNNING; the evidence stays, and the controller looks again at once."""
        ctl = await self._command(agent, "resume", reason, decided_by)
        ctl.look_again()
        return ctl

    async def promote(self, agent: str, reason: str, decided_by: str) -> RolloutController:
        """An operator's override: PROMOTED whatever the gates say."""
        return await self._command(agent, "promote", reason, decided_by)

    async def switch_back(self, agent: str, reason: str, decided_by: str) -> RolloutController:
        """Blue-green in SMOKE_TEST or SWITCHED -> ROLLED_BACK: new sessions to blue at once."""
        return await self._command(agent, "switch_back", reason, decided_by)

    async def _command(self, agent: str, verb: str, reason: str, decided_by: str) -> RolloutController:
        """An operator's verb: propose from the current state, publish, then apply."""
        async with self._lock:
            self._require_owner(agent)
            ctl = self._controllers.get(agent)
            if ctl is None or ctl.state is None:
                raise NoRollout(f"agent {agent!r} has no rollout")
            propose = {
                "abort": ctl.propose_abort,
                "pause": ctl.propose_pause,
                "resume": ctl.propose_resume,
                "promote": ctl.propose_promote,
                "switch_back": ctl.propose_switch_back,
            }[verb]
            previous = ctl.state
            state = propose(reason, self._clock.now(), decided_by or "admin")
            await self._publish(ctl, state)
            ctl.apply(state)
            self.evidence.sync(state, ctl.spec)
            self._applied(previous, state)
            return ctl

    async def tick(self) -> list[control_pb2.RolloutState]:
        """Evaluate every running rollout once; the states published."""
        published: list[control_pb2.RolloutState] = []
        async with self._lock:
            now = self._clock.now()
            self._windows.evict(now)
            for agent, ctl in list(self._controllers.items()):
                evidence = self.evidence.get(agent)
                if not ctl.running or evidence is None or not self.owns(agent):
                    continue
                current = ctl.state
                assert current is not None  # running
                bg = current.strategy == control_pb2.ROLLOUT_STRATEGY_BLUE_GREEN
                state = ctl.decide(
                    evidence,
                    now,
                    self.evidence.shadow(agent),
                    smoke=self.evidence.smoke.get(agent) if bg else None,
                    baseline=self.baseline_of(agent, current.stable_version_id) if bg else None,
                )
                if state is None:
                    continue
                try:
                    await self._publish(ctl, state)
                except PublishError as exc:
                    ctl.look_again()
                    log.warning("%s; retrying next tick", exc)
                    continue
                previous = ctl.state
                ctl.apply(state)
                self.evidence.sync(state, ctl.spec)
                self._applied(previous, state)
                published.append(state)
        return published

    def status(self, agent: str) -> admin_pb2.RolloutStatus:
        ctl = self._controllers.get(agent)
        if ctl is None or ctl.state is None:
            raise NoRollout(f"agent {agent!r} has no rollout")
        state = ctl.state
        window = (
            ctl.spec.gates[0].window if ctl.spec is not None and ctl.spec.gates else DEFAULT_METRICS_WINDOW_S
        )
        now = self._clock.now()
        metrics = []
        started = state.started_at_unix_nano / 1e9
        warnings = []
        for version, role in (
            (state.stable_version_id, common_pb2.ROLE_STABLE),
            (state.candidate_version_id, common_pb2.ROLE_CANARY),
        ):
            stats = self._windows.snapshot(agent, version, role, window, now)
            judged = self._windows.snapshot(agent, version, role, max(window, JUDGE_WINDOW_S), now)
            seen = self.sightings.get(agent, version)
            metrics.append(
                admin_pb2.VersionMetrics(
                    version_id=version,
                    role=role,
                    requests=stats.requests,
                    errors=stats.errors,
                    error_rate=stats.error_rate,
                    latency_p95_ms=stats.latency_p95_ms,
                    models=seen.models if seen is not None else [],
                    last_seen_unix_nano=round(seen.last_seen * 1e9) if seen is not None else 0,
                    window_s=window,
                    judge_scores=judged.judge_scores,
                    judge_score=judged.judge_score,
                )
            )
            if ctl.running and (seen is None or seen.last_seen < started):
                name = "stable" if role == common_pb2.ROLE_STABLE else "candidate"
                warnings.append(
                    f"no sidecar has reported serving the {name} version {version} since the rollout "
                    "started (is it in the sidecars' versions, and is the agent sending traffic?)"
                )
        live = admin_pb2.RolloutStatus(
            state=state,
            timeline=ctl.timeline,
            metrics=metrics,
            spec_yaml=state.spec_yaml,
            events_missing=self.events_missing(agent),
            now_unix_nano=round(now * 1e9),
            warnings=warnings,
        )
        shadow = self.evidence.shadow(agent)
        if shadow is not None and shadow.rollout_id == state.rollout_id:
            live.shadow.CopyFrom(shadow.summary())
        groups = self.evidence.groups.get(agent, state.rollout_id)
        if groups is not None:  # per-tenant canaries: each group's figures apart
            live.groups.extend(groups.metrics())
            if ctl.spec is not None and ctl.running:
                live.warnings.extend(groups.warnings(ctl.spec, state.candidate_version_id))
        if ctl.spec is not None:
            for gate in ctl.spec.gates:
                live.figure_windows_s[gate.name] = 0.0
            for name, trigger in ctl.spec.triggers.active():
                live.figure_windows_s[f"trigger:{name}"] = trigger.window
        if ctl.running and ctl.evaluation:
            # the controller's current evaluation, not only the last published one
            del live.state.gate_results[:]
            live.state.gate_results.extend(ctl.evaluation)
        return live
