"""Writing deployment records: when a rollout ends, and again with its baseline after a promotion.

The manager calls the recorder (a `StateListener`, beside the notifier) after each published
decision; only the collector that published the ending state hears it, so only that one
writes. The listener builds the record from the controller's timeline, adds it to the history
(served at once) and queues it (bounded; a full queue drops and counts), so writing never
delays or fails a decision. One background task owned by the collector writes each record to
`state_dir` first (so nothing is lost while the broker is away) and then, signed, to
`outrider.deployments`, retrying through tenacity; what still failed is tried again every
`RETRY_INTERVAL_S` and after a new broker.

Baselines: `take_baselines(now)`, from the collector's tick, snapshots the new stable's metrics
over the spec's `baseline` once that long has passed since the promotion, and writes the
record again. A pending baseline survives a restart: it is derived from a PROMOTED record of
this collector's (its state_dir) without one whose time has come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

import outrider
from collector._deployments import ENDED, baseline_pending, build_record, sign_record, with_baseline
from collector._history import DeploymentHistory
from collector._metrics import CollectorMetrics
from collector._producer import start_producer
from collector._rollout import RolloutController
from collector._windows import RollingWindows
from outrider.v1 import control_pb2, deployment_pb2

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
MAX_ATTEMPTS = 6
MAX_RETRY_S = 30.0  # per record, before it waits for the next round
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 5.0
RETRY_INTERVAL_S = 30.0  # records not yet on the topic are tried again this often
STOP_GRACE_S = 3.0


class DeploymentRecorder:
    """Queue, save and publish deployment records; `start`/`stop` idempotent, one owned task."""

    def __init__(
        self,
        history: DeploymentHistory,
        controllers: Callable[[str], RolloutController | None],
        windows: RollingWindows,
        signer: outrider.SigningKey,
        bootstrap: str,
        timeout_s: float,
        retention_s: float,
        metrics: CollectorMetrics,
        queue_size: int = QUEUE_SIZE,
        owns: Callable[[str], bool] | None = None,
    ) -> None:
        self.history = history
        # replicas: the agent's owner takes its baselines (it holds the agent's windows)
        self._owns = owns
        self._controllers, self._windows, self._signer = controllers, windows, signer
        self._bootstrap, self._timeout_s, self._retention_s = bootstrap, timeout_s, retention_s
        self._metrics = metrics
        self._queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self._unpublished: set[str] = set()  # rollout ids saved but not (yet) on the topic
        self._producer: AIOKafkaProducer | None = None
        # one lazy start at a time, and none once stopped: a second or late producer would leak
        self._producer_lock = asyncio.Lock()
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._pending = asyncio.Event()  # something to publish
        self.retry_interval_s = RETRY_INTERVAL_S

    # -- called from decisions and ticks: never block, never raise --------------------------

    def __call__(self, state: control_pb2.RolloutState, previous: control_pb2.RolloutState | None) -> None:
        """The manager's listener: a rollout that just ended gets its record."""
        if state.phase not in ENDED:
            return
        if previous is not None and previous.rollout_id == state.rollout_id and previous.phase in ENDED:
            return
        ctl = self._controllers(state.agent)
        timeline = ctl.timeline if ctl is not None else []
        spec = ctl.spec if ctl is not None else None
        baseline_s = spec.baseline_s(self._retention_s) if spec is not None else 0.0
        now = state.decided_at_unix_nano / 1e9
        self._keep(build_record(state, timeline, baseline_s, now))

    def take_baselines(self, now: float) -> int:
        """Snapshot every due baseline of this collector's promotions; how many were taken."""
        taken = 0
        for record in self.history.records():
            mine = (
                self._owns(record.agent) if self._owns is not None else record.rollout_id in self.history.mine
            )
            if not mine or not baseline_pending(record, now):
                continue
            due = record.baseline_due_unix_nano / 1e9
            # windows keep `retention_s` back from the newest event: a late snapshot lost the start
            partial = now - self._retention_s > record.ended_at_unix_nano / 1e9
            stats = self._windows.snapshot(
                record.agent, record.candidate_version_id, None, record.baseline_s, due
            )
            self._keep(with_baseline(record, stats, now, partial))
            log.info(
                "%s: baseline of %s after rollout %s: %d requests, %.2f%% errors, p95 %.0f ms",
                record.agent,
                record.candidate_version_id,
                record.rollout_id,
                stats.requests,
                stats.error_rate * 100,
                stats.latency_p95_ms,
            )
            taken += 1
        return taken

    def republish(self) -> None:
        """Write every record of this collector's again (a new or emptied broker)."""
        self._unpublished |= self.history.mine
        self._wake()

    def _keep(self, record: deployment_pb2.DeploymentRecord) -> None:
        signed = sign_record(record, self._signer)
        self.history.add(signed, record)
        self.history.mine.add(record.rollout_id)
        try:
            self._queue.put_nowait(record.rollout_id)
        except asyncio.QueueFull:
            self._metrics.deployment_records.labels("dropped").inc()
            log.warning("deployment record queue full: rollout %s is served but not saved", record.rollout_id)

    def _wake(self) -> None:
        self._pending.set()

    # -- the writer task ------------------------------------------------------------------

    async def start(self) -> None:
        if not self._tasks:
            self._closed = False
            # what this collector saved may never have reached this broker (a new one, or away)
            self._unpublished |= {r for r in self.history.mine if self.history.get(r) is not None}
            self._pending.set()
            self._tasks = [
                asyncio.create_task(self._save_loop(), name="collector-deployments-save"),
                asyncio.create_task(self._publish_loop(), name="collector-deployments-publish"),
            ]

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Give queued records `grace_s` to be saved and published, then cancel; close the producer."""
        tasks, self._tasks = self._tasks, []
        if tasks:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), grace_s)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # one last try each, no retries: what is left stays in state_dir for the next start
            with contextlib.suppress(TimeoutError, KafkaError, OSError):
                await asyncio.wait_for(self._flush(), max(0.0, deadline - loop.time()))
        left = self._queue.qsize()
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        if left:
            self._metrics.deployment_records.labels("dropped").inc(left)
        async with self._producer_lock:  # a start under way ends first, then is stopped
            self._closed = True
            producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(KafkaError, TimeoutError, OSError):
                await asyncio.wait_for(producer.stop(), self._timeout_s)

    async def _flush(self) -> None:
        for rollout_id in sorted(self._unpublished):
            signed = self.history.signed(rollout_id)
            if signed is not None:
                await self._send(signed)
                self._metrics.deployment_records.labels("published").inc()
            self._unpublished.discard(rollout_id)

    async def _save_loop(self) -> None:
        """Save each queued record to state_dir at once, whatever the broker is doing."""
        while True:
            rollout_id = await self._queue.get()
            try:
                await self._save(rollout_id)
            except Exception:  # a bug here must not end the writer
                log.exception("saving the deployment record of %s failed", rollout_id)
            finally:
                self._queue.task_done()
            self._pending.set()

    async def _publish_loop(self) -> None:
        """Publish what was saved; what failed is tried again every `retry_interval_s`."""
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that comes as
            # the event fires, and stop() would wait for this loop forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.retry_interval_s):
                    await self._pending.wait()
            self._pending.clear()
            try:
                for rollout_id in sorted(self._unpublished):
                    if not await self._publish(rollout_id):
                        break  # the broker is away: the rest waits for the next round
            except Exception:  # a bug here must not end the writer
                log.exception("publishing deployment records failed")

    async def _save(self, rollout_id: str) -> None:
        signed, record = self.history.signed(rollout_id), self.history.get(rollout_id)
        if signed is None or record is None:
            return
        try:
            path = await asyncio.to_thread(self.history.save, signed, record)
        except (OSError, ValueError) as exc:
            self._metrics.deployment_records.labels("failed").inc()
            log.error("cannot save the deployment record of rollout %s: %s", rollout_id, exc)  # noqa: TRY400
        else:
            if path is not None:
                self._metrics.deployment_records.labels("saved").inc()
        self._unpublished.add(rollout_id)

    async def _publish(self, rollout_id: str) -> bool:
        """Write the newest signed record of a rollout to the topic, retrying; whether it went."""
        signed = self.history.signed(rollout_id)
        if signed is None:
            self._unpublished.discard(rollout_id)
            return True
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(MAX_ATTEMPTS) | stop_after_delay(MAX_RETRY_S),
                wait=wait_random_exponential(multiplier=BACKOFF_BASE_S, max=BACKOFF_MAX_S),
                retry=retry_if_exception_type((KafkaError, TimeoutError, OSError)),
                reraise=True,
            ):
                with attempt:
                    await self._send(signed)
        except (KafkaError, TimeoutError, OSError) as exc:
            self._metrics.deployment_records.labels("failed").inc()
            log.warning(
                "could not write the deployment record of rollout %s to %s: %s; trying again later",
                rollout_id,
                outrider.DEPLOYMENTS_TOPIC,
                exc or type(exc).__name__,
            )
            return False
        if self.history.signed(rollout_id) is signed:  # a newer revision may have come meanwhile
            self._unpublished.discard(rollout_id)
        self._metrics.deployment_records.labels("published").inc()
        return True

    async def _started(self) -> AIOKafkaProducer:
        async with self._producer_lock:
            if self._closed:
                raise KafkaError("the deployment recorder is stopped")
            if self._producer is None:
                self._producer = await start_producer(self._bootstrap, self._timeout_s)
            return self._producer

    async def _send(self, signed: outrider.SignedRecord) -> None:
        producer = await self._started()
        await asyncio.wait_for(
            producer.send_and_wait(
                outrider.DEPLOYMENTS_TOPIC, signed.value, key=signed.key, headers=list(signed.headers)
            ),
            self._timeout_s,
        )


Listener = Callable[[control_pb2.RolloutState, control_pb2.RolloutState | None], None]


def fan_out(*listeners: Listener) -> Listener:
    """One state listener that tells each of `listeners`; one's failure never skips the others."""

    def tell(state: control_pb2.RolloutState, previous: control_pb2.RolloutState | None) -> None:
        for listener in listeners:
            try:
                listener(state, previous)
            except Exception:
                log.exception("state listener failed for %s generation %d", state.agent, state.generation)

    return tell
