"""Shadow work off every user's path: a bounded queue and a fixed number of workers.

`offer` never waits: a job that does not fit is dropped and counted, and so is every job while
the event loop is busy (`LoopLoad` above `max_busy`: the sidecar is near saturation, and its
users come first), offered or queued. Each job belongs to a
rollout; `end(rollout_id)` drops its queued jobs and cancels its running ones at once (the
rollout ended, so its candidate must stop getting calls). `stop()` is the shutdown path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sidecar.shadow._load import LoopLoad
from sidecar.telemetry._metrics import SidecarMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Job:
    rollout_id: str  # "" for work that belongs to no rollout (continuous evaluation)
    run: Callable[[], Coroutine[Any, Any, None]]
    kind: str = "mirror"


class BackgroundWork:
    def __init__(
        self,
        *,
        queue_size: int,
        concurrency: int,
        metrics: SidecarMetrics,
        load: LoopLoad | None = None,
        max_busy: float = 1.0,
    ) -> None:
        self._load, self._max_busy = load, max_busy
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self._concurrency = concurrency
        self._metrics = metrics
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[asyncio.Task[None], Job] = {}
        self._stopped = False

    def start(self) -> None:
        if self._workers:
            return
        if self._load is not None:
            self._load.start()
        self._workers = [
            asyncio.create_task(self._work(), name=f"shadow-worker-{i}") for i in range(self._concurrency)
        ]

    @property
    def overloaded(self) -> bool:
        return self._load is not None and self._load.busy > self._max_busy

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return len(self._running)

    def offer(self, job: Job) -> bool:
        """Queue `job` unless the queue is full or stopped; never blocks."""
        if self._stopped:
            self._metrics.shadow_dropped.labels("shutdown").inc()
            return False
        if self.overloaded:
            self._metrics.shadow_dropped.labels("overload").inc()
            return False
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._metrics.shadow_dropped.labels("queue_full").inc()
            return False
        self._metrics.shadow_queue_depth.set(self._queue.qsize())
        return True

    def end(self, rollout_id: str) -> int:
        """Drop the queued and cancel the running jobs of `rollout_id`; how many there were."""
        kept: list[Job] = []
        dropped = 0
        while not self._queue.empty():
            job = self._queue.get_nowait()
            self._queue.task_done()
            if job.rollout_id == rollout_id:
                dropped += 1
            else:
                kept.append(job)
        for job in kept:
            self._queue.put_nowait(job)
        for task, job in list(self._running.items()):
            if job.rollout_id == rollout_id:
                task.cancel()
                dropped += 1
        if dropped:
            self._metrics.shadow_dropped.labels("rollout_ended").inc(dropped)
        self._metrics.shadow_queue_depth.set(self._queue.qsize())
        return dropped

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            self._metrics.shadow_queue_depth.set(self._queue.qsize())
            if self.overloaded:  # it waited while the loop fell behind: the users come first
                self._metrics.shadow_dropped.labels("overload").inc()
                self._queue.task_done()
                continue
            task: asyncio.Task[None] = asyncio.create_task(
                job.run()
            )  # its own task, so `end` can cancel it alone
            self._running[task] = job
            try:
                await asyncio.wait({task})
                if not task.cancelled() and task.exception() is not None:
                    log.error("shadow %s job failed", job.kind, exc_info=task.exception())
            except asyncio.CancelledError:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise
            finally:
                self._running.pop(task, None)
                self._queue.task_done()

    async def stop(self) -> None:
        """Stop taking work, drop what waits, cancel what runs. Idempotent."""
        self._stopped = True
        waiting = self._queue.qsize()
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        running = len(self._running)
        if waiting + running:
            self._metrics.shadow_dropped.labels("shutdown").inc(waiting + running)
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if self._load is not None:
            await self._load.stop()
        self._metrics.shadow_queue_depth.set(0)
