"""Admin calls relayed to the replica that owns the agent, over `outrider.commands`.

Every replica reads the whole topic without a consumer group: each must see the commands for
the agents it owns and the answers to the commands it sent. The replica that authenticated
the caller sends an `AdminCommand`, signed with the collector key, and sends it again every
`RESEND_S` until an answer comes or its deadline passes, so a command written while the owner
changes is run by the next one. The owner runs a command only when
- its signature verifies (always enforced: this topic can steer a rollout),
- its deadline has not passed,
- it was sent after this replica became the agent's owner (a new owner never replays what its
  predecessor ran; a resend carries a new send time),
- its id has not been run here already (the answer is sent again instead).
Answers are signed the same way and verified by the waiting replica.

Nothing here relies on `ListOffsets` being exact: reading starts at the reported end, and a
start too early only meets expired commands, too late only misses what the resend repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from cachetools import TTLCache
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_fixed

import outrider
from collector._metrics import CollectorMetrics
from collector._ownership import Ownership
from collector._producer import start_producer
from outrider.v1 import commands_pb2

log = logging.getLogger(__name__)

RESEND_S = 1.0
_POLL_MS = 200
NOT_OWNER = -1  # a handler's "not mine (any more)": no answer; the resend finds the owner
_MAX_RUNNING = 16  # commands run at once here (they queue on the rollout lock anyway)

# method, request bytes, caller -> (gRPC status code value, message, response bytes)
Handler = Callable[[str, bytes, str], Awaitable[tuple[int, str, bytes]]]


def _read_failed(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else "?"
    log.warning("reading %s failed: %s; retrying", outrider.COMMANDS_TOPIC, exc)


class NoAnswer(Exception):
    """No replica answered a relayed command before its deadline."""


class CommandBus:
    def __init__(
        self,
        bootstrap: str,
        signer: outrider.SigningKey,
        verifier: outrider.Verifier,
        replica: str,
        ownership: Ownership,
        metrics: CollectorMetrics,
        publish_timeout_s: float = 10.0,
    ) -> None:
        self._bootstrap, self._signer, self._verifier = bootstrap, signer, verifier
        self.replica, self._ownership, self._metrics = replica, ownership, metrics
        self._publish_timeout_s = publish_timeout_s
        self.handler: Handler | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(_MAX_RUNNING)
        self._waiting: dict[str, asyncio.Future[commands_pb2.AdminAnswer]] = {}
        self._answers: TTLCache[str, commands_pb2.AdminAnswer] = TTLCache(maxsize=10_000, ttl=300)
        self._in_hand: set[str] = set()
        self._rejects = outrider.RejectLog(log)

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
        )
        consumer.subscribe([outrider.COMMANDS_TOPIC])
        producer = await start_producer(self._bootstrap, self._publish_timeout_s)
        try:
            await consumer.start()
        except BaseException:
            await producer.stop()
            await consumer.stop()
            raise
        self._producer, self._consumer = producer, consumer
        self._reader = asyncio.create_task(self._read(), name="collector-commands")

    async def stop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(self._running)
        for future in self._waiting.values():
            future.cancel()
        for client in (self._consumer, self._producer):
            if client is not None:
                await client.stop()
        self._consumer = self._producer = None

    async def forward(
        self, agent: str, method: str, request: bytes, caller: str, timeout_s: float
    ) -> commands_pb2.AdminAnswer:
        """Relay one admin call to the agent's owner and wait for its answer; NoAnswer after
        `timeout_s`, KafkaError/TimeoutError when the command cannot be written at all."""
        command_id = uuid.uuid4().hex
        deadline = time.time_ns() + int(timeout_s * 1e9)
        future: asyncio.Future[commands_pb2.AdminAnswer] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        try:
            while True:
                command = commands_pb2.AdminCommand(
                    command_id=command_id,
                    agent=agent,
                    method=method,
                    request=request,
                    caller=caller,
                    from_replica=self.replica,
                    sent_unix_nano=time.time_ns(),
                    deadline_unix_nano=deadline,
                )
                await self._send(agent, commands_pb2.CommandRecord(command=command))
                self._metrics.commands.labels("sent").inc()
                left = until - loop.time()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(future), min(RESEND_S, left))
                if loop.time() >= until:
                    break
        finally:
            self._waiting.pop(command_id, None)
            future.cancel()
        self._metrics.commands.labels("timeout").inc()
        partition = self._ownership.partition(agent)
        raise NoAnswer(
            f"no collector replica answered for agent {agent!r} (events partition "
            f"{partition if partition is not None else '?'}) within {timeout_s:g}s: is its owner "
            "running, or is a rebalance under way? Try again"
        )

    async def _send(self, agent: str, record: commands_pb2.CommandRecord) -> None:
        if self._producer is None:
            raise KafkaError("the commands producer is not started")
        key = outrider.agent_key(agent)
        value = record.SerializeToString()
        headers = self._signer.sign(key, value)
        await asyncio.wait_for(
            self._producer.send_and_wait(outrider.COMMANDS_TOPIC, value, key=key, headers=headers),
            self._publish_timeout_s,
        )

    async def _read(self) -> None:
        while True:
            for records in (await self._fetch()).values():
                for record in records:
                    self._take(record)

    async def _fetch(self) -> dict[Any, list[Any]]:
        """getmany, retried through tenacity every `RESEND_S` while Kafka fails (until stop
        cancels the reader)."""
        assert self._consumer is not None
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(KafkaError),
            wait=wait_fixed(RESEND_S),
            before_sleep=_read_failed,
            reraise=True,
        ):
            with attempt:
                batch: dict[Any, list[Any]] = await self._consumer.getmany(
                    timeout_ms=_POLL_MS, max_records=500
                )
                return batch
        raise AssertionError("unreachable: tenacity without a stop returns or raises")

    def _take(self, record: object) -> None:
        key, value = getattr(record, "key", None), getattr(record, "value", None) or b""
        verdict = self._verifier.verify(key, value, getattr(record, "headers", None))
        if not (verdict.ok and verdict.signed):
            self._metrics.commands.labels("rejected").inc()
            self._rejects.rejected(
                verdict.reason or "unsigned", verdict.key_id, getattr(record, "offset", -1), key
            )
            return
        try:
            message = commands_pb2.CommandRecord.FromString(value)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError and others
            self._metrics.commands.labels("rejected").inc()
            return
        body = message.WhichOneof("body")
        if body == "answer":
            future = self._waiting.get(message.answer.command_id)
            if future is not None and not future.done():
                future.set_result(message.answer)
        elif body == "command" and key == outrider.agent_key(message.command.agent or "?"):
            self._consider(message.command)

    def _consider(self, command: commands_pb2.AdminCommand) -> None:
        if not self._ownership.owns(command.agent):
            return  # another replica's agent (or nobody's yet: the resend finds the owner)
        if time.time_ns() > command.deadline_unix_nano:
            self._metrics.commands.labels("expired").inc()
            return
        since = self._ownership.since(command.agent)
        if since is None or command.sent_unix_nano < since * 1e9:
            self._metrics.commands.labels("not_owner").inc()  # sent before this replica owned it
            return
        if command.command_id in self._in_hand:
            return
        answer = self._answers.get(command.command_id)
        if answer is not None:
            self._metrics.commands.labels("duplicate").inc()
            self._spawn(self._answer(command, answer))
            return
        self._in_hand.add(command.command_id)
        self._spawn(self._run(command))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, command: commands_pb2.AdminCommand) -> None:
        try:
            async with self._slots:
                if self.handler is None:
                    return
                code, message, response = await self.handler(command.method, command.request, command.caller)
                if code == NOT_OWNER:
                    return  # ownership moved while it waited: the next owner takes the resend
                answer = commands_pb2.AdminAnswer(
                    command_id=command.command_id,
                    code=code,
                    message=message,
                    response=response,
                    replica=self.replica,
                )
                self._answers[command.command_id] = answer
                self._metrics.commands.labels("run").inc()
                await self._answer(command, answer)
        except Exception:
            log.exception("running relayed command %s for %s failed", command.method, command.agent)
        finally:
            self._in_hand.discard(command.command_id)

    async def _answer(self, command: commands_pb2.AdminCommand, answer: commands_pb2.AdminAnswer) -> None:
        try:
            await self._send(command.agent, commands_pb2.CommandRecord(answer=answer))
            self._metrics.commands.labels("answered").inc()
        except (KafkaError, TimeoutError) as exc:
            log.warning(
                "answering command %s failed: %s (the resend is answered again)", command.command_id, exc
            )
