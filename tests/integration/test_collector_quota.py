"""Global quotas through the embedded broker: usage reports from three fake sidecars on
`outrider.events`, grants read back from `outrider.control`, a lapsed lease, a restart."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

import outrider
from collector import Collector, CollectorSettings
from devstack.broker import EmbeddedBroker
from outrider.v1 import control_pb2, events_pb2
from tests.support import SECURE_COLLECTOR

pytestmark = pytest.mark.broker

RESOURCE = "openai/gpt-4o"
LIMIT = 30_000.0
KEY = b"quota/" + RESOURCE.encode()
REPORT_EVERY_S = 0.1
_ids = itertools.count()


def settings_for(broker: EmbeddedBroker, group_id: str) -> CollectorSettings:
    return CollectorSettings.model_validate(
        {
            "kafka_bootstrap": broker.bootstrap_servers,
            "group_id": group_id,
            "admin_listen": "127.0.0.1:0",
            "recovery_idle_s": 0.5,
            "grant_interval_s": 0.3,
            "lease_ttl_s": 1.0,
            "quotas": {RESOURCE: {"limit_tpm": LIMIT}},
            "state_dir": None,
            **SECURE_COLLECTOR,
        }
    )


def usage(sidecar: str, used: float, demand: float, resource: str = RESOURCE) -> events_pb2.Event:
    event = events_pb2.Event(
        event_id=f"usage-{next(_ids)}", time_unix_nano=time.time_ns(), agent="support-bot", sidecar_id=sidecar
    )
    event.usage.resource, event.usage.used_tpm, event.usage.demand_tpm = resource, used, demand
    return event


@contextlib.asynccontextmanager
async def reporting(broker: EmbeddedBroker, sidecars: dict[str, tuple[float, float]]) -> AsyncIterator[None]:
    """Each sidecar in `sidecars` (id -> (used, demand)) reports every REPORT_EVERY_S; delete
    one from the dict to make it go quiet."""
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    await producer.start()

    async def send(event: events_pb2.Event) -> None:
        value, headers = outrider.encode_event(event)
        await producer.send_and_wait(outrider.EVENTS_TOPIC, value, key=b"support-bot", headers=headers)

    async def loop() -> None:
        while True:
            for sidecar, (used, demand) in list(sidecars.items()):
                await send(usage(sidecar, used, demand))
            await asyncio.sleep(REPORT_EVERY_S)

    await send(usage("stray", 5, 5, resource="other/model"))
    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await producer.stop()


class GrantTail:
    """Every quota grant on `outrider.control`, read from the beginning."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.grants: list[control_pb2.QuotaGrant] = []
        self._consumer = AIOKafkaConsumer(
            outrider.CONTROL_TOPIC,
            bootstrap_servers=broker.bootstrap_servers,
            group_id=None,
            auto_offset_reset="earliest",
        )

    async def __aenter__(self) -> GrantTail:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def _poll(self, timeout_ms: int = 100) -> int:
        count = 0
        for records in (await self._consumer.getmany(timeout_ms=timeout_ms)).values():
            for record in records:
                if outrider.is_marker(record.key):
                    continue
                assert record.key == KEY
                message = outrider.decode_control(record.value, record.headers)
                assert message.WhichOneof("body") == "quota"
                self.grants.append(message.quota)
                count += 1
        return count

    async def until(
        self, holds: Callable[[control_pb2.QuotaGrant], bool], within: float = 20.0
    ) -> control_pb2.QuotaGrant:
        """The first grant read from now on for which `holds` is true."""
        deadline = time.monotonic() + within
        start = len(self.grants)
        while True:
            for grant in self.grants[start:]:
                if holds(grant):
                    return grant
            start = len(self.grants)
            assert time.monotonic() < deadline, f"timed out; last grants {self.grants[-3:]}"
            await self._poll()

    async def drain(self, quiet_s: float = 0.6) -> None:
        """Read until nothing has arrived for `quiet_s`."""
        while await self._poll(int(quiet_s * 1000)):
            pass


def sidecars_are(*ids: str) -> Callable[[control_pb2.QuotaGrant], bool]:
    return lambda grant: set(grant.grants_tpm) == set(ids)


def assert_valid(grants: list[control_pb2.QuotaGrant]) -> None:
    generations = [g.generation for g in grants]
    assert generations == sorted(set(generations)), "generations must strictly increase"
    for grant in grants:
        assert grant.resource == RESOURCE and grant.limit_tpm == LIMIT and grant.ttl_s == pytest.approx(0.9)
        assert sum(grant.grants_tpm.values()) <= LIMIT * (1 + 1e-9)


async def test_grants_follow_demand_move_on_lapse_and_survive_a_restart(broker: EmbeddedBroker) -> None:
    # used, demand: a and b are busy (2:1), c is idle
    sidecars = {"a": (20_000.0, 30_000.0), "b": (10_000.0, 15_000.0), "c": (0.0, 0.0)}
    async with reporting(broker, sidecars), GrantTail(broker) as tail:
        async with Collector(settings_for(broker, "first")) as collector:
            split = await tail.until(sidecars_are("a", "b", "c"))
            assert dict(split.grants_tpm) == pytest.approx({"a": 20_000, "b": 10_000, "c": 0})
            assert abs(split.issued_at_unix_nano - time.time_ns()) < 5e9

            del sidecars["b"]  # b goes quiet: its lease lapses and its share moves to a
            moved = await tail.until(sidecars_are("a", "c"))
            assert dict(moved.grants_tpm) == pytest.approx({"a": 30_000, "c": 0})

            registry = collector.metrics.registry
            sample = registry.get_sample_value
            assert sample("outrider_quota_limit_tokens_per_minute", {"resource": RESOURCE}) == LIMIT
            assert sample("outrider_quota_used_tokens_per_minute", {"resource": RESOURCE}) == 20_000
            assert sample("outrider_quota_demand_tokens_per_minute", {"resource": RESOURCE}) == 30_000
            granted = "outrider_quota_granted_tokens_per_minute"
            assert sample(granted, {"resource": RESOURCE, "sidecar": "a"}) == pytest.approx(30_000)
            assert sample(granted, {"resource": RESOURCE, "sidecar": "b"}) is None
            assert sample("outrider_quota_usage_reports_total", {"result": "unknown_resource"}) == 1
            accepted = sample("outrider_quota_usage_reports_total", {"result": "accepted"})
            assert accepted is not None and accepted > 10
            # usage reports are not requests: no series in the windows, no request counts
            assert collector.windows.series() == []
            assert not [s for m in registry.collect() if m.name == "outrider_requests" for s in m.samples]

        await tail.drain()
        last = tail.grants[-1].generation
        assert_valid(tail.grants)

        # a new collector reads the generations back and continues after them
        async with Collector(settings_for(broker, "second")):
            after = await tail.until(lambda grant: True)
            assert after.generation == last + 1
            resumed = await tail.until(sidecars_are("a", "c"))
            assert dict(resumed.grants_tpm) == pytest.approx({"a": 30_000, "c": 0})
        assert_valid(tail.grants)
