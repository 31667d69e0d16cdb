"""QuotaGranter: grants published through a (faked) control publisher, failures counted, metrics."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError

from collector import ManualClock
from collector._granter import QuotaGranter
from collector._metrics import CollectorMetrics
from collector._quota_book import QuotaBook, UsageIngest
from collector._settings import QuotaSettings
from outrider.v1 import control_pb2, events_pb2

GPT = "openai/gpt-4o"


class FlakyPublisher:
    def __init__(self) -> None:
        self.written: list[control_pb2.QuotaGrant] = []
        self.failures = 0

    async def publish_quota(self, grant: control_pb2.QuotaGrant) -> None:
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("broker gone")
        self.written.append(grant)


def usage(sidecar: str, used: float, demand: float, resource: str = GPT) -> events_pb2.Event:
    event = events_pb2.Event(event_id=f"{sidecar}-{used}-{demand}", agent="bot", sidecar_id=sidecar)
    event.usage.resource, event.usage.used_tpm, event.usage.demand_tpm = resource, used, demand
    return event


def sample(metrics: CollectorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_publishes_counts_failures_and_shows_the_split() -> None:
    clock, metrics, publisher = ManualClock(), CollectorMetrics(), FlakyPublisher()
    book = QuotaBook({GPT: QuotaSettings(limit_tpm=30_000)}, lease_ttl_s=10, grant_ttl_s=15, clock=clock)
    granter = QuotaGranter(book, publisher, metrics)
    assert sample(metrics, "outrider_quota_limit_tokens_per_minute", resource=GPT) == 30_000

    assert granter.observe(usage("a", 20_000, 30_000)) is UsageIngest.ACCEPTED
    assert granter.observe(usage("b", 5_000, 10_000)) is UsageIngest.ACCEPTED
    assert granter.observe(usage("x", 1, 1, resource="other/model")) is UsageIngest.UNKNOWN_RESOURCE
    assert sample(metrics, "outrider_quota_usage_reports_total", result="accepted") == 2
    assert sample(metrics, "outrider_quota_usage_reports_total", result="unknown_resource") == 1

    publisher.failures = 1
    assert await granter.tick() == []
    assert sample(metrics, "outrider_quota_grant_publish_failures_total", resource=GPT) == 1
    assert sample(metrics, "outrider_quota_granted_tokens_per_minute", resource=GPT, sidecar="a") is None

    (grant,) = await granter.tick()
    assert grant.generation == 2  # 1 may have landed: never reused
    assert publisher.written == [grant]
    assert sample(metrics, "outrider_quota_granted_tokens_per_minute", resource=GPT, sidecar="a") == (
        pytest.approx(22_500)
    )
    assert sample(metrics, "outrider_quota_granted_tokens_per_minute", resource=GPT, sidecar="b") == (
        pytest.approx(7_500)
    )
    assert sample(metrics, "outrider_quota_used_tokens_per_minute", resource=GPT) == 25_000
    assert sample(metrics, "outrider_quota_demand_tokens_per_minute", resource=GPT) == 40_000
    assert sample(metrics, "outrider_quota_sidecars", resource=GPT) == 2
    assert sample(metrics, "outrider_quota_grants_published_total", resource=GPT) == 1

    clock.advance(6)
    granter.observe(usage("a", 20_000, 30_000))
    clock.advance(5)  # b's lease lapses
    (grant,) = await granter.tick()
    assert dict(grant.grants_tpm) == pytest.approx({"a": 30_000}) and grant.generation == 3
    assert sample(metrics, "outrider_quota_granted_tokens_per_minute", resource=GPT, sidecar="a") == 30_000
    assert sample(metrics, "outrider_quota_granted_tokens_per_minute", resource=GPT, sidecar="b") is None
    assert sample(metrics, "outrider_quota_demand_tokens_per_minute", resource=GPT) == 30_000
