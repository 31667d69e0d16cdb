# ruff: noqa: SIM117
"""Three sidecars sharing one global tokens-per-minute limit under uneven demand
(run: `scripts/bench global-quota [--seconds N]`; `tests/integration/test_global_quota.py`
runs the same scenario, shorter, and asserts on it).

Everything is real and in one process: the embedded broker, a SimProvider (`sim-fast`),
one Collector granting ``openai/sim-fast`` every ``GRANT_INTERVAL_S`` and three Sidecars
(``sc-a``, ``sc-b``, ``sc-c``) reporting usage every half grant interval. Real gRPC clients
drive the load; a plain consumer tails the grants on `outrider.control`.

1. warm-up: A and B busy, C idle, until every sidecar holds a fresh grant;
2. phase ``c-idle``: the same load, measured; C's share should be ~``min_share_tpm`` and
   A + B should hold the rest of the limit;
3. phase ``c-busy``: C gets callers too; its share should grow out of A's and B's;
4. phase ``a-idle``: A's callers stop; its share should fall to ~``min_share_tpm`` and
   move to B and C within the sidecars' usage window (``USAGE_WINDOW_S``).

Half the callers send ``priority=True`` (refused at once with a retry-after when the local
bucket is empty; they may fill the whole share) and half do not (they wait in the
sidecar's bounded queue; past 80 % of the share over the usage window they are held back,
so the priority half takes up the rest). The admitted rate is the sum of
``usage.input_tokens + usage.output_tokens`` of successful ChatResponses, counted by the
clients, over each phase once its first grant period has passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer

import outrider
from collector import Collector, CollectorSettings
from devstack.broker import EmbeddedBroker
from devstack.simprovider import ModelBehavior, SimProvider
from outrider.v1 import common_pb2, control_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from sidecar._config import parse_config
from tests.support import SECURE_COLLECTOR, TEST_SIGNER

MODEL = "sim-fast"
RESOURCE = f"openai/{MODEL}"
LIMIT_TPM = 240_000.0  # 4000 tokens/s: ~65 calls/s of ~62 tokens across the three sidecars
MIN_SHARE_TPM = 2_400.0  # what an idle sidecar keeps (1 % of the limit)
SAFE_SHARE_TPM = 6_000.0  # each sidecar's share before its first grant
GRANT_INTERVAL_S = 1.0
USAGE_WINDOW_S = 3 * GRANT_INTERVAL_S  # how far back sidecars report use and unmet demand
SIDECARS = ("sc-a", "sc-b", "sc-c")
CALLERS = 4  # per busy sidecar, half of them with priority
# 40 words + 5 framing tokens in, ~17 words out; the estimate is 204 chars / 4 + max_tokens
PROMPT = [common_pb2.ChatMessage(role="user", content="word " * 40)]
MAX_TOKENS = 32
MIN_RETRY_S = 0.02  # a refused client waits at least this long before calling again
MAX_RETRY_S = 0.25


@dataclass
class Phase:
    name: str
    start: float  # time.monotonic()
    end: float = 0.0
    settle_s: float = GRANT_INTERVAL_S  # not measured: the phase's first grant period

    def measured(self) -> tuple[float, float]:
        return self.start + self.settle_s, self.end


@dataclass
class Result:
    limit_tpm: float
    phases: list[Phase]
    # per sidecar: (time.monotonic() of the response, tokens) of every successful call
    admitted: dict[str, list[tuple[float, int]]]
    refused: dict[str, int]
    grants: list[tuple[float, control_pb2.QuotaGrant]]  # (time.monotonic() read, grant)

    def tokens(self, start: float, end: float, sidecar: str | None = None) -> int:
        names = [sidecar] if sidecar else list(self.admitted)
        return sum(n for s in names for t, n in self.admitted[s] if start <= t < end)

    def rate_per_s(self, phase: Phase, sidecar: str | None = None) -> float:
        start, end = phase.measured()
        return self.tokens(start, end, sidecar) / (end - start)

    def overshoot(self, phase: Phase | None = None) -> float:
        """admitted / limit - 1 over one phase (or all of them), after each phase's first period."""
        phases = [phase] if phase else self.phases
        tokens = sum(self.tokens(*p.measured()) for p in phases)
        seconds = sum(p.measured()[1] - p.measured()[0] for p in phases)
        return tokens / seconds / (self.limit_tpm / 60.0) - 1.0

    def per_second(self, phase: Phase) -> list[float]:
        """Tokens admitted across all sidecars in each whole second of the phase's measured part."""
        start, end = phase.measured()
        return [self.tokens(start + i, start + i + 1) for i in range(int(end - start))]

    def grants_in(self, phase: Phase) -> list[control_pb2.QuotaGrant]:
        start, end = phase.measured()
        return [g for t, g in self.grants if start <= t < end]

    def summary(self) -> dict[str, Any]:
        t0 = self.phases[0].start
        per_phase = {}
        for p in self.phases:
            start, end = p.measured()
            per_phase[p.name] = {
                "measured_s": round(end - start, 2),
                "overshoot": round(self.overshoot(p), 4),
                "admitted_tokens_per_s": {s: round(self.rate_per_s(p, s), 1) for s in SIDECARS},
                "admitted_per_second_all": self.per_second(p),
            }
        return {
            "limit_tpm": self.limit_tpm,
            "limit_tokens_per_s": self.limit_tpm / 60.0,
            "overshoot": round(self.overshoot(), 4),
            "max_one_second_overshoot": round(
                max(x for p in self.phases for x in self.per_second(p)) / (self.limit_tpm / 60.0) - 1.0, 4
            ),
            "phases": per_phase,
            "admitted_calls": {s: len(v) for s, v in self.admitted.items()},
            "refused_calls": self.refused,
            "grants": [
                {
                    "t": round(t - t0, 2),
                    "generation": g.generation,
                    "sum": round(sum(g.grants_tpm.values())),
                    **{s: round(g.grants_tpm[s]) for s in SIDECARS if s in g.grants_tpm},
                }
                for t, g in self.grants
            ],
        }


