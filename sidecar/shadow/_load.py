"""How busy the sidecar's event loop is: the signal that shadow work must make way.

User calls and shadow work share one event loop, and a mirrored call costs about as much CPU
as a user's. A bounded queue alone sheds only when the candidate is slow; a fast candidate
keeps the queue short while taking CPU from the users. So shadow work is also shed while the
loop is busy: every `interval_s` the loop thread's CPU time over the wall time since the last
look (`time.thread_time`, so other processes on the machine and gRPC's own threads do not
count), smoothed, is its busy share. Above `shadow.max_busy` new shadow work is dropped
(reason `overload`) and queued work is dropped as it comes up, until the loop has room again.
A loop starved of CPU by its neighbours looks less busy, not more: the users' calls then wait
for the CPU, not for the loop, and shedding would not help them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

DEFAULT_INTERVAL_S = 0.05
SMOOTHING = 0.3  # weight of the newest look: follows a change in a few looks, not one spike


class LoopLoad:
    def __init__(
        self,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        wall: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self._interval = interval_s
        self._wall, self._cpu = wall, cpu
        self.busy = 0.0  # the smoothed share of wall time the loop thread spent on the CPU
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="shadow-loop-load")

    def observe(self, cpu_s: float, wall_s: float) -> float:
        """Fold one look (CPU seconds over wall seconds) into the busy share; returns it."""
        if wall_s > 0:
            self.busy += SMOOTHING * (min(1.0, max(0.0, cpu_s / wall_s)) - self.busy)
        return self.busy

    async def _watch(self) -> None:
        wall, cpu = self._wall(), self._cpu()
        while True:
            await asyncio.sleep(self._interval)
            now_wall, now_cpu = self._wall(), self._cpu()
            self.observe(now_cpu - cpu, now_wall - wall)
            wall, cpu = now_wall, now_cpu

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
