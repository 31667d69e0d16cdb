"""The collector: wires the consumer, windows, controllers, admin API and metrics.

Start: create topics; start the control, dead-letter and command writers; read
`outrider.control` back (rollout and quota generations continue from it) while joining the
events consumer group, whose first assignment restores each partition's checkpoint and then
its rollouts (`collector._takeover`); start the notifier, the deployment recorder and history
tail (`outrider.deployments`; state_dir copies first), the consume, tick, republish and watch
loops and (with quotas configured, on the owner of partition 0) the grant loop; serve metrics
and the admin API, which relays calls for agents another replica owns.
Stop (idempotent) runs the reverse: admin server and command relay, the loops, the notifier
(queued webhooks get a few seconds), consume loop (it finishes its batch), checkpoint and
offset commit, consumer, producers, metrics server. `collector._process.run` runs one as a
process.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import socket
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

from aiokafka.errors import KafkaError

import outrider
from collector._admin import AdminAuth, AdminServer
from collector._bluegreen_phase import blue_baseline
from collector._book import EvidenceBook
from collector._checkpoint import CheckpointStore
from collector._commands import CommandBus
from collector._config_errors import SpecError
from collector._consumer import EventConsumer
from collector._control import ControlHistory, ControlPublisher, ensure_topics, read_control_history
from collector._control_state import BrokerWatch, StateCopy
from collector._deadletter import DeadLetter, DeadLetterWriter
from collector._flag_metrics import FlagMetrics
from collector._flags import FlagRegistry
from collector._granter import QuotaGranter
from collector._history import DeploymentHistory
from collector._ingest import Ingestor
from collector._manager import RolloutManager
from collector._metrics import CollectorMetrics, MetricsServer
from collector._notify import Notifier
from collector._ownership import Ownership
from collector._quota_book import QuotaBook
from collector._recorder import DeploymentRecorder, fan_out
from collector._registry import RegistryView
from collector._relay import SpanRelay
from collector._settings import CollectorSettings, otlp_endpoint
from collector._takeover import Takeover
from collector._usage_relay import GRANTER_PARTITION, UsageRelay
from collector._windows import RollingWindows
from outrider.clock import Clock, SystemClock

log = logging.getLogger(__name__)

_CONSUME_STOP_S = 5.0  # the consume loop's last poll and batch (dead letters included)
_CANCEL_WAIT_S = 5.0  # a cancelled task's time to unwind at stop


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _signing_key(settings: CollectorSettings) -> outrider.SigningKey:
    if settings.signing_key_file is None:
        key = outrider.SigningKey.generate()
        log.warning(
            "no control signing key (signing_key_file, $OUTRIDER_CONTROL_SIGNING_KEY_FILE): signing with a "
            "throwaway key %s that no sidecar trusts; create one with `outrider keygen`",
            key.key_id,
        )
        return key
    try:
        key = outrider.SigningKey.load(settings.signing_key_file)
    except outrider.SigningKeyError as exc:
        raise SpecError("<settings>", [f"signing_key_file: {exc}"]) from None
    log.info("signing control records with key %s", key.key_id)
    return key


class Collector:
    """The control plane of one deployment. Use `async with Collector(settings):`."""

    def __init__(self, settings: CollectorSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.metrics = CollectorMetrics()
        self.windows = RollingWindows(settings.bucket_s, settings.retention_s, settings.dedupe_cache_size)
        self.signer = _signing_key(settings)
        try:
            trusted = outrider.load_public_keys(settings.control_public_keys)
        except outrider.SigningKeyError as exc:
            raise SpecError("<settings>", [f"control_public_keys: {exc}"]) from None
        self.verifier = outrider.Verifier([*trusted, self.signer.public], settings.control_verify)
        self._publisher = ControlPublisher(settings.kafka_bootstrap, settings.publish_timeout_s, self.signer)
        self._copy = StateCopy(
            settings.state_dir / f"{_safe(settings.group_id)}.control.json" if settings.state_dir else None
        )
        self._publisher.on_rollout = self._save_copy
        self.replica = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        # one marker key per replica: on a compacted topic a key shared by replicas keeps only
        # the newest marker, and the others would take their compacted marker for a new broker
        self._watch = BrokerWatch(
            settings.kafka_bootstrap, f"{settings.group_id}/{self.replica}", settings.publish_timeout_s
        )
        self.evidence = EvidenceBook()
        self.metrics.watch_shadow(self.evidence.shadows)
        self.notifier = Notifier(settings.notify, self.metrics)
        self.ownership = Ownership()
        # ended rollouts' records: served from here, written by the replica that ended them
        self.history = DeploymentHistory(
            self.verifier,
            settings.state_dir,
            lambda _: self.metrics.deployment_records.labels("rejected").inc(),
        )
        self.recorder = DeploymentRecorder(
            self.history,
            lambda agent: self.rollouts.get(agent),
            self.windows,
            self.signer,
            settings.kafka_bootstrap,
            settings.publish_timeout_s,
            settings.retention_s,
            self.metrics,
            owns=lambda agent: self.ownership.owns(agent),
        )
        self.rollouts = RolloutManager(
            self._publisher,
            self.windows,
            self.metrics,
            self.clock,
            self.evidence,
            settings.retention_s,
            listener=fan_out(self.notifier, self.recorder),
            ownership=self.ownership,
        )
        self.rollouts.baseline_of = lambda agent, blue: blue_baseline(self.history.records(), agent, blue)
        self.takeover = Takeover(
            self.ownership,
            self.rollouts,
            self._publisher,
            self._fresh_history,
            settings.recovery_timeout_s + settings.recovery_idle_s,
        )
        # relayed admin calls are always verified, whatever control_verify says
        self._bus = CommandBus(
            settings.kafka_bootstrap,
            self.signer,
            outrider.Verifier([*trusted, self.signer.public], "enforce"),
            self.replica,
            self.ownership,
            self.metrics,
            settings.publish_timeout_s,
        )
        book = QuotaBook(settings.quotas, settings.lease_ttl_s, settings.grant_ttl_s, self.clock)
        self.quotas = QuotaGranter(book, self._publisher, self.metrics)
        self.registry = RegistryView(
            settings.kafka_bootstrap, self._publisher, self.verifier, self.rollouts.sightings, self.metrics
        )
        self.flags = FlagRegistry(self._publisher, FlagMetrics(), self.clock)
        self._admin = AdminServer(
            self.rollouts,
            settings.admin_listen,
            AdminAuth(
                settings.admin_tokens_file,
                settings.admin_tls_cert,
                settings.admin_tls_key,
                settings.admin_tls_client_ca,
                settings.admin_reflection,
            ),
            bus=self._bus,
            replica=self.replica,
            relay_timeout_s=settings.relay_timeout_s,
            history=self.history,
            registry=self.registry,
            flags=self.flags,
        )
        self._metrics_server = (
            MetricsServer(self.metrics.registry, settings.metrics_host, settings.metrics_port)
            if settings.metrics_port is not None
            else None
        )
        self._ingestor = Ingestor(
            self.windows, self.metrics, self.quotas, self.evidence, self.rollouts.sightings
        )
        self._ingestor.flag_metrics = self.flags.metrics
        self._usage_relay = UsageRelay(
            settings.kafka_bootstrap,
            settings.publish_timeout_s,
            lambda: self.ownership.holds(GRANTER_PARTITION),
        )
        if self.quotas.book.resources:  # every replica's usage reports reach the one granter
            self._ingestor.usage_relay = self._usage_relay
        self.rollouts.events_missing = lambda agent: self._ingestor.gaps.missing_by_agent.get(agent, 0)
        self._deadletter = DeadLetterWriter(
            settings.kafka_bootstrap, settings.publish_timeout_s, self.metrics
        )
        self.checkpoints = (
            CheckpointStore(settings.state_dir, settings.group_id) if settings.state_dir is not None else None
        )
        self._consumer: EventConsumer | None = None
        endpoint = otlp_endpoint(settings)
        self.relay = (
            SpanRelay(
                settings.kafka_bootstrap,
                endpoint,
                group_id=f"{settings.group_id}-spans",
                on_undecodable=self._dead_letter_span,
            )
            if endpoint is not None
            else None
        )
        if self.relay is not None:
            self.metrics.watch_relay(self.relay)
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopped = False

    @property
    def admin_address(self) -> str:
        """The admin API's bound "host:port" (after start)."""
        if not self._admin.address:
            raise RuntimeError("the collector is not started")
        return self._admin.address

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.bound_port if self._metrics_server is not None else None

    async def start(self) -> None:
        if self._started:
            return
        if self._stopped:
            raise RuntimeError("a stopped collector cannot be started again")
        self._started = True
        s = self.settings
        try:
            await ensure_topics(s.kafka_bootstrap, s.topic_partitions)
            self.history.load_dir()
            self._consumer = EventConsumer(
                s.kafka_bootstrap,
                s.group_id,
                self._ingestor,
                self.clock,
                s.max_batch_records,
                deadletter=self._deadletter,
                store=self.checkpoints,
                checkpoint_interval_s=s.checkpoint_interval_s,
                session_timeout_ms=s.session_timeout_ms,
                heartbeat_interval_ms=s.heartbeat_interval_ms,
                ownership=self.ownership,
            )
            self._consumer.on_revoked = self.takeover.revoked
            self._consumer.on_assigned = self.takeover.assigned
            self._consumer.on_released = self.takeover.released
            # writers first: a takeover at the first assignment may publish
            await self._publisher.start()
            await self._deadletter.start()
            await self._bus.start()
            await self.registry.start()
            await self._recover_while_joining(self._consumer)
            try:
                await self._watch.mark()
            except (KafkaError, TimeoutError) as exc:
                log.warning("could not write the broker incarnation marker: %s", exc or type(exc).__name__)
            await self.notifier.start()
            await self.recorder.start()
            self._spawn(self.history.tail(s.kafka_bootstrap), "history")
            if self.relay is not None:
                await self.relay.start()
            self._spawn(self._consumer.run(), "consume")
            self._spawn(self._tick_loop(), "tick")
            self._spawn(self._republish_loop(), "republish")
            self._spawn(self._watch_loop(), "watch")
            if self.quotas.book.resources:
                self._spawn(self._grant_loop(), "grant")
            if self._metrics_server is not None:
                await self._metrics_server.start()
            await self._admin.start()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "collector started: kafka %s, group %s, admin %s",
            s.kafka_bootstrap,
            s.group_id,
            self.admin_address,
        )

    def _rejected(self, reason: str) -> None:
        self.metrics.control_rejected.labels(reason).inc()

    def _merge_copy(self, history: ControlHistory) -> None:
        """Take from the state copy every agent whose state there is newer than the topic's
        (all of them on a new broker); they are republished right after."""
        copy = self._copy.load(self.verifier, self._rejected)
        for agent, record in copy.latest.items():
            mine, theirs = copy.newest(agent), history.newest(agent)
            assert mine is not None
            if theirs is None or outrider.ordering(mine) > outrider.ordering(theirs):
                log.warning(
                    "%s: the control topic lacks generation %d (epoch %d); restoring it from %s",
                    agent,
                    mine.generation,
                    mine.epoch,
                    self._copy.path,
                )
                history.rollouts.setdefault(agent, []).append(mine)
                history.latest[agent] = record
        history.max_epoch = max(history.max_epoch, copy.max_epoch)

    async def _save_copy(self) -> None:
        await self._copy.save(self._publisher.latest, self.verifier)

    async def _recover_while_joining(self, consumer: EventConsumer) -> None:
        """Read the control topic back while the consumer joins its group (that takes seconds);
        the first assignment's takeover waits for this history, not for the join to end."""
        s = self.settings
        joining = asyncio.create_task(consumer.start())
        try:
            history = await read_control_history(
                s.kafka_bootstrap, s.recovery_idle_s, s.recovery_timeout_s, self.verifier, self._rejected
            )
            self._merge_copy(history)
            self.quotas.book.restore(history.quota_generations)
            self.flags.restore(history.flags)
            self._publisher.epoch = max(history.max_epoch + 1, int(time.time()), self._publisher.epoch)
            self._publisher.latest.update(history.latest)
            self.takeover.startup(history)
        finally:
            await asyncio.wait([joining])  # settled either way before stop() may run
            if not joining.cancelled() and (error := joining.exception()) is not None:
                raise error

    async def _fresh_history(self) -> ControlHistory:
        """The control topic read back now (a takeover), with the state copy merged in."""
        s = self.settings
        history = await read_control_history(
            s.kafka_bootstrap, s.recovery_idle_s, s.recovery_timeout_s, self.verifier, self._rejected
        )
        self._merge_copy(history)
        self.flags.restore(history.flags)  # a takeover: the flags' generations continue
        return history

    async def _dead_letter_span(self, record: Any, reason: str) -> None:
        """The span relay's hook: an undecodable `outrider.spans` record goes to the dead letters."""
        letter = DeadLetter(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            list(record.headers or ()),
            reason,
        )
        await self._deadletter.write([letter])

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"collector-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("collector task %s died", task.get_name(), exc_info=task.exception())

    async def _tick_loop(self) -> None:
        while True:
            try:
                await self.rollouts.tick()
                self.recorder.take_baselines(self.clock.now())
            except Exception:
                log.exception("rollout tick failed; trying again next tick")
            await asyncio.sleep(self.settings.tick_interval_s)

    async def _republish_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.republish_interval_s)
            try:
                await self.rollouts.republish()
            except Exception:
                log.exception("republishing the control state failed; trying again next interval")

    async def _watch_loop(self) -> None:
        """Every `broker_check_interval_s`: is the incarnation marker still there? If not, this
        is a new or emptied broker: re-create the topics, write the state again, read the
        events from the start of the new log, and mark the new incarnation."""
        while True:
            await asyncio.sleep(self.settings.broker_check_interval_s)
            try:
                if await self._watch.lost():
                    await self.recover_new_broker()
            except (KafkaError, TimeoutError, OSError) as exc:
                log.debug("broker check failed: %s", exc or type(exc).__name__)
            except Exception:
                log.exception("broker check failed")

    async def recover_new_broker(self) -> None:
        s = self.settings
        self.metrics.new_broker.inc()
        log.warning(
            "kafka %s is a new or emptied broker (the incarnation marker is gone): re-creating "
            "topics, republishing %d rollout states, consuming %s from its start",
            s.kafka_bootstrap,
            len(self._publisher.latest),
            "outrider.events",
        )
        await ensure_topics(s.kafka_bootstrap, s.topic_partitions)
        await self.rollouts.republish()
        self.recorder.republish()
        await self.registry.republish()
        if self._consumer is not None:
            await self._consumer.reset_positions()
        await self._watch.mark()

    async def _grant_loop(self) -> None:
        """Publish grants every grant interval, at a fixed rate. The first waits one interval,
        so the sidecars' reports (which come more often) have renewed their leases by then."""
        loop = asyncio.get_running_loop()
        interval = self.settings.grant_interval_s
        due = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                if GRANTER_PARTITION in self.ownership.ready:  # one granter: partition 0's owner
                    await self.quotas.tick()
            except Exception:
                log.exception("quota grant tick failed; trying again next interval")
            due += interval
            if due < loop.time():  # a tick overran: skip the missed beats rather than bunch up
                due = loop.time() + interval

    async def _settle(self, name: str, timeout_s: float) -> None:
        """Give a task that was asked to stop `timeout_s` to return; cancel it after that."""
        tasks = [t for t in self._tasks if t.get_name() == f"collector-{name}"]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        await self._cancel(name)

    async def _cancel(self, name: str) -> None:
        """Cancel a task and wait for it, at most `_CANCEL_WAIT_S`: a task that swallows its
        cancellation must not hang the stop, and its stack is logged so it can be found."""
        for task in [t for t in self._tasks if t.get_name() == f"collector-{name}"]:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=_CANCEL_WAIT_S)
            if not done:
                stack = io.StringIO()
                task.print_stack(limit=8, file=stack)
                log.error(
                    "collector task %s did not stop within %.0fs; leaving it\n%s",
                    name,
                    _CANCEL_WAIT_S,
                    stack.getvalue(),
                )
            elif not task.cancelled() and task.exception() is not None:
                log.debug("collector task %s ended with %r", name, task.exception())
            self._tasks.discard(task)

    async def stop(self) -> None:
        """Stop everything in dependency order; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        await self._admin.stop()
        await self._bus.stop()
        await self.registry.stop()
        await self._cancel("watch")
        await self._cancel("republish")
        await self._cancel("grant")
        await self._cancel("tick")
        await self.notifier.stop()  # after the loop and the admin API that decide
        await self._cancel("history")
        await self.recorder.stop()  # saved to state_dir first; the topic gets a few seconds
        if self._consumer is not None:
            self._consumer.request_stop()
            await self._settle("consume", _CONSUME_STOP_S)
            await self._consumer.stop()  # checkpoints and commits what was processed
        await self._cancel("consume")
        await self.takeover.stop()
        await self._usage_relay.stop()
        if self.relay is not None:
            await self.relay.stop()  # before the dead-letter writer its hook uses
        await self._deadletter.stop()
        await self._publisher.stop()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        log.info("collector stopped")

    async def __aenter__(self) -> Collector:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
