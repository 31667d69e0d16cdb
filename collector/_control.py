"""The Kafka side of control state: create topics (`outrider.control` compacted), read
`outrider.control` back (verified rollout states and the last quota generation per
resource), publish signed rollout states and quota grants.

Every record read back is verified like a sidecar does (`outrider.open_control`), so a forged
record never reaches a restarted collector either; rejected ones are counted by reason.
Every record written is signed with the collector's key, under the key
`rollout/<agent>`, `quota/<resource>` or `flag/<agent>/<name>`; the last signed record of each agent is kept
(`latest`) for the state copy and the periodic republish.

Nothing here relies on `end_offsets` (the embedded test broker answers it wrongly): the
control topic is read from the beginning until it has been quiet for a moment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

import outrider
from collector._producer import start_producer
from outrider.v1 import control_pb2

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36
_POLL_MS = 200
# compacted: the last record of every key stays for good (rollout/<agent> never expires)
CONTROL_TOPIC_CONFIGS = {"cleanup.policy": "compact"}


async def ensure_topics(bootstrap: str, partitions: int, timeout_s: float = 10.0) -> None:
    """Create the events, spans, control, versions, commands, dead-letter and deployments topics
    if missing; a failure is logged, not raised (brokers with auto-creation still work). The
    spans topic is made even when this collector does not relay it: sidecars write to it, and
    a topic auto-created under a first burst of writes stalled their producers for seconds on
    the embedded broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await admin.start()
        topics = [
            NewTopic(outrider.EVENTS_TOPIC, partitions, 1),
            NewTopic(outrider.CONTROL_TOPIC, 1, 1, topic_configs=CONTROL_TOPIC_CONFIGS),
            # compacted too: the last record of every <agent>/<version id> stays for good
            NewTopic(outrider.VERSIONS_TOPIC, 1, 1, topic_configs=CONTROL_TOPIC_CONFIGS),
            NewTopic(outrider.DEADLETTER_TOPIC, 1, 1),
            NewTopic(outrider.COMMANDS_TOPIC, partitions, 1),
            NewTopic(outrider.SPANS_TOPIC, partitions, 1),
            # the last record of every rollout stays for good: its deployment record
            NewTopic(outrider.DEPLOYMENTS_TOPIC, 1, 1, topic_configs=CONTROL_TOPIC_CONFIGS),
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
    latest: dict[str, outrider.SignedRecord] = field(default_factory=dict)  # newest record, by agent
    flags: list[control_pb2.FlagState] = field(default_factory=list)  # feature flags' states
    max_epoch: int = 0
    records: int = 0  # every record read, rejected ones included

    def newest(self, agent: str) -> control_pb2.RolloutState | None:
        states = self.rollouts.get(agent)
        return max(states, key=outrider.ordering) if states else None


def _take(history: ControlHistory, record: outrider.SignedRecord, message: control_pb2.ControlMessage) -> str:
    """Add one verified message; what it was ("rollout", "quota" or "")."""
    body = message.WhichOneof("body")
    if body == "rollout" and (agent := message.rollout.agent):
        state = message.rollout
        newest = history.newest(agent)
        history.rollouts.setdefault(agent, []).append(state)
        history.max_epoch = max(history.max_epoch, state.epoch)
        if newest is None or outrider.ordering(state) > outrider.ordering(newest):
            history.latest[agent] = record
        return "rollout"
    if body == "quota" and (resource := message.quota.resource):
        generations = history.quota_generations
        generations[resource] = max(generations.get(resource, 0), message.quota.generation)
        history.max_epoch = max(history.max_epoch, message.quota.epoch)
        return "quota"
    if body == "flag" and message.flag.agent:
        history.flags.append(message.flag)
        history.max_epoch = max(history.max_epoch, message.flag.epoch)
        return "flag"
    return ""


def add_record(
    history: ControlHistory,
    verifier: outrider.Verifier,
    record: outrider.SignedRecord,
    on_reject: Callable[[str], None] | None = None,
    *,
    verdicts: list[outrider.Verdict] | None = None,
) -> str:
    """Verify one record and add it to `history`; what it was, or "" (rejected or skipped)."""
    if outrider.is_marker(record.key) or not record.value:
        return ""
    verdict, message = outrider.open_control(verifier, record.key, record.value, record.headers)
    if message is None:
        if on_reject is not None:
            on_reject(verdict.reason)
        if verdicts is not None:
            verdicts.append(verdict)
        return ""
    return _take(history, record, message)


async def read_control_history(
    bootstrap: str,
    idle_s: float,
    timeout_s: float,
    verifier: outrider.Verifier,
    on_reject: Callable[[str], None] | None = None,
) -> ControlHistory:
    """Every verified rollout state and the highest quota generation on `outrider.control`,
    read from the beginning until nothing arrived for `idle_s` (counted from the moment
    partitions are assigned). Rejected records are passed to `on_reject` by reason."""
    consumer = AIOKafkaConsumer(
        outrider.CONTROL_TOPIC,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    history = ControlHistory()
    rejects = outrider.RejectLog(log)
    verdicts: list[outrider.Verdict] = []
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
                    history.records += 1
                    signed = outrider.SignedRecord(
                        record.key, record.value or b"", tuple(record.headers or ())
                    )
                    kind = add_record(history, verifier, signed, on_reject, verdicts=verdicts)
                    if verdicts:
                        skipped += 1
                        verdict = verdicts.pop()
                        rejects.rejected(verdict.reason, verdict.key_id, record.offset, record.key)
                    count += kind == "rollout"
                    grants += kind == "quota"
            if quiet_since is not None and loop.time() - quiet_since >= idle_s:
                break
        else:
            log.warning(
                "reading %s back took longer than %.1fs; using what was read",
                outrider.CONTROL_TOPIC,
                timeout_s,
            )
        log.info(
            "read %d rollout states for %d agents and %d quota grants for %d resources from %s (%d rejected)",
            count,
            len(history.rollouts),
            grants,
            len(history.quota_generations),
            outrider.CONTROL_TOPIC,
            skipped,
        )
    finally:
        await consumer.stop()
    return history


class ControlPublisher:
    """Writes signed records to `outrider.control`, waiting for the broker's ack: rollout
    states keyed `rollout/<agent>`, quota grants keyed `quota/<resource>`. Every state it
    writes carries its `epoch`."""

    def __init__(self, bootstrap: str, timeout_s: float, signer: outrider.SigningKey) -> None:
        self._bootstrap, self._timeout_s = bootstrap, timeout_s
        self._signer = signer
        self._producer: AIOKafkaProducer | None = None
        self.epoch = 0
        self.latest: dict[str, outrider.SignedRecord] = {}  # the newest rollout record, by agent
        # awaited after a rollout record was acknowledged (the collector saves its state copy)
        self.on_rollout: Callable[[], Awaitable[None]] | None = None

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._producer = await start_producer(self._bootstrap, self._timeout_s)

    async def publish(self, state: control_pb2.RolloutState) -> None:
        """Stamp the epoch on `state` and write it, signed; raises KafkaError or TimeoutError
        when the write is not acknowledged."""
        state.epoch = self.epoch
        record = self.sign(control_pb2.ControlMessage(rollout=state), outrider.rollout_key(state.agent))
        await self.send(record)
        self.latest[state.agent] = record
        if self.on_rollout is not None:
            await self.on_rollout()

    async def publish_quota(self, grant: control_pb2.QuotaGrant) -> None:
        """Write one grant, signed; raises KafkaError or TimeoutError when the write is not acknowledged."""
        grant.epoch = self.epoch
        await self.send(
            self.sign(control_pb2.ControlMessage(quota=grant), outrider.quota_key(grant.resource))
        )

    async def publish_flag(self, state: control_pb2.FlagState) -> None:
        """Write one feature flag's state, signed, under `flag/<agent>/<name>`; raises KafkaError or
        TimeoutError when the write is not acknowledged."""
        state.epoch = self.epoch
        key = outrider.flag_key(state.agent, state.name)
        await self.send(self.sign(control_pb2.ControlMessage(flag=state), key))

    def sign(self, message: control_pb2.ControlMessage, key: bytes) -> outrider.SignedRecord:
        value, headers = outrider.encode_control(message)
        return outrider.SignedRecord(key, value, (*headers, *self._signer.sign(key, value)))

    def sign_record(self, key: bytes, value: bytes) -> outrider.SignedRecord:
        """A record signed with the collector's key, as it goes on the topic."""
        return outrider.SignedRecord(key, value, tuple(self._signer.sign(key, value)))

    async def send(self, record: outrider.SignedRecord, topic: str = outrider.CONTROL_TOPIC) -> int:
        """Write one record as it is (a republish sends the same bytes); its offset."""
        if self._producer is None:
            raise KafkaError("the control producer is not started")
        metadata = await asyncio.wait_for(
            self._producer.send_and_wait(topic, record.value, key=record.key, headers=list(record.headers)),
            self._timeout_s,
        )
        return int(metadata.offset)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes what is pending
