"""Webhook notifications of rollout state changes: HOLD, NO_DATA, ROLLED_BACK, PROMOTED, ABORTED.

The manager calls the notifier (a `StateListener`) after each published decision; it only
queues the body (bounded, dropping and counting when full), so a slow or dead webhook never
delays a decision. One background task owned by the collector posts each body to every URL,
retrying timeouts, connection errors, 429 and 5xx with jittered exponential backoff, bounded
by attempts and by time. Outcomes count in `outrider_collector_notifications_total{result}`:
sent, failed (after the retries, or a 4xx), dropped (the queue was full or shutdown came first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from collector._metrics import CollectorMetrics
from collector._settings import NotifySettings
from outrider.v1 import control_pb2

log = logging.getLogger(__name__)

NOTIFY_PHASES = frozenset(
    {
        control_pb2.ROLLOUT_PHASE_HOLD,
        control_pb2.ROLLOUT_PHASE_NO_DATA,
        control_pb2.ROLLOUT_PHASE_ROLLED_BACK,
        control_pb2.ROLLOUT_PHASE_PROMOTED,
        control_pb2.ROLLOUT_PHASE_ABORTED,
        control_pb2.ROLLOUT_PHASE_SWITCHED,  # blue-green: every new session just went to green
    }
)
QUEUE_SIZE = 256
MAX_ATTEMPTS = 5
MAX_RETRY_S = 60.0  # per body and URL, whatever the attempts left
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 10.0
STOP_GRACE_S = 3.0  # at shutdown, queued bodies get this long to go out
_ICONS = {"hold": ":pause_button:", "no_data": ":grey_question:", "rolled_back": ":rotating_light:"}


class _Retryable(Exception):
    """A 429 or 5xx answer: worth another attempt."""


class _Rejected(Exception):
    """A 4xx answer other than 429: the webhook will not take this body."""


def phase_name(phase: int) -> str:
    return control_pb2.RolloutPhase.Name(phase).removeprefix("ROLLOUT_PHASE_").lower()  # type: ignore[arg-type]


def notification_body(state: control_pb2.RolloutState) -> dict[str, Any]:
    """The JSON posted for `state`: Slack's `text` plus the structured fields."""
    phase = phase_name(state.phase)
    where = f"step {state.step_index + 1}/{state.step_count}, candidate weight {state.candidate_weight:.0%}"
    text = (
        f"{_ICONS.get(phase, ':information_source:')} {state.agent}: rollout {state.rollout_id} "
        f"{phase.replace('_', ' ').upper()} ({where}): {state.reason} (decided by {state.decided_by})"
    )
    if state.release:
        text += f"; released by {state.release}"
    return {
        "text": text,
        "agent": state.agent,
        "rollout_id": state.rollout_id,
        "phase": phase,
        "reason": state.reason,
        "release": state.release,
        "decided_by": state.decided_by,
        "decided_at_unix_nano": state.decided_at_unix_nano,
        "generation": state.generation,
        "weight": state.candidate_weight,
        "step": state.step_index + 1,
        "step_count": state.step_count,
        "stable_version_id": state.stable_version_id,
        "candidate_version_id": state.candidate_version_id,
        "gates": [
            {
                "name": g.name,
                "kind": g.kind or "gate",
                "metric": g.metric,
                "verdict": g.verdict,
                "estimate": g.estimate,
                "lower": g.lower,
                "upper": g.upper,
                "margin": g.margin,
                "unit": g.unit,
                "candidate_samples": g.candidate_samples,
                "baseline_samples": g.baseline_samples,
                "detail": g.detail,
            }
            for g in state.gate_results
        ],
    }


async def _post(session: aiohttp.ClientSession, target: NotifySettings, body: dict[str, Any]) -> None:
    timeout = aiohttp.ClientTimeout(total=target.timeout)
    async with session.post(target.url, json=body, timeout=timeout) as response:
        if response.status == 429 or response.status >= 500:
            raise _Retryable(f"HTTP {response.status}")
        if response.status >= 400:
            raise _Rejected(f"HTTP {response.status}")


class Notifier:
    """Queue and post notifications; `start`/`stop` idempotent, one owned task."""

    def __init__(
        self,
        targets: Sequence[NotifySettings],
        metrics: CollectorMetrics,
        queue_size: int = QUEUE_SIZE,
        backoff_base_s: float = BACKOFF_BASE_S,
    ) -> None:
        self._targets = list(targets)
        self._metrics = metrics
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_size)
        self._backoff_base_s = backoff_base_s
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def __call__(self, state: control_pb2.RolloutState, previous: control_pb2.RolloutState | None) -> None:
        """The manager's listener: queue a body when the phase changed to one that is told."""
        if not self._targets or state.phase not in NOTIFY_PHASES:
            return
        if previous is not None and previous.rollout_id == state.rollout_id and previous.phase == state.phase:
            return
        try:
            self._queue.put_nowait(notification_body(state))
        except asyncio.QueueFull:
            self._metrics.notifications.labels("dropped").inc(len(self._targets))
            log.warning("notification queue full: dropped %s generation %d", state.agent, state.generation)

    async def start(self) -> None:
        if self._task is not None or not self._targets:
            return
        self._session = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run(), name="collector-notify")

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Give queued bodies `grace_s` to go out, then cancel; count what is left as dropped."""
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), grace_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left = self._queue.qsize()
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        if left:
            self._metrics.notifications.labels("dropped").inc(left * len(self._targets))
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _run(self) -> None:
        while True:
            body = await self._queue.get()
            try:
                await asyncio.gather(*(self._send(target, body) for target in self._targets))
            except asyncio.CancelledError:  # shutdown cut it short: it never went out
                self._metrics.notifications.labels("dropped").inc(len(self._targets))
                raise
            finally:
                self._queue.task_done()

    async def _send(self, target: NotifySettings, body: dict[str, Any]) -> None:
        assert self._session is not None
        session = self._session
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(MAX_ATTEMPTS) | stop_after_delay(MAX_RETRY_S),
                wait=wait_random_exponential(multiplier=self._backoff_base_s, max=BACKOFF_MAX_S),
                retry=retry_if_exception_type((aiohttp.ClientError, TimeoutError, _Retryable)),
                reraise=True,
            ):
                with attempt:
                    await _post(session, target, body)
        except (aiohttp.ClientError, TimeoutError, _Retryable, _Rejected) as exc:
            self._metrics.notifications.labels("failed").inc()
            # the URL may carry a secret (Slack's does): log only its host
            host = target.url.split("/")[2] if target.url.count("/") >= 2 else "?"
            log.warning(
                "notification of %s %s to %s failed: %s",
                body["agent"],
                body["phase"],
                host,
                exc or type(exc).__name__,
            )
            return
        self._metrics.notifications.labels("sent").inc()
