"""Tails `outrider.control` from the beginning and feeds this agent's rollout states to the Router
and global-quota grants (`quota/<resource>`) to `GlobalQuotas`.

No consumer group (every sidecar reads everything; the newest generation wins), so a new
replica catches up by replaying the topic. Other agents' records are ignored, undecodable
ones counted. While Kafka is unreachable the task retries with backoff and the sidecar
keeps serving with the last state it applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

import outrider
from outrider.v1 import control_pb2
from sidecar._global_quota import GlobalQuotas
from sidecar._metrics import SidecarMetrics
from sidecar._router import Router

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
POLL_TIMEOUT_MS = 500
# how often the consumer refreshes metadata: finds the topic soon after its first record
METADATA_MAX_AGE_MS = 1000


class ControlTailer:
    def __init__(
        self,
        bootstrap_servers: str,
        router: Router,
        metrics: SidecarMetrics,
        *,
        client_id: str = "outrider-sidecar",
        quotas: GlobalQuotas | None = None,
    ) -> None:
        self._quotas = quotas
        self._bootstrap = bootstrap_servers
        self._router = router
        self._metrics = metrics
        self._client_id = client_id
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self.records_seen = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outrider-control-tailer")

    async def stop(self) -> None:
        task = self._task
        if task is None or self._closing.is_set():
            return
        self._closing.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def handle(self, value: bytes | None, headers: list[tuple[str, bytes]] | None) -> bool:
        """Apply one control record; return whether it changed the rollout state."""
        self.records_seen += 1
        try:
            message = outrider.decode_control(value, headers)
        except outrider.DecodeError as exc:
            self._metrics.control_undecodable.inc()
            log.warning("control: skipping undecodable record: %s", exc)
            return False
        body = message.WhichOneof("body")
        if body == "quota":
            return self._quotas is not None and self._quotas.apply(message.quota)
        if body != "rollout":
            return False
        return self.apply(message.rollout)

    def apply(self, state: control_pb2.RolloutState) -> bool:
        before = self._router.unknown_version_states
        if not self._router.apply(state):
            return False
        if self._router.unknown_version_states > before:
            self._metrics.rollout_unknown_version.labels(state.agent).inc()
        self._metrics.set_rollout(state)
        log.info(
            "control: applied %s rollout %s generation %d: phase %s, candidate %s weight %.3f (%s)",
            state.agent,
            state.rollout_id,
            state.generation,
            control_pb2.RolloutPhase.Name(state.phase),
            state.candidate_version_id,
            state.candidate_weight,
            state.reason or "no reason given",
        )
        return True

    async def _run(self) -> None:
        backoff = BACKOFF_INITIAL_S
        while not self._closing.is_set():
            consumer = AIOKafkaConsumer(
                outrider.CONTROL_TOPIC,
                bootstrap_servers=self._bootstrap,
                client_id=self._client_id,
                group_id=None,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                metadata_max_age_ms=METADATA_MAX_AGE_MS,
            )
            try:
                await consumer.start()
                log.info("control: tailing %s at %s", outrider.CONTROL_TOPIC, self._bootstrap)
                backoff = BACKOFF_INITIAL_S
                while True:
                    batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
                    for records in batches.values():
                        for record in records:
                            self.handle(record.value, list(record.headers or ()))
            except KafkaError as exc:
                log.warning(
                    "control: Kafka at %s unavailable (%s); serving generation %d, retrying",
                    self._bootstrap,
                    type(exc).__name__,
                    self._router.generation,
                )
            finally:
                await consumer.stop()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_MAX_S)
