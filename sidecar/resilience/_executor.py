"""The resilient executor: fallback tiers, global-quota admission, breakers and retries
around every upstream call. A thin async layer over the pure `_breaker`, `_retry` and
`_quota` objects.

For a chat, tiers are walked in order (tier 0 is the version's own provider/model). A tier
is skipped at once when its global quota refuses or its breaker is open (the upstream is
not touched); otherwise it gets attempts under tenacity: full-jitter backoff, retries only
for retryable outcomes, Retry-After honoured up to a cap, every attempt bounded by what is
left of the call's single deadline, retries bounded by the upstream's retry budget. A static
tier always answers. Streams fall back only before their first delta; after it, the
caller gets the error (see `_server`).
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from tenacity import AsyncRetrying

from outrider.v1 import common_pb2
from sidecar._version_config import ResilienceConfig, RetrySettings, ToolConfig
from sidecar.resilience._global_quota import GlobalQuotas, QuotaRefusal, QuotaTicket
from sidecar.resilience._retry import (
    AttemptFailure,
    FailureKind,
    RetryPolicy,
    TenacityRetry,
    TenacityStop,
    TenacityWait,
    parse_retry_after,
)
from sidecar.resilience._upstreams import Upstreams
from sidecar.routing._versions import Tier, Version
from sidecar.telemetry._tracing import ChatSpan, ToolSpan
from sidecar.upstream._exceptions import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from sidecar.upstream._provider import ChatResult, ProviderClient
from sidecar.upstream._tools import ToolClient, ToolResult

T = TypeVar("T")
DEFAULT_MAX_TOKENS = 256
CHARS_PER_TOKEN = 4


class ChatFailed(Exception):
    """No tier could answer; ``code`` is the gRPC status to return."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        error_class: str,
        attempts: int,
        retry_after_s: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error_class = error_class
        self.attempts = attempts
        self.retry_after_s = retry_after_s


class _Skip(Exception):
    """Internal: this tier cannot be tried now (breaker open, retry budget spent)."""


@dataclass(slots=True)
class Served:
    """Which tier answered, after how many upstream attempts and how long a quota wait."""

    result: ChatResult
    tier: Tier
    attempts: int = 0
    quota_wait_ms: float = 0.0
    ticket: QuotaTicket | None = field(default=None, repr=False)

    @property
    def degraded(self) -> bool:
        return self.tier.index > 0


def retry_policy(settings: RetrySettings) -> RetryPolicy:
    return RetryPolicy(settings.max_attempts, settings.base, settings.cap, settings.retry_after_cap)


def classify(exc: BaseException) -> AttemptFailure | None:
    if isinstance(exc, UpstreamTimeout):
        return AttemptFailure(FailureKind.TIMEOUT)
    if isinstance(exc, UpstreamConnectError):
        return AttemptFailure(FailureKind.CONNECT_ERROR)
    if isinstance(exc, UpstreamStatusError):
        return AttemptFailure(
            FailureKind.HTTP_STATUS, exc.status, parse_retry_after(exc.headers, time.time())
        )
    if isinstance(exc, UpstreamError):
        return AttemptFailure(FailureKind.OTHER)
    return None


