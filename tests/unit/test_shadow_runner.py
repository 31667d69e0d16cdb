"""ShadowRunner's routing of work, with a real Router and BackgroundWork and no upstream: which
stable answers are mirrored (sampled, sticky, only while in SHADOW) and that a rollout leaving its
shadow phase drops its queued work, including when its candidate only became known later."""

from __future__ import annotations

import time
from typing import cast

from outrider.v1 import common_pb2, control_pb2
from sidecar._record import ChatState, Recorder
from sidecar.resilience._executor import Executor
from sidecar.routing._router import Router
from sidecar.routing._session import Session, new_nonce
from sidecar.routing._versions import Version
from sidecar.shadow._runner import ShadowRunner
from sidecar.shadow._settings import ShadowConfig
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.upstream._provider import ChatResult

AGENT = "support-bot"
USER = [common_pb2.ChatMessage(role="user", content="Where is my order?")]


def state(
    phase: int, generation: int, *, rollout: str = "r1", sample: float = 1.0
) -> control_pb2.RolloutState:
    return control_pb2.RolloutState(
        agent=AGENT,
        epoch=1,
        generation=generation,
        rollout_id=rollout,
        stable_version_id="v1",
        candidate_version_id="v2",
        shadow_sample=sample,
        phase=phase,  # type: ignore[arg-type]
    )


def runner(router: Router, metrics: SidecarMetrics) -> ShadowRunner:
    # the workers are never started: offered work stays queued where the test can see it
    versions = {"v1": cast(Version, object()), "v2": cast(Version, object())}
    return ShadowRunner(
        config=ShadowConfig(queue_size=16),
        router=router,
        versions=versions,
        executor=cast(Executor, object()),
        recorder=cast(Recorder, object()),
        metrics=metrics,
    )


def stable_session(rollout: str = "r1", nonce: str | None = None) -> Session:
    return Session(nonce or new_nonce(), "v1", common_pb2.ROLE_STABLE, rollout, time.time() + 3600)


def answered() -> ChatState:
    chat = ChatState("chat")
    chat.result = ChatResult(content="It ships tomorrow.", finish_reason="stop")
    return chat


def apply(router: Router, shadow: ShadowRunner, rollout_state: control_pb2.RolloutState) -> None:
    assert router.apply(rollout_state)
    shadow.on_state(rollout_state)  # what the control tailer's listener does


def dropped(metrics: SidecarMetrics, reason: str) -> float:
    return (
        metrics.registry.get_sample_value("outrider_sidecar_shadow_dropped_total", {"reason": reason}) or 0.0
    )


def test_shadow_mirrors_stable_answers_only_in_the_shadow_phase() -> None:
    metrics = SidecarMetrics()
    router = Router(AGENT, "v1", {"v1", "v2"})
    shadow = runner(router, metrics)
    version = cast(Version, object())
    shadow.after_chat(stable_session(""), version, USER, answered())
    assert shadow.work.depth == 0  # no rollout at all
    apply(router, shadow, state(control_pb2.ROLLOUT_PHASE_SHADOW, 1))
    shadow.after_chat(stable_session(), version, USER, answered())
    assert shadow.work.depth == 1
    # not mirrored: a failed answer, a shadow session's own answer, another version's session
    shadow.after_chat(stable_session(), version, USER, ChatState("chat"))
    shadow.after_chat(
        Session(new_nonce(), "v2", common_pb2.ROLE_SHADOW, "r1", time.time() + 60), version, USER, answered()
    )
    shadow.after_chat(
        Session(new_nonce(), "v2", common_pb2.ROLE_STABLE, "", time.time() + 60), version, USER, answered()
    )
    assert shadow.work.depth == 1


def test_shadow_sample_is_sticky_per_session() -> None:
    metrics = SidecarMetrics()
    router = Router(AGENT, "v1", {"v1", "v2"})
    shadow = runner(router, metrics)
    apply(router, shadow, state(control_pb2.ROLLOUT_PHASE_SHADOW, 1, sample=0.5))
    version = cast(Version, object())
    mirrored = 0
    for _ in range(10):
        session = stable_session()
        before = shadow.work.depth
        for _ in range(3):
            shadow.after_chat(session, version, USER, answered())
        added = shadow.work.depth - before
        assert added in (0, 3)  # all of a session's calls, or none
        mirrored += added // 3
        shadow.work.end("r1")  # keep the queue from filling
    assert 0 < mirrored < 10  # 2**-9 odds of all or none
    apply(router, shadow, state(control_pb2.ROLLOUT_PHASE_SHADOW, 2, sample=0.0))
    for _ in range(5):
        shadow.after_chat(stable_session(), version, USER, answered())
    assert shadow.work.depth == 0


def test_shadow_work_is_dropped_when_the_rollout_leaves_shadow() -> None:
    for leaving in (
        control_pb2.ROLLOUT_PHASE_RUNNING,
        control_pb2.ROLLOUT_PHASE_ABORTED,
        control_pb2.ROLLOUT_PHASE_PROMOTED,
    ):
        metrics = SidecarMetrics()
        router = Router(AGENT, "v1", {"v1", "v2"})
        shadow = runner(router, metrics)
        apply(router, shadow, state(control_pb2.ROLLOUT_PHASE_SHADOW, 1))
        for _ in range(3):
            shadow.after_chat(stable_session(), cast(Version, object()), USER, answered())
        assert shadow.work.depth == 3
        apply(router, shadow, state(leaving, 2))
        assert shadow.work.depth == 0
        assert dropped(metrics, "rollout_ended") == 3


def test_shadow_work_of_a_replaced_rollout_is_dropped() -> None:
    metrics = SidecarMetrics()
    router = Router(AGENT, "v1", {"v1", "v2"})
    shadow = runner(router, metrics)
    apply(router, shadow, state(control_pb2.ROLLOUT_PHASE_SHADOW, 1, rollout="r1"))
    shadow.after_chat(stable_session("r1"), cast(Version, object()), USER, answered())
    apply(router, shadow, state(control_pb2.ROLLOUT_PHASE_SHADOW, 2, rollout="r2"))
    assert shadow.work.depth == 0 and dropped(metrics, "rollout_ended") == 1


def test_shadow_work_stops_even_when_the_candidate_was_learned_after_the_shadow_state() -> None:
    """The SHADOW state names a candidate pushed later (the registry teaches the router): once it
    is known, calls are mirrored; when the rollout leaves its shadow phase, that work must stop."""
    metrics = SidecarMetrics()
    router = Router(AGENT, "v1", {"v1"})
    shadow = runner(router, metrics)
    apply(router, shadow, state(control_pb2.ROLLOUT_PHASE_SHADOW, 1))
    shadow.after_chat(stable_session(), cast(Version, object()), USER, answered())
    assert shadow.work.depth == 0  # the candidate is unknown: nothing to mirror to
    router.learn("v2")  # the pushed version arrived
    shadow.after_chat(stable_session(), cast(Version, object()), USER, answered())
    assert shadow.work.depth == 1
    apply(router, shadow, state(control_pb2.ROLLOUT_PHASE_RUNNING, 2))
    assert shadow.work.depth == 0
    assert dropped(metrics, "rollout_ended") == 1
