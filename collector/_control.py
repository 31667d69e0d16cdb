"""The Kafka side of rollout state: create topics, read `outrider.control` back, publish to it.

Nothing here relies on `end_offsets` (the embedded test broker answers it wrongly): the
control topic is read from the beginning until it has been quiet for a moment.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

import outrider
from outrider.v1 import control_pb2

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36
_POLL_MS = 200


async def ensure_topics(bootstrap: str, partitions: int, timeout_s: float = 10.0) -> None:
    """Create the events and control topics if missing; a failure is logged, not raised
    (brokers with auto-creation still work)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(outrider.EVENTS_TOPIC, partitions, 1), NewTopic(outrider.CONTROL_TOPIC, 1, 1)]
        )
        for topic, code, *rest in response.topic_errors:
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                log.warning("could not create topic %s: error %d %s", topic, code, rest[0] if rest else "")
    except KafkaError as exc:
        log.warning("could not create topics on %s: %s", bootstrap, exc)
    finally:
        await admin.close()


async def read_control_states(
    bootstrap: str, idle_s: float, timeout_s: float
) -> dict[str, list[control_pb2.RolloutState]]:
    """Every rollout state on `outrider.control`, by agent, read from the beginning until
    nothing arrived for `idle_s` (counted from the moment partitions are assigned)."""
    consumer = AIOKafkaConsumer(
        outrider.CONTROL_TOPIC,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    states: dict[str, list[control_pb2.RolloutState]] = defaultdict(list)
    loop = asyncio.get_running_loop()
    try:
        await consumer.start()
        deadline = loop.time() + timeout_s
        quiet_since: float | None = None
        count = skipped = 0
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=_POLL_MS, max_records=1000)
            if batch or (consumer.assignment() and quiet_since is None):
                quiet_since = loop.time()
            for records in batch.values():
                for record in records:
                    try:
                        message = outrider.decode_control(record.value, record.headers)
                    except outrider.DecodeError as exc:
                        skipped += 1
                        log.warning(
                            "skipping undecodable control record at offset %d: %s", record.offset, exc
                        )
                        continue
                    if message.WhichOneof("body") == "rollout" and message.rollout.agent:
                        states[message.rollout.agent].append(message.rollout)
                        count += 1
            if quiet_since is not None and loop.time() - quiet_since >= idle_s:
                break
        else:
            log.warning(
                "reading %s back took longer than %.1fs; using what was read",
                outrider.CONTROL_TOPIC,
                timeout_s,
            )
        log.info(
            "read %d rollout states for %d agents from %s (%d skipped)",
            count,
            len(states),
            outrider.CONTROL_TOPIC,
            skipped,
        )
    finally:
        await consumer.stop()
    return dict(states)


class ControlPublisher:
    """Writes rollout states to `outrider.control`, keyed by agent, waiting for the broker's ack."""

    def __init__(self, bootstrap: str, timeout_s: float) -> None:
        self._bootstrap, self._timeout_s = bootstrap, timeout_s
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self._producer is not None:
            return
        # the embedded broker lacks InitProducerId, so no idempotent producer
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            acks="all",
            enable_idempotence=False,
            request_timeout_ms=max(1000, int(self._timeout_s * 1000)),
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def publish(self, state: control_pb2.RolloutState) -> None:
        """Write one state; raises KafkaError or TimeoutError when the write is not acknowledged."""
        if self._producer is None:
            raise KafkaError("the control producer is not started")
        value, headers = outrider.encode_control(control_pb2.ControlMessage(rollout=state))
        await asyncio.wait_for(
            self._producer.send_and_wait(
                outrider.CONTROL_TOPIC, value, key=outrider.agent_key(state.agent), headers=headers
            ),
            self._timeout_s,
        )

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes what is pending
