"""Per-upstream protection state: one circuit breaker and one retry budget per upstream
("provider:openai/gpt-4o", "tool:lookup_order"), shared by every version and call that
uses it. Breaker transitions become `breaker` events and the breaker-state gauge."""

from __future__ import annotations

import logging

from outrider.clock import Clock
from outrider.v1 import events_pb2
from sidecar._version_config import BreakerSettings, RetryBudgetSettings
from sidecar.resilience._breaker import BreakerConfig, BreakerState, CircuitBreaker
from sidecar.resilience._retry import RetryBudget
from sidecar.routing._versions import Tier
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.telemetry._producer import TelemetryProducer
from sidecar.telemetry._producer_policy import new_event_id
from sidecar.telemetry._series import SeriesCache

log = logging.getLogger(__name__)

STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def breaker_config(settings: BreakerSettings) -> BreakerConfig:
    return BreakerConfig(
        consecutive_failures=settings.consecutive_failures,
        failure_rate=settings.failure_rate,
        window_s=settings.window,
        min_requests=settings.min_requests,
        cooldown_s=settings.cooldown,
        cooldown_max_s=settings.cooldown_max,
        half_open_probes=settings.half_open_probes,
    )


class Upstreams:
    def __init__(
        self,
        *,
        agent: str,
        sidecar_id: str,
        clock: Clock,
        metrics: SidecarMetrics,
        telemetry: TelemetryProducer,
    ) -> None:
        self._agent = agent
        self._sidecar_id = sidecar_id
        self._clock = clock
        self.metrics = metrics
        self._telemetry = telemetry
        self._breakers: dict[str, CircuitBreaker] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._series = SeriesCache()

    def breaker(self, upstream: str, settings: BreakerSettings) -> CircuitBreaker:
        breaker = self._breakers.get(upstream)
        if breaker is None:  # the first version to use an upstream sets its breaker's config
            breaker = self._breakers[upstream] = CircuitBreaker(
                upstream, breaker_config(settings), self._clock
            )
            self.metrics.breaker_state.labels(upstream).set(0)
        return breaker

    def budget(self, upstream: str, settings: RetryBudgetSettings) -> RetryBudget:
        budget = self._budgets.get(upstream)
        if budget is None:
            budget = self._budgets[upstream] = RetryBudget(settings.ratio, settings.min_retries)
        return budget

    def state(self, upstream: str) -> BreakerState | None:
        breaker = self._breakers.get(upstream)
        return breaker.state if breaker is not None else None

    def flush(self, breaker: CircuitBreaker) -> None:
        """Turn the breaker's pending transitions into events and the gauge."""
        for move in breaker.drain_transitions():
            self.metrics.breaker_state.labels(move.breaker).set(STATE_VALUE[move.new])
            log.info(
                "breaker %s: %s -> %s (%s, cooldown %.1fs)",
                move.breaker,
                move.old.value,
                move.new.value,
                move.reason,
                move.cooldown_s,
            )
            event = events_pb2.Event(
                event_id=new_event_id(),
                time_unix_nano=int(move.at * 1e9),
                agent=self._agent,
                sidecar_id=self._sidecar_id,
            )
            record = event.breaker
            record.upstream = move.breaker
            record.old_state = move.old.value
            record.new_state = move.new.value
            record.reason = move.reason
            record.cooldown_s = move.cooldown_s
            self._telemetry.emit(event)

    def outcome(self, upstream: str, outcome: str) -> None:
        self._series(self.metrics.upstream_attempts, upstream, outcome).inc()

    def retried(self, upstream: str) -> None:
        self.metrics.retries.labels(upstream).inc()

    def budget_refused(self, upstream: str) -> None:
        self.metrics.retry_budget_refused.labels(upstream).inc()

    def served(self, tier: Tier) -> None:
        if tier.index > 0:
            self.metrics.fallbacks.labels(tier.name).inc()
