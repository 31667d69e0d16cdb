"""Tails `outrider.control` from the beginning and feeds this agent's rollout states to the Router,
global-quota grants (`quota/<resource>`) to `GlobalQuotas` and feature flags
(`flag/<agent>/<name>`) to the flag book (`sidecar.flags._book`).

Every record is verified first (`outrider.open_control`): unsigned, badly signed and
unknown-key records are dropped, counted (`outrider_control_rejected_total{reason}`) and
logged at a limited rate with key id and offset. A verified rollout state is applied only
when it is newer by (epoch, generation) and not issued before the state in hand; it is then
persisted (`state_path`, the record as it was on the topic, with the newest record of each
flag) and loaded, verified again, at the next start. Replaying a topic that lacks it (a new
broker) changes nothing.

The end of the replay is found without `end_offsets`: the tailer writes a marker record
(`marker/<client id>/<nonce>`) to every partition and waits until it reads them back, then
deletes them with tombstones. `ready` is set once a state is known: loaded from disk, or
the replay reached its markers.

No consumer group (every sidecar reads everything), so a new replica catches up by
replaying the topic. While Kafka is unreachable the task retries with backoff and the
sidecar keeps serving with the last state it applied (tenacity, `BACKOFF`, cut short by stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
    wait_random_exponential,
)

import outrider
from outrider.v1 import control_pb2
from sidecar.flags._book import FlagBook
from sidecar.resilience._global_quota import GlobalQuotas
from sidecar.routing._router import Router
from sidecar.telemetry._metrics import SidecarMetrics

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
POLL_TIMEOUT_MS = 500
# how often the consumer refreshes metadata: finds the topic soon after its first record
METADATA_MAX_AGE_MS = 1000
MARKER_TIMEOUT_S = 10.0
STOP_WAIT_S = 3.0
# after the nth failure in a row: min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2**(n - 1)) times a
# uniform 0.5 to 1.0 jitter (half of it fixed, the other half tenacity's full jitter)
BACKOFF = wait_exponential(multiplier=BACKOFF_INITIAL_S / 2, max=BACKOFF_MAX_S / 2) + wait_random_exponential(
    multiplier=BACKOFF_INITIAL_S / 2, max=BACKOFF_MAX_S / 2
)


class ControlTailer:
    def __init__(
        self,
        bootstrap_servers: str,
        router: Router,
        metrics: SidecarMetrics,
        *,
        verifier: outrider.Verifier,
        client_id: str = "outrider-sidecar",
        quotas: GlobalQuotas | None = None,
        state_path: Path | None = None,
        flags: FlagBook | None = None,
    ) -> None:
        self._quotas = quotas
        self._flags = flags
        self._bootstrap = bootstrap_servers
        self._router = router
        self._metrics = metrics
        self._verifier = verifier
        self._client_id = client_id
        self._state_path = state_path
        self._issued_at = 0  # of the rollout state in hand
        self._rejects = outrider.RejectLog(log)
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._pending_markers: dict[int, bytes] = {}
        self._consumer: AIOKafkaConsumer | None = None  # while connected
        self._producer: AIOKafkaProducer | None = None  # writes the markers; None on an empty topic
        # what `state_path` keeps: the newest applied rollout record and each flag's (written by
        # the task, off the loop, when `_dirty`)
        self._rollout_record: outrider.SignedRecord | None = None
        self._flag_records: dict[bytes, outrider.SignedRecord] = {}
        self._dirty = False
        self.ready = asyncio.Event()
        # called with every state applied, after the router took it (e.g. shadow work ending)
        self.listeners: list[Callable[[control_pb2.RolloutState], None]] = []
        self.records_seen = 0
        self.rejected = 0
        self.state_source = ""  # "disk" or "topic" once ready

    async def start(self) -> None:
        if self._task is None:
            if not self._verifier.key_ids:
                log.warning(
                    "control: no public keys configured (control.public_keys, %s): "
                    "every signed control record will be rejected",
                    "OUTRIDER_CONTROL_PUBLIC_KEYS",
                )
            await self._load_persisted()
            self._task = asyncio.create_task(self._run(), name="outrider-control-tailer")

    async def stop(self) -> None:
        """Let the task leave its Kafka clients at a safe point (cancelling one half-started leaks
        its connection), within STOP_WAIT_S; cancel it after that."""
        task = self._task
        if task is None or self._closing.is_set():
            return
        self._closing.set()
        await asyncio.wait({task}, timeout=STOP_WAIT_S)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.persist()

    # -- records ---------------------------------------------------------------------------

    def handle(
        self,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        *,
        key: bytes | None = None,
        offset: int = -1,
        persist: bool = True,
    ) -> bool:
        """Verify and apply one control record; return whether it changed the rollout state (or a flag)."""
        self.records_seen += 1
        if outrider.is_marker(key) or value is None:
            return False  # markers and tombstones are never applied
        verdict, message = outrider.open_control(self._verifier, key, value, headers)
        if message is None:
            self._reject(verdict.reason, verdict.key_id, offset, key)
            return False
        if not verdict.signed:
            self._metrics.control_unsigned_applied.inc()
        body = message.WhichOneof("body")
        if body == "quota":
            return self._quotas is not None and self._quotas.apply(message.quota)
        if body == "flag":
            if not self._apply_flag(message.flag):
                return False
            self._keep(self._flag_records, key, value, headers, persist)
            return True
        if body != "rollout" or message.rollout.agent != self._router.agent:
            return False
        state = message.rollout
        if not self._router.is_newer(state):
            if outrider.ordering(state) < self._router.ordering:
                self._reject("stale", verdict.key_id, offset, key, warn=False)
            return False
        if verdict.issued_at_ns and verdict.issued_at_ns < self._issued_at:
            self._reject("stale", verdict.key_id, offset, key)
            return False
        if not self.apply(state):
            return False
        self._issued_at = max(self._issued_at, verdict.issued_at_ns)
        self._rollout_record = outrider.SignedRecord(key, value, tuple(headers or ()))
        self._dirty |= persist and self._state_path is not None
        return True

    def _keep(
        self,
        records: dict[bytes, outrider.SignedRecord],
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]] | None,
        persist: bool,
    ) -> None:
        records[key or b""] = outrider.SignedRecord(key, value, tuple(headers or ()))
        self._dirty |= persist and self._state_path is not None

    def _apply_flag(self, state: control_pb2.FlagState) -> bool:
        if self._flags is None or state.agent != self._router.agent:
            return False
        unknown = self._flags.unknown
        applied = self._flags.apply(state)
        if self._flags.unknown > unknown:
            self._metrics.flag_unknown.labels(state.agent).inc()
        return applied

    def _reject(self, reason: str, key_id: str, offset: int, key: bytes | None, *, warn: bool = True) -> None:
        self.rejected += 1
        self._metrics.control_rejected.labels(reason).inc()
        if reason == "undecodable":
            self._metrics.control_undecodable.inc()
        if warn:
            self._rejects.rejected(reason, key_id, offset, key)

    def apply(self, state: control_pb2.RolloutState) -> bool:
        before = self._router.unknown_version_states
        if not self._router.apply(state):
            return False
        if self._router.unknown_version_states > before:
            self._metrics.rollout_unknown_version.labels(state.agent).inc()
        self._metrics.set_rollout(state)
        log.info(
            "control: applied %s rollout %s epoch %d generation %d: phase %s, candidate %s weight %.3f (%s)",
            state.agent,
            state.rollout_id,
            state.epoch,
            state.generation,
            control_pb2.RolloutPhase.Name(state.phase),
            state.candidate_version_id,
            state.candidate_weight,
            state.reason or "no reason given",
        )
        for listener in self.listeners:
            listener(state)
        return True

    # -- persisted state -------------------------------------------------------------------

    async def _load_persisted(self) -> None:
        if self._state_path is None:
            return
        try:
            records, _ = await asyncio.to_thread(outrider.load_records, self._state_path)
        except ValueError as exc:
            log.error("control: ignoring persisted state: %s", exc)  # noqa: TRY400
            return
        applied = False
        for record in records:
            applied |= self.handle(record.value, list(record.headers), key=record.key, persist=False)
        if applied:
            self.state_source = "disk"
            self._set_ready()
            log.info(
                "control: using persisted state from %s (generation %d) until the topic is replayed",
                self._state_path,
                self._router.generation,
            )

    async def persist(self) -> None:
        """Write the newest applied rollout record and the flags' to `state_path` (in a thread: it
        fsyncs), when one changed."""
        if not self._dirty or self._state_path is None:
            return
        self._dirty = False
        records = [r for r in (self._rollout_record,) if r is not None] + list(self._flag_records.values())
        try:
            await asyncio.to_thread(outrider.save_records, self._state_path, records)
        except OSError as exc:
            log.warning("control: cannot persist the control state to %s: %s", self._state_path, exc)

    def _set_ready(self) -> None:
        if not self.ready.is_set():
            self.ready.set()
            self._metrics.control_ready.set(1)

    # -- the end of the replay -------------------------------------------------------------

    async def _write_markers(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=False,
            request_timeout_ms=int(MARKER_TIMEOUT_S * 1000),
        )
        try:
            await producer.start()
            partitions = await asyncio.wait_for(
                producer.partitions_for(outrider.CONTROL_TOPIC), MARKER_TIMEOUT_S
            )
            pending = {}
            for partition in sorted(partitions):
                key = f"{outrider.MARKER_KEY_PREFIX}{self._client_id}/{secrets.token_hex(8)}".encode()
                await asyncio.wait_for(
                    producer.send_and_wait(outrider.CONTROL_TOPIC, b"marker", key=key, partition=partition),
                    MARKER_TIMEOUT_S,
                )
                pending[partition] = key
        except BaseException:
            await producer.stop()
            raise
        self._pending_markers = pending
        return producer

    async def _saw_marker(self, partition: int, key: bytes | None, producer: AIOKafkaProducer) -> None:
        if self._pending_markers.get(partition) != key:
            return
        del self._pending_markers[partition]
        await producer.send(outrider.CONTROL_TOPIC, None, key=key, partition=partition)  # tombstone
        if not self._pending_markers:
            await producer.flush()  # the tombstones; the producer is closed when the task leaves
            if not self.ready.is_set():
                self.state_source = "topic"
            self._set_ready()
            log.info(
                "control: replayed %s to the end (generation %d, %d records rejected)",
                outrider.CONTROL_TOPIC,
                self._router.generation,
                self.rejected,
            )

    def _replayed_empty(self) -> None:
        if not self.ready.is_set():
            self.state_source = "topic"
            log.info("control: %s does not exist yet; nothing to replay", outrider.CONTROL_TOPIC)
        self._set_ready()

    # -- the connection -------------------------------------------------------------------

    async def _run(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((KafkaError, TimeoutError)),
            wait=BACKOFF,
            sleep=self._sleep,
            before_sleep=self._unavailable,
            reraise=True,
        )
        try:
            while not self._closing.is_set():
                # a fresh count of failures (so the shortest backoff) once connected
                async for attempt in retrying:
                    with attempt:
                        await self._step()
        finally:
            await self._disconnect()

    async def _sleep(self, seconds: float) -> None:
        """tenacity ``sleep=``: the backoff, cut short by stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _unavailable(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "control: Kafka at %s unavailable (%s); serving generation %d, retrying",
            self._bootstrap,
            type(exc).__name__,
            self._router.generation,
        )

    async def _step(self) -> None:
        """Connect, or tail until stop. Raises KafkaError or TimeoutError when Kafka fails, the
        clients closed."""
        if self._closing.is_set():
            return
        if self._consumer is None:
            await self._connect()
            return
        try:
            await self._tail()
        finally:
            await self._disconnect()

    async def _connect(self) -> None:
        consumer = AIOKafkaConsumer(
            outrider.CONTROL_TOPIC,
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
        )
        producer: AIOKafkaProducer | None = None
        try:
            await consumer.start()
            if outrider.CONTROL_TOPIC not in await consumer.topics():
                # nothing to replay (a new broker): known to be empty. The topic is the
                # collector's to create (compacted); a marker would auto-create it plain.
                self._replayed_empty()
            else:
                producer = await self._write_markers()
        except BaseException:
            await consumer.stop()
            raise
        self._consumer, self._producer = consumer, producer
        log.info("control: tailing %s at %s", outrider.CONTROL_TOPIC, self._bootstrap)

    async def _tail(self) -> None:
        consumer, producer = self._consumer, self._producer
        assert consumer is not None
        while not self._closing.is_set():
            batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            for tp, records in batches.items():
                for record in records:
                    if outrider.is_marker(record.key):
                        if producer is not None:
                            await self._saw_marker(tp.partition, record.key, producer)
                        continue
                    self.handle(
                        record.value,
                        list(record.headers or ()),
                        key=record.key,
                        offset=record.offset,
                    )
            await self.persist()

    async def _disconnect(self) -> None:
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        if producer is not None:
            await producer.stop()
        if consumer is not None:
            await consumer.stop()
