"""BackgroundWork, the shadow mode's bounded queue: offer never waits, a full queue drops and
counts, `end(rollout)` drops and cancels that rollout's work alone, `stop()` is idempotent."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from sidecar.shadow._work import BackgroundWork, Job
from sidecar.telemetry._metrics import SidecarMetrics


def dropped(metrics: SidecarMetrics, reason: str) -> float:
    return (
        metrics.registry.get_sample_value("outrider_sidecar_shadow_dropped_total", {"reason": reason}) or 0.0
    )


def depth(metrics: SidecarMetrics) -> float:
    return metrics.registry.get_sample_value("outrider_sidecar_shadow_queue_depth") or 0.0


class Jobs:
    """Jobs that record when they ran and can be held until released."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.release = asyncio.Event()

    def job(self, name: str, rollout: str = "r1", *, hold: bool = True) -> Job:
        async def run() -> None:
            self.started.append(name)
            try:
                if hold:
                    await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(name)
                raise
            self.finished.append(name)

        return Job(rollout, run)


async def until(predicate: Callable[[], bool], what: str = "condition") -> None:
    # a bound for a loaded machine, not a timing assertion: the wait ends when the condition holds
    deadline = time.monotonic() + 10.0
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


@pytest.fixture
def metrics() -> SidecarMetrics:
    return SidecarMetrics()


@pytest.fixture
async def work(metrics: SidecarMetrics) -> AsyncIterator[BackgroundWork]:
    w = BackgroundWork(queue_size=2, concurrency=1, metrics=metrics)
    yield w
    await w.stop()


async def test_shadow_work_queue_is_bounded_and_offer_never_blocks(
    work: BackgroundWork, metrics: SidecarMetrics
) -> None:
    jobs = Jobs()
    # not started: nothing takes from the queue, so it fills
    assert work.offer(jobs.job("a"))
    assert work.offer(jobs.job("b"))
    assert depth(metrics) == 2
    for name in ("c", "d", "e"):
        assert not work.offer(jobs.job(name))  # returns at once, dropped
    assert dropped(metrics, "queue_full") == 3
    assert work.depth == 2
    work.start()
    work.start()  # idempotent: still one worker
    await until(lambda: jobs.started == ["a"], "a started")
    await asyncio.sleep(0.01)
    assert jobs.started == ["a"] and work.running == 1  # concurrency 1
    jobs.release.set()
    await until(lambda: jobs.finished == ["a", "b"], "a and b finished")
    assert work.depth == 0 and work.running == 0 and depth(metrics) == 0


async def test_shadow_work_end_drops_and_cancels_only_that_rollouts_work(
    metrics: SidecarMetrics,
) -> None:
    work = BackgroundWork(queue_size=8, concurrency=2, metrics=metrics)
    jobs = Jobs()
    work.start()
    assert work.offer(jobs.job("r1-running", "r1"))
    assert work.offer(jobs.job("r2-running", "r2"))
    await until(lambda: len(jobs.started) == 2, "two running")
    for job in (
        jobs.job("r1-q1", "r1"),
        jobs.job("eval", ""),
        jobs.job("r1-q2", "r1"),
        jobs.job("r2-q", "r2"),
    ):
        assert work.offer(job)
    assert work.end("r1") == 3  # two queued and one running
    assert dropped(metrics, "rollout_ended") == 3
    assert work.depth == 2 and depth(metrics) == 2
    await until(lambda: jobs.cancelled == ["r1-running"], "r1's running job cancelled")
    assert work.end("r1") == 0  # nothing left of it
    assert work.end("unknown") == 0
    jobs.release.set()
    await until(lambda: sorted(jobs.finished) == ["eval", "r2-q", "r2-running"], "the rest ran")
    assert "r1-q1" not in jobs.started and "r1-q2" not in jobs.started  # in queue order, minus r1
    assert jobs.started[2:] == ["eval", "r2-q"]
    assert dropped(metrics, "rollout_ended") == 3
    await work.stop()


async def test_shadow_work_keeps_working_after_a_failed_job(
    work: BackgroundWork, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    async def boom() -> None:
        raise RuntimeError("mirror exploded")

    async def fine() -> None:
        ran.append("fine")

    work.start()
    with caplog.at_level(logging.ERROR, logger="sidecar.shadow._work"):
        assert work.offer(Job("r1", boom))
        assert work.offer(Job("r1", fine))
        await until(lambda: ran == ["fine"], "the next job ran")
    assert any("shadow mirror job failed" in r.getMessage() for r in caplog.records)


async def test_shadow_work_stop_drops_cancels_and_is_idempotent(metrics: SidecarMetrics) -> None:
    work = BackgroundWork(queue_size=4, concurrency=1, metrics=metrics)
    jobs = Jobs()
    work.start()
    assert work.offer(jobs.job("running"))
    await until(lambda: jobs.started == ["running"], "one running")
    assert work.offer(jobs.job("waiting-1"))
    assert work.offer(jobs.job("waiting-2"))
    await work.stop()
    assert jobs.cancelled == ["running"]
    assert dropped(metrics, "shutdown") == 3
    assert work.depth == 0 and work.running == 0 and depth(metrics) == 0
    await work.stop()  # idempotent
    assert dropped(metrics, "shutdown") == 3
    assert not work.offer(jobs.job("late"))  # refused, not queued, never blocks
    assert dropped(metrics, "shutdown") == 4 and work.depth == 0
    assert jobs.started == ["running"]


async def test_shadow_work_stop_before_start_and_cancellation_of_a_stuck_job(
    metrics: SidecarMetrics,
) -> None:
    idle = BackgroundWork(queue_size=1, concurrency=1, metrics=metrics)
    await idle.stop()  # never started: nothing to do

    work = BackgroundWork(queue_size=1, concurrency=1, metrics=metrics)
    stuck_cancelled = asyncio.Event()

    async def stuck() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stuck_cancelled.set()
            raise

    run: Callable[[], Coroutine[Any, Any, None]] = stuck
    work.start()
    assert work.offer(Job("r1", run))
    await until(lambda: work.running == 1, "running")
    await asyncio.wait_for(work.stop(), 2.0)
    assert stuck_cancelled.is_set()
