"""The collector's retries through tenacity: the relay's jittered backoff, the dead-letter
writer's attempts and waits, and a shutdown that cancels a retry wait cleanly."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from tenacity import RetryCallState

from collector._deadletter import ATTEMPTS, DeadLetter, DeadLetterWriter
from collector._metrics import CollectorMetrics
from collector._otlp_export import JitteredBackoff, pause


def state(attempt_number: int) -> RetryCallState:
    retry_state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    retry_state.attempt_number = attempt_number
    return retry_state


def test_jittered_backoff_doubles_within_20_percent_up_to_the_cap() -> None:
    backoff = JitteredBackoff(0.5, 5.0, random.Random(7))
    for attempt, base in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (60, 5.0)]:
        for _ in range(50):
            assert 0.8 * base <= backoff(state(attempt)) <= 1.2 * base


async def test_pause_is_cut_short_by_stop() -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, stopping.set)
    began = loop.time()
    await pause(stopping, 30.0)
    assert loop.time() - began < 1.0


class FailingProducer:
    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    async def send_and_wait(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise KafkaConnectionError("broker down")

    async def stop(self) -> None:
        pass


def letter() -> DeadLetter:
    return DeadLetter("outrider.events", 0, 41, b"k", b"\x00", [], "empty record")


def writer(producer: FailingProducer, waits: list[float]) -> tuple[DeadLetterWriter, CollectorMetrics]:
    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    metrics = CollectorMetrics()
    dead = DeadLetterWriter("127.0.0.1:1", 1.0, metrics, sleep=sleep)
    dead._producer = producer  # type: ignore[assignment]
    return dead, metrics


async def test_a_dead_letter_is_retried_with_growing_waits_then_written() -> None:
    waits: list[float] = []
    producer = FailingProducer(failures=ATTEMPTS - 1)
    dead, metrics = writer(producer, waits)
    assert await dead.write([letter()]) == 1
    assert producer.calls == ATTEMPTS
    assert waits == [0.5, 1.0]
    assert metrics.deadletter_failures._value.get() == 0


async def test_a_dead_letter_that_keeps_failing_is_counted_after_three_attempts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    waits: list[float] = []
    producer = FailingProducer(failures=10)
    dead, metrics = writer(producer, waits)
    assert await dead.write([letter()]) == 0
    assert producer.calls == ATTEMPTS
    assert waits == [0.5, 1.0]
    assert metrics.deadletter_failures._value.get() == 1
    assert "could not dead-letter outrider.events[0]@41 (empty record)" in caplog.text


async def test_a_dead_letter_retry_wait_is_cancelled_cleanly() -> None:
    waiting = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waiting.set()
        await asyncio.sleep(seconds)

    producer = FailingProducer(failures=10)
    metrics = CollectorMetrics()
    dead = DeadLetterWriter("127.0.0.1:1", 1.0, metrics, sleep=sleep)
    dead._producer = producer  # type: ignore[assignment]
    task = asyncio.create_task(dead.write([letter()]))
    await waiting.wait()  # the first attempt failed; tenacity waits to retry
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert producer.calls == 1
    assert metrics.deadletter_failures._value.get() == 0