def collector_settings(bootstrap: str) -> CollectorSettings:
    return CollectorSettings.model_validate(
        {
            "kafka_bootstrap": bootstrap,
            "group_id": "global-quota",
            "admin_listen": "127.0.0.1:0",
            "state_dir": None,
            "recovery_idle_s": 0.3,
            "grant_interval_s": GRANT_INTERVAL_S,
            "quotas": {RESOURCE: {"limit_tpm": LIMIT_TPM, "min_share_tpm": MIN_SHARE_TPM}},
            **SECURE_COLLECTOR,
        }
    )


def sidecar_config(sim: SimProvider, bootstrap: str) -> Any:
    data = {
        "agent": "quota-bot",
        "stable": "v1",
        "listen": "127.0.0.1:0",
        "metrics_port": None,
        "kafka": {"bootstrap_servers": bootstrap},
        "telemetry": {"spill_dir": None},  # nothing to persist here: Kafka stays up
        "usage_report_interval": GRANT_INTERVAL_S / 2,
        "control": {"public_keys": [TEST_SIGNER.public_text()], "ready_timeout": "0s"},
        "global_quotas": {
            RESOURCE: {
                "safe_share_tpm": SAFE_SHARE_TPM,
                "grant_ttl": f"{3 * GRANT_INTERVAL_S}s",
                "priority_threshold": 0.8,
                "queue_max": 2 * CALLERS,
                "queue_timeout": "500ms",
                "usage_window": f"{USAGE_WINDOW_S}s",
            }
        },
        "versions": {
            "v1": {
                "provider": {"name": "openai", "base_url": sim.base_url},
                "model": MODEL,
                "parameters": {"max_tokens": MAX_TOKENS},
                "request_timeout": "5s",
                "resilience": {"retry": {"max_attempts": 1}},
            }
        },
    }
    return parse_config(data, source="global-quota").load_secrets({})


class GrantTail:
    """Every quota grant on `outrider.control`, read from the beginning by a plain consumer."""

    def __init__(self, bootstrap: str) -> None:
        self.grants: list[tuple[float, control_pb2.QuotaGrant]] = []
        self._consumer = AIOKafkaConsumer(
            outrider.CONTROL_TOPIC,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            metadata_max_age_ms=500,
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> GrantTail:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=100)).values():
                for record in records:
                    if outrider.is_marker(record.key) or not record.value:
                        continue
                    message = outrider.decode_control(record.value, record.headers)
                    if message.WhichOneof("body") == "quota":
                        self.grants.append((time.monotonic(), message.quota))