def upstream_status(exc: UpstreamError) -> grpc.StatusCode:
    """UpstreamTimeout -> DEADLINE_EXCEEDED; other retriable -> UNAVAILABLE; else INTERNAL."""
    if isinstance(exc, UpstreamTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.UNAVAILABLE if exc.retriable else grpc.StatusCode.INTERNAL


def _counts_against(exc: UpstreamError) -> bool:
    """Client errors (4xx but 408/429) say nothing about the upstream's health."""
    return not (
        isinstance(exc, UpstreamStatusError)
        and exc.status is not None
        and exc.status < 500
        and not exc.retriable
    )


def estimate_tokens(version: Version, messages: Sequence[common_pb2.ChatMessage]) -> int:
    """Prompt estimate (chars / 4) plus the most the model may answer."""
    chars = len(version.config.system_prompt) + sum(len(m.content) + len(m.role) for m in messages)
    params = version.config.parameters
    max_tokens = params.get("max_tokens") or params.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
    return chars // CHARS_PER_TOKEN + int(max_tokens)


async def _traced(
    span: ChatSpan | ToolSpan | None,
    number: int,
    tier: int | None,
    model: str | None,
    call: Callable[[Mapping[str, str] | None], Awaitable[T]],
) -> T:
    """One upstream attempt as an `attempt` child span; `call` gets its traceparent headers."""
    if span is None:
        return await call(None)
    with span.attempt(number, tier=tier, model=model) as attempt:
        try:
            return await call(attempt.headers())
        except UpstreamError as exc:
            attempt.set_error(exc.error_class)
            raise


def static_result(tier: Tier) -> ChatResult:
    return ChatResult(content=tier.static_response, finish_reason="stop", model="static")


class Executor:
    def __init__(
        self,
        provider: ProviderClient,
        tools: ToolClient,
        upstreams: Upstreams,
        quotas: GlobalQuotas | None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._provider = provider
        self._tools = tools
        self.upstreams = upstreams
        self._quotas = quotas
        self._rng = rng or random.Random()

    async def attempt(
        self,
        upstream: str,
        resilience: ResilienceConfig,
        settings: RetrySettings,
        deadline: float,
        per_attempt_s: float,
        call: Callable[[float], Awaitable[T]],
        *,
        idempotent: bool = True,
        settle: bool = True,
        counter: list[int],
    ) -> T:
        """Run ``call(time_limit_s)`` under the upstream's breaker, retries and budget.

        ``settle=False`` leaves the breaker's success to the caller (a stream that opened).
        ``counter[0]`` counts attempts made.
        """
        breaker = self.upstreams.breaker(upstream, resilience.breaker)
        budget = self.upstreams.budget(upstream, resilience.retry_budget)
        last: list[UpstreamError] = []

        def remaining() -> float:
            return deadline - time.monotonic()

        def skip(why: str) -> _Skip:
            return _Skip(f"{upstream}: {why}" + (f" after: {last[-1]}" if last else ""))

        async def once(retry: bool) -> T:
            holds_retry = False
            if retry:
                if not budget.try_acquire_retry():
                    self.upstreams.budget_refused(upstream)
                    raise skip("retry budget exhausted")
                holds_retry = True
                self.upstreams.retried(upstream)
            try:
                if not breaker.allow():
                    self.upstreams.flush(breaker)
                    raise skip("circuit open")
                left = remaining()
                if left <= 0:
                    breaker.release()
                    raise UpstreamTimeout(
                        f"{upstream}: call deadline exceeded", upstream=upstream, kind="provider"
                    )
                counter[0] += 1
                try:
                    result = await call(min(per_attempt_s, left))
                except UpstreamError as exc:
                    last.append(exc)
                    self.upstreams.outcome(upstream, exc.error_class)
                    if _counts_against(exc):
                        breaker.record_failure()
                    else:
                        breaker.release()
                    raise
                except BaseException:
                    breaker.release()
                    raise
                self.upstreams.outcome(upstream, "ok")
                if settle:
                    breaker.record_success()
                return result
            finally:
                self.upstreams.flush(breaker)
                if holds_retry:
                    budget.release_retry()

        budget.on_request()
        try:
            try:
                return await once(False)
            except UpstreamError as exc:
                failed: UpstreamError | None = exc
            # The first attempt runs bare: a call that succeeds never pays for tenacity. After a
            # failure tenacity decides everything, from that attempt on: it is replayed as
            # tenacity's attempt 1, so waits, stops and attempt numbers are as they always were.
            policy = retry_policy(settings)
            retrying = AsyncRetrying(
                retry=TenacityRetry(policy, classify, idempotent=idempotent),
                wait=TenacityWait(policy, self._rng, classify),
                stop=TenacityStop(policy, remaining),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    if failed is not None:
                        replay, failed = failed, None
                        raise replay
                    return await once(True)
        finally:
            budget.on_request_done()
        raise AssertionError("unreachable: tenacity reraises")

    async def _admit(
        self, tier: Tier, tokens: int, priority: bool, deadline: float, shadow: bool
    ) -> QuotaTicket | QuotaRefusal | None:
        if self._quotas is None or tier.resource not in self._quotas:
            return None
        return await self._quotas.admit(tier.resource, tokens, priority, deadline, shadow=shadow)

    def settle(self, served: Served) -> None:
        if served.ticket is not None and self._quotas is not None:
            used = served.result.input_tokens + served.result.output_tokens
            self._quotas.reconcile(served.ticket, used)
            served.ticket = None

    async def _walk(
        self,
        version: Version,
        messages: Sequence[common_pb2.ChatMessage],
        deadline: float,
        priority: bool,
        run: Callable[[Tier, list[int]], Awaitable[Any]],
        span: ChatSpan | None = None,
        shadow: bool = False,
    ) -> tuple[Tier, Any, list[int], float, QuotaTicket | None]:
        reasons: list[str] = []
        counter = [0]
        quota_only = True
        retry_after = 0.0
        waited = 0.0
        tokens = estimate_tokens(version, messages)
        last_class = "unavailable"
        last_code = grpc.StatusCode.UNAVAILABLE
        for tier in version.tiers:
            if span is not None and tier.index > 0:
                target = tier.target
                span.record_fallback(
                    tier.index,
                    model=target.model if target is not None else None,
                    provider=target.provider if target is not None else None,
                    reason=last_class if reasons else None,
                )
            if tier.target is None:
                return tier, static_result(tier), counter, waited, None
            admission = await self._admit(tier, tokens, priority, deadline, shadow)
            if isinstance(admission, QuotaRefusal):
                reasons.append(f"{tier.name}: {admission.reason}")
                retry_after = max(retry_after, admission.retry_after_s)
                if not shadow:  # a mirrored call's refusal is counted as shadow work dropped
                    self.upstreams.metrics.quota_refused.labels("global").inc()
                continue
            if admission is not None:
                waited += admission.waited_s
            try:
                value = await run(tier, counter)
            except (_Skip, UpstreamError) as exc:
                if admission is not None and self._quotas is not None:
                    self._quotas.reconcile(admission, 0.0)
                quota_only = False
                reasons.append(f"{tier.name}: {exc}")
                if isinstance(exc, UpstreamError):
                    last_class = exc.error_class
                    last_code = upstream_status(exc)
                else:
                    last_class, last_code = "breaker_open", grpc.StatusCode.UNAVAILABLE
                if time.monotonic() >= deadline:
                    break
                continue
            except BaseException:
                if admission is not None and self._quotas is not None:
                    self._quotas.reconcile(admission, 0.0)
                raise
            return tier, value, counter, waited, admission
        message = "; ".join(reasons) or "no tier to try"
        if quota_only and reasons:
            raise ChatFailed(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"quota exhausted: {message}",
                error_class="quota",
                attempts=counter[0],
                retry_after_s=retry_after,
            )
        code = grpc.StatusCode.DEADLINE_EXCEEDED if time.monotonic() >= deadline else last_code
        raise ChatFailed(code, f"every tier failed: {message}", error_class=last_class, attempts=counter[0])

    async def chat(
        self,
        version: Version,
        messages: Sequence[common_pb2.ChatMessage],
        deadline: float,
        priority: bool,
        span: ChatSpan | None = None,
        *,
        shadow: bool = False,
    ) -> Served:
        """One unary chat through the fallback chain. ``shadow``: a mirrored call, admitted by
        the global quotas only within the shadow budget (never queued)."""
        resilience = version.config.resilience

        async def run(tier: Tier, counter: list[int]) -> ChatResult:
            target = tier.target
            assert target is not None
            return await self.attempt(
                tier.upstream,
                resilience,
                resilience.retry,
                deadline,
                target.config.request_timeout,
                lambda limit: _traced(
                    span,
                    counter[0],
                    tier.index,
                    target.model,
                    lambda h: self._provider.chat(target, messages, limit, trace_headers=h),
                ),
                counter=counter,
            )

        tier, result, counter, waited, ticket = await self._walk(
            version, messages, deadline, priority, run, span, shadow
        )
        self.upstreams.served(tier)
        return Served(result, tier, counter[0], waited * 1000.0, ticket)

    async def chat_stream(
        self,
        version: Version,
        messages: Sequence[common_pb2.ChatMessage],
        deadline: float,
        priority: bool,
        span: ChatSpan | None = None,
        *,
        shadow: bool = False,
    ) -> tuple[Served, AsyncGenerator[str | ChatResult, None] | None, str | ChatResult]:
        """Open a stream on the first tier that yields its first item.

        Returns the Served (``result`` empty until the stream ends), the rest of the stream
        (None for a static tier) and the first item. Failures after this point belong to
        the caller: call `stream_done` with the outcome.
        """
        resilience = version.config.resilience
        idle = resilience.stream_idle_timeout

        async def open_stream(
            target: Version, limit: float, headers: Mapping[str, str] | None
        ) -> tuple[AsyncGenerator[str | ChatResult, None], Any]:
            stream = self._provider.chat_stream(
                target, messages, limit, idle_timeout_s=idle, trace_headers=headers
            )
            try:
                first = await anext(stream)
            except BaseException:
                await stream.aclose()
                raise
            return stream, first

        async def run(tier: Tier, counter: list[int]) -> tuple[AsyncGenerator[str | ChatResult, None], Any]:
            target = tier.target
            assert target is not None
            return await self.attempt(
                tier.upstream,
                resilience,
                resilience.retry,
                deadline,
                target.config.request_timeout,
                lambda limit: _traced(
                    span, counter[0], tier.index, target.model, lambda h: open_stream(target, limit, h)
                ),
                settle=False,
                counter=counter,
            )

        tier, value, counter, waited, ticket = await self._walk(
            version, messages, deadline, priority, run, span, shadow
        )
        self.upstreams.served(tier)
        if tier.target is None:
            return Served(value, tier, counter[0], waited * 1000.0), None, value.content
        stream, first = value
        served = Served(ChatResult(content="", finish_reason=""), tier, counter[0], waited * 1000.0, ticket)
        return served, stream, first

    def stream_done(self, version: Version, served: Served, error: UpstreamError | None) -> None:
        """Settle an opened stream's breaker: success, failure, or (cancelled) neither."""
        if served.tier.target is None:
            return
        breaker = self.upstreams.breaker(served.tier.upstream, version.config.resilience.breaker)
        if error is None:
            breaker.record_success()
        elif _counts_against(error):
            breaker.record_failure()
            self.upstreams.outcome(served.tier.upstream, error.error_class)
        else:
            breaker.release()
        self.upstreams.flush(breaker)
        self.settle(served)

    def stream_cancelled(self, version: Version, served: Served) -> None:
        if served.tier.target is not None:
            self.upstreams.breaker(served.tier.upstream, version.config.resilience.breaker).release()
        self.settle(served)

    async def call_tool(
        self,
        version: Version,
        tool: ToolConfig,
        arguments: str,
        deadline: float,
        span: ToolSpan | None = None,
    ) -> tuple[ToolResult, int]:
        resilience = version.config.resilience
        counter = [0]
        try:
            result = await self.attempt(
                f"tool:{tool.name}",
                resilience,
                tool.retry or resilience.retry,
                deadline,
                tool.timeout,
                lambda limit: _traced(
                    span,
                    counter[0],
                    None,
                    None,
                    lambda h: self._tools.call(tool, arguments, limit, trace_headers=h),
                ),
                idempotent=tool.idempotent,
                counter=counter,
            )
        except _Skip as exc:
            raise ChatFailed(
                grpc.StatusCode.UNAVAILABLE, str(exc), error_class="breaker_open", attempts=counter[0]
            ) from None
        except UpstreamError as exc:
            exc.attempts = counter[0]  # type: ignore[attr-defined]
            raise
        return result, counter[0]
