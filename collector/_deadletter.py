"""The dead-letter topic: records the collector cannot decode, kept with why.

Each goes to `outrider.deadletter` with its original key, value and headers, plus

    outrider-dlq-reason            the decoder's message
    outrider-dlq-reason-class      the short reason (also the metric label)
    outrider-dlq-source-topic      where it was read
    outrider-dlq-source-partition
    outrider-dlq-source-offset

and is counted in `outrider_collector_deadletter_total{reason}`. A write is retried through
tenacity, `ATTEMPTS` attempts in all, waiting `_BACKOFF_S` times the attempts made; one that
still fails is counted and logged, and the collector moves on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_incrementing

import outrider
from collector._metrics import CollectorMetrics
from collector._producer import start_producer

log = logging.getLogger(__name__)

REASON_HEADER = "outrider-dlq-reason"
REASON_CLASS_HEADER = "outrider-dlq-reason-class"
SOURCE_TOPIC_HEADER = "outrider-dlq-source-topic"
SOURCE_PARTITION_HEADER = "outrider-dlq-source-partition"
SOURCE_OFFSET_HEADER = "outrider-dlq-source-offset"
ATTEMPTS = 3
_BACKOFF_S = 0.5

# reason classes, by what the decoder said (outrider._envelope's messages)
NEWER_SCHEMA = "newer_schema"
BAD_SCHEMA_HEADER = "bad_schema_header"
UNKNOWN_TYPE = "unknown_type"
EMPTY = "empty"
MISSING_FIELDS = "missing_fields"
NOT_PROTOBUF = "not_protobuf"
UNDECODABLE = "undecodable"
_REASONS = (
    ("newer than", NEWER_SCHEMA),
    ("bad schema header", BAD_SCHEMA_HEADER),
    ("unexpected content type", UNKNOWN_TYPE),
    ("empty record", EMPTY),
    ("lacks", MISSING_FIELDS),
    ("not an outrider", NOT_PROTOBUF),
)


def reason_class(message: str) -> str:
    """A bounded label for a DecodeError message."""
    lowered = message.lower()
    return next((label for needle, label in _REASONS if needle in lowered), UNDECODABLE)


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    reason: str

    def record_headers(self) -> list[tuple[str, bytes]]:
        return [
            *self.headers,
            (REASON_HEADER, self.reason.encode("utf-8", "replace")[:1024]),
            (REASON_CLASS_HEADER, reason_class(self.reason).encode()),
            (SOURCE_TOPIC_HEADER, self.topic.encode()),
            (SOURCE_PARTITION_HEADER, str(self.partition).encode()),
            (SOURCE_OFFSET_HEADER, str(self.offset).encode()),
        ]


class DeadLetterWriter:
    """Produces dead letters and waits for the broker's ack; start/stop idempotent."""

    def __init__(
        self,
        bootstrap: str,
        timeout_s: float,
        metrics: CollectorMetrics,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._bootstrap, self._timeout_s, self._metrics = bootstrap, timeout_s, metrics
        self._sleep = sleep  # tenacity's wait between attempts (tests pass a recorder)
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._producer = await start_producer(self._bootstrap, self._timeout_s)

    async def write(self, letters: Sequence[DeadLetter]) -> int:
        """Write `letters` in order; the number written (the rest are counted as failures)."""
        written = 0
        for letter in letters:
            if await self._write_one(letter):
                written += 1
                self._metrics.deadletter.labels(reason_class(letter.reason)).inc()
            else:
                self._metrics.deadletter_failures.inc()
        return written

    async def _write_one(self, letter: DeadLetter) -> bool:
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(ATTEMPTS),
                wait=wait_incrementing(start=_BACKOFF_S, increment=_BACKOFF_S),
                retry=retry_if_exception_type((KafkaError, TimeoutError)),
                sleep=self._sleep,
                reraise=True,
            ):
                with attempt:
                    producer = self._producer
                    if producer is None:
                        log.error(
                            "dead-letter producer not started; dropping %s@%d", letter.topic, letter.offset
                        )
                        return False
                    await asyncio.wait_for(
                        producer.send_and_wait(
                            outrider.DEADLETTER_TOPIC,
                            letter.value,
                            key=letter.key,
                            headers=letter.record_headers(),
                        ),
                        self._timeout_s,
                    )
        except (KafkaError, TimeoutError) as exc:
            log.error(  # noqa: TRY400 - the reason is in the message
                "could not dead-letter %s[%d]@%d (%s): %s",
                letter.topic,
                letter.partition,
                letter.offset,
                letter.reason,
                exc or type(exc).__name__,
            )
            return False
        log.info(
            "dead-lettered %s[%d]@%d: %s",
            letter.topic,
            letter.partition,
            letter.offset,
            letter.reason,
        )
        return True

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
