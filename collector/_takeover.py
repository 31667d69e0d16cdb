"""Taking over and handing back the agents of `outrider.events` partitions on a rebalance.

- Revoked: `Ownership` already stopped deciding for them (the consumer does that first);
  here the decision in hand, if any, is waited for, so the old owner's last write is on the
  control topic before its last checkpoint and before the new owner reads the topic.
- Assigned: the consumer has restored the partitions' state from their checkpoints; here the
  control topic is read back (the state copy merged in, as at start), the rollouts of the
  partitions' agents are installed, the writer's epoch is raised above every epoch seen (so
  the new owner's states order after the old owner's, whatever either's clock says, and a
  zombie old owner's are ordered below them), and only then are the partitions marked ready.
  The first assignment uses the history read at start. A read that fails is retried in the
  background; the partitions stay undecided until it succeeds.
- Released (assigned elsewhere now): their rollouts are forgotten here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka.errors import KafkaError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from collector._control import ControlHistory, ControlPublisher
from collector._manager import RolloutManager
from collector._ownership import Ownership

log = logging.getLogger(__name__)

_RETRY_MAX_S = 10.0


class Takeover:
    def __init__(
        self,
        ownership: Ownership,
        rollouts: RolloutManager,
        publisher: ControlPublisher,
        read_history: Callable[[], Awaitable[ControlHistory]],
        wait_s: float,
    ) -> None:
        self._ownership, self._rollouts, self._publisher = ownership, rollouts, publisher
        self._read_history = read_history  # a fresh read, the state copy merged in
        self._wait_s = wait_s  # how long an assignment waits for its restore inline
        self._startup: ControlHistory | None = None
        self._startup_ready = asyncio.Event()
        self._restores: set[asyncio.Task[None]] = set()
        self.last_restore_s = 0.0  # how long the last takeover took, assignment to ready

    def startup(self, history: ControlHistory) -> None:
        """The history read at start; the first assignment restores from it."""
        self._startup = history
        self._startup_ready.set()

    async def revoked(self, partitions: set[int]) -> None:
        for task in list(self._restores):
            task.cancel()  # a restore of partitions that are no longer ours
        await self._rollouts.quiesce()
        log.info("handed back %s partitions %s", "outrider.events", sorted(partitions))

    def released(self, partitions: set[int]) -> None:
        self._rollouts.release(self._ownership.agents_of(partitions))

    async def assigned(self, partitions: set[int]) -> None:
        if not partitions:
            self._ownership.mark_ready(partitions)
            return
        task = asyncio.create_task(self._restore(partitions), name="collector-takeover")
        self._restores.add(task)
        task.add_done_callback(self._restores.discard)
        # inline as long as it takes normally, so the consumer applies nothing for an agent
        # whose rollout is not installed yet; past that the restore goes on in the background
        await asyncio.wait({task}, timeout=self._wait_s)

    async def _restore(self, partitions: set[int]) -> None:
        began = time.perf_counter()
        await self._startup_ready.wait()  # the first assignment can come before the read ends
        if self._startup is not None:
            history, self._startup = self._startup, None
        else:
            history = await self._read_with_retries()
        mine = self._ownership.agents_of(partitions)
        states = {agent: s for agent, s in history.rollouts.items() if mine(agent)}
        self._publisher.epoch = max(self._publisher.epoch, history.max_epoch + 1)
        for agent in states:
            if agent in history.latest:
                self._publisher.latest[agent] = history.latest[agent]
        await self._rollouts.take_over(states)
        self._ownership.mark_ready(partitions)
        self.last_restore_s = time.perf_counter() - began
        log.info(
            "took over %s partitions %s in %.2fs: %d rollouts (%s), writing with epoch %d",
            "outrider.events",
            sorted(partitions),
            self.last_restore_s,
            len(states),
            ", ".join(sorted(states)) or "none",
            self._publisher.epoch,
        )
        with contextlib.suppress(KafkaError, TimeoutError):
            await self._rollouts.republish()  # the state copy may hold what the topic lost

    async def _read_with_retries(self) -> ControlHistory:
        async for attempt in AsyncRetrying(
            wait=wait_random_exponential(multiplier=0.5, max=_RETRY_MAX_S),
            retry=retry_if_exception_type((KafkaError, OSError, TimeoutError)),
            before_sleep=lambda state: log.warning(
                "reading the control topic back for a takeover failed (%s); retrying",
                state.outcome.exception() if state.outcome else "?",
            ),
            reraise=True,
        ):
            with attempt:
                return await self._read_history()
        raise AssertionError("unreachable")  # AsyncRetrying without a stop returns or raises

    async def stop(self) -> None:
        for task in list(self._restores):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
