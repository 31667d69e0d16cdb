"""The Kafka side of control state: create topics, read `outrider.control` back (rollout
states and the last quota generation per resource), publish rollout states and quota grants.

Nothing here relies on `end_offsets` (the embedded test broker answers it wrongly): the
control topic is read from the beginning until it has been quiet for a moment.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

import outrider
from collector._quota_book import quota_key
from outrider.v1 import control_pb2

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36
_POLL_MS = 200


async def ensure_topics(bootstrap: str, partitions: int, timeout_s: float = 10.0) -> None:
    """Create the events, spans, control and dead-letter topics if missing; a failure is
    logged, not raised (brokers with auto-creation still work). The spans topic is made even
    when this collector does not relay it: sidecars write to it, and a topic auto-created
    under a first burst of writes stalled their producers for seconds on the embedded broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await admin.start()
        topics = [
            NewTopic(outrider.EVENTS_TOPIC, partitions, 1),
            NewTopic(outrider.CONTROL_TOPIC, 1, 1),
            NewTopic(outrider.DEADLETTER_TOPIC, 1, 1),
            NewTopic(outrider.SPANS_TOPIC, partitions, 1),
        ]
        response = await admin.create_topics(topics)
        for topic, code, *rest in response.topic_errors:
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                log.warning("could not create topic %s: error %d %s", topic, code, rest[0] if rest else "")
    except KafkaError as exc:
        log.warning("could not create topics on %s: %s", bootstrap, exc)
    finally:
        await admin.close()


@dataclass
class ControlHistory:
    """What `outrider.control` holds, as a restarting collector needs it."""

    rollouts: dict[str, list[control_pb2.RolloutState]] = field(default_factory=dict)  # by agent
    quota_generations: dict[str, int] = field(default_factory=dict)  # highest, by resource


async def read_control_history(bootstrap: str, idle_s: float, timeout_s: float) -> ControlHistory:
    """Every rollout state and the highest quota generation on `outrider.control`, read from
    the beginning until nothing arrived for `idle_s` (counted from the moment partitions are
    assigned)."""
    consumer = AIOKafkaConsumer(
        outrider.CONTROL_TOPIC,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    states: dict[str, list[control_pb2.RolloutState]] = defaultdict(list)
    generations: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    try:
        await consumer.start()
        deadline = loop.time() + timeout_s
        quiet_since: float | None = None
        count = grants = skipped = 0
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
                    body = message.WhichOneof("body")
                    if body == "rollout" and message.rollout.agent:
                        states[message.rollout.agent].append(message.rollout)
                        count += 1
                    elif body == "quota" and (resource := message.quota.resource):
                        generations[resource] = max(generations.get(resource, 0), message.quota.generation)
                        grants += 1
            if quiet_since is not None and loop.time() - quiet_since >= idle_s:
                break
        else:
            log.warning(
                "reading %s back took longer than %.1fs; using what was read",
                outrider.CONTROL_TOPIC,
                timeout_s,
            )
        log.info(
            "read %d rollout states for %d agents and %d quota grants for %d resources from %s (%d skipped)",
            count,
            len(states),
            grants,
            len(generations),
            outrider.CONTROL_TOPIC,
            skipped,
        )
    finally:
        await consumer.stop()
    return ControlHistory(dict(states), generations)


class ControlPublisher:
    """Writes to `outrider.control`, waiting for the broker's ack: rollout states keyed by
    agent, quota grants keyed `quota/<resource>`."""

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
        await self._send(control_pb2.ControlMessage(rollout=state), outrider.agent_key(state.agent))

    async def publish_quota(self, grant: control_pb2.QuotaGrant) -> None:
        """Write one grant; raises KafkaError or TimeoutError when the write is not acknowledged."""
        await self._send(control_pb2.ControlMessage(quota=grant), quota_key(grant.resource))

    async def _send(self, message: control_pb2.ControlMessage, key: bytes) -> None:
        if self._producer is None:
            raise KafkaError("the control producer is not started")
        value, headers = outrider.encode_control(message)
        await asyncio.wait_for(
            self._producer.send_and_wait(outrider.CONTROL_TOPIC, value, key=key, headers=headers),
            self._timeout_s,
        )

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes what is pending