class Load:
    """Closed-loop callers against each sidecar; `busy(name)` adds a sidecar's callers."""

    def __init__(self, stubs: dict[str, sidecar_pb2_grpc.SidecarStub]) -> None:
        self._stubs = stubs
        self.admitted: dict[str, list[tuple[float, int]]] = {s: [] for s in stubs}
        self.refused: dict[str, int] = dict.fromkeys(stubs, 0)
        self._tasks: dict[str, set[asyncio.Task[None]]] = {s: set() for s in stubs}

    async def busy(self, name: str, callers: int = CALLERS) -> None:
        stub = self._stubs[name]
        sid = (await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id=f"u-{name}"))).session_id
        for i in range(callers):
            request = sidecar_pb2.ChatRequest(session_id=sid, messages=PROMPT, priority=i % 2 == 0)
            self._tasks[name].add(asyncio.create_task(self._caller(name, stub, request)))

    async def idle(self, name: str) -> None:
        """Stop the callers of one sidecar."""
        await self._cancel(self._tasks.pop(name, set()))
        self._tasks[name] = set()

    async def _caller(self, name: str, stub: sidecar_pb2_grpc.SidecarStub, request: Any) -> None:
        while True:
            try:
                reply = await stub.Chat(request, timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                self.refused[name] += 1
                metadata = {str(k): str(v) for k, v in exc.trailing_metadata() or ()}
                hint_s = int(metadata.get("retry-after-ms", "0")) / 1000.0
                await asyncio.sleep(min(max(hint_s, MIN_RETRY_S), MAX_RETRY_S))
                continue
            self.admitted[name].append(
                (time.monotonic(), reply.usage.input_tokens + reply.usage.output_tokens)
            )

    async def stop(self) -> None:
        await self._cancel({task for tasks in self._tasks.values() for task in tasks})

    @staticmethod
    async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
        ]
        if errors:
            raise errors[0]


async def _until(holds: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not holds():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _stack(bootstrap: str) -> AsyncIterator[tuple[list[Sidecar], GrantTail, Load]]:
    async with SimProvider({MODEL: ModelBehavior(latency_ms=2.0)}, seed=11) as sim:
        async with Collector(collector_settings(bootstrap)), GrantTail(bootstrap) as tail:
            cfg = sidecar_config(sim, bootstrap)
            sidecars = [Sidecar(cfg, sidecar_id=name) for name in SIDECARS]
            async with contextlib.AsyncExitStack() as stack:
                for sidecar in sidecars:
                    await stack.enter_async_context(sidecar)
                channels = [
                    await stack.enter_async_context(grpc.aio.insecure_channel(s.address)) for s in sidecars
                ]
                load = Load(
                    {
                        name: sidecar_pb2_grpc.SidecarStub(ch)
                        for name, ch in zip(SIDECARS, channels, strict=True)
                    }
                )
                try:
                    yield sidecars, tail, load
                finally:
                    await load.stop()


async def run_scenario(bootstrap: str, seconds_per_phase: float) -> Result:
    """Warm up, then ``c-idle``, ``c-busy`` and ``a-idle`` phases of ``seconds_per_phase`` each."""
    async with _stack(bootstrap) as (sidecars, tail, load):
        await load.busy("sc-a")
        await load.busy("sc-b")
        await _until(
            lambda: all(s.global_quotas.quotas[RESOURCE].has_fresh_grant for s in sidecars),
            within=30.0,
            what="a grant for every sidecar",
        )
        idle = Phase("c-idle", time.monotonic())
        await asyncio.sleep(seconds_per_phase)
        idle.end = busy_start = time.monotonic()
        await load.busy("sc-c")
        busy = Phase("c-busy", busy_start)
        await asyncio.sleep(seconds_per_phase)
        busy.end = a_idle_start = time.monotonic()
        await load.idle("sc-a")
        a_idle = Phase("a-idle", a_idle_start)
        await asyncio.sleep(seconds_per_phase)
        a_idle.end = time.monotonic()
        return Result(LIMIT_TPM, [idle, busy, a_idle], load.admitted, load.refused, list(tail.grants))


async def _bench(seconds: float) -> dict[str, Any]:
    async with EmbeddedBroker() as broker:
        result = await run_scenario(broker.bootstrap_servers, seconds / 3)
    return result.summary()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench global-quota")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time, split over three phases")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_bench(args.seconds)), indent=2))


__all__ = [
    "GRANT_INTERVAL_S",
    "LIMIT_TPM",
    "MIN_SHARE_TPM",
    "RESOURCE",
    "SIDECARS",
    "Phase",
    "Result",
    "main",
    "run_scenario",
]
