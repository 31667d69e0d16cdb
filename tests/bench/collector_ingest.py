"""Collector ingest throughput against the broker's raw consume rate, in the same run.

Pre-produces synthetic call and tool events to an embedded broker, then, three times each:
(a) raw: an aiokafka consumer reads every record, 5,000 per fetch, and does nothing with it;
(b) raw at the collector's fetch size (500 records): the same, as the collector fetches;
(c) ingest: the collector's own consumer path (consumer group, decode, dedupe, windows,
    totals, checkpoints to a temporary state dir) applies every record.
(d) ingest through upb: (c) with the collector's C modules off (as `OUTRIDER_NATIVE=0`, or an
    install without a C compiler, runs it): every event read by upb, the sketches in Python.
(a) is the baseline the targets are stated against (`ingest_over_raw_per_core`). (b) is
reported beside it because it is about twice as fast: a 5,000-record batch lives long enough
for cyclic GC to promote it and scan the whole heap, about half of (a)'s CPU; at 500 records
the batches die young. The ratio to (b) is the stricter one.
The collector is one asyncio process, so the figure that matters is events per second per
core: events / CPU-seconds of this process between the first record and the last
(`time.process_time`). Wall-clock rates are reported too. Medians of the runs, and the
ratio ingest / raw. Prints JSON.

    scripts/bench collector-ingest [--events 200000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import outrider
from collector import RollingWindows, SystemClock, _buckets
from collector import _ingest as _ingest_module
from collector._checkpoint import CheckpointStore
from collector._consumer import EventConsumer
from collector._deadletter import DeadLetter
from collector._ingest import Ingestor
from collector._metrics import CollectorMetrics
from devstack.broker import EmbeddedBroker
from outrider.v1 import common_pb2, events_pb2

AGENTS = ("support-bot", "billing-bot", "triage-bot", "search-bot")
SIDECARS = 2 * len(AGENTS)
# the first agent's events belong to a rollout (stable against canary), as during a canary;
# the collector counts them as evidence only while it tracks that rollout
ROLLOUT_AGENT, ROLLOUT_ID = AGENTS[0], "bench-rollout"
STABLE, CANDIDATE = "1a2b3c4d5e6f", "9f8e7d6c5b4a"


def synthetic_event(i: int, now_ns: int) -> events_pb2.Event:
    canary = i % 10 == 0
    event = events_pb2.Event(
        event_id=f"bench-{i:09d}",
        time_unix_nano=now_ns,
        agent=AGENTS[i % len(AGENTS)],
        version_id=CANDIDATE if canary else STABLE,
        role=common_pb2.ROLE_CANARY if canary else common_pb2.ROLE_STABLE,
        session_id=f"session-{i % 5000}",
        # eight sidecars, two per agent, each numbering its events 1, 2, 3, ... as sidecars do
        sidecar_id=f"sidecar-{i % SIDECARS}",
        sequence=i // SIDECARS + 1,
    )
    if event.agent == ROLLOUT_AGENT:
        event.rollout_id = ROLLOUT_ID
    if i % 5 == 4:
        event.tool.tool_name = "lookup_order"
        event.tool.latency_ms = 5 + i % 40
        event.tool.outcome = events_pb2.OUTCOME_ERROR if i % 50 == 4 else events_pb2.OUTCOME_OK
        event.tool.error_class = "tool_5xx" if i % 50 == 4 else ""
    else:
        call = event.call
        call.operation, call.provider, call.model = "chat", "openai", "gpt-4o"
        call.latency_ms = 50 + (i * 37) % 900
        call.time_to_first_token_ms = 20 + i % 200
        call.input_tokens, call.output_tokens = 200 + i % 300, 20 + i % 100
        call.cost_usd = call.input_tokens * 2.5e-6 + call.output_tokens * 1e-5
        call.outcome = events_pb2.OUTCOME_ERROR if i % 33 == 0 else events_pb2.OUTCOME_OK
        call.error_class = "provider_5xx" if i % 33 == 0 else ""
    return event


async def produce(bootstrap: str, n: int) -> float:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(outrider.EVENTS_TOPIC, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=20, max_batch_size=1 << 20
    )
    await producer.start()
    began = time.perf_counter()
    try:
        now_ns = time.time_ns()
        pending = []
        for i in range(n):
            event = synthetic_event(i, now_ns)
            value, headers = outrider.encode_event(event)
            pending.append(
                await producer.send(
                    outrider.EVENTS_TOPIC, value, key=outrider.agent_key(event.agent), headers=headers
                )
            )
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - began


def _figures(n: int, wall_s: float, cpu_s: float) -> dict[str, float]:
    return {
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
        "events_per_s": round(n / wall_s),
        "events_per_cpu_s": round(n / cpu_s) if cpu_s > 0 else 0,
    }


RAW_FETCH_RECORDS = 5000
COLLECTOR_FETCH_RECORDS = 500  # the collector's default max_batch_records


async def raw_consume(bootstrap: str, n: int, max_records: int = RAW_FETCH_RECORDS) -> dict[str, float]:
    consumer = AIOKafkaConsumer(
        outrider.EVENTS_TOPIC,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        seen = 0
        wall0 = cpu0 = 0.0
        while seen < n:
            batch = await consumer.getmany(timeout_ms=500, max_records=max_records)
            if batch and seen == 0:
                wall0, cpu0 = time.perf_counter(), time.process_time()
            for records in batch.values():
                seen += len(records)
        return _figures(n, time.perf_counter() - wall0, time.process_time() - cpu0)
    finally:
        await consumer.stop()


class _TimedIngestor(Ingestor):
    """The collector's Ingestor, noting the clocks at its first record and its n-th."""

    def __init__(self, n: int, windows: RollingWindows, metrics: CollectorMetrics) -> None:
        super().__init__(windows, metrics)
        self.n = n
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None
        self.done = asyncio.Event()

    def apply(self, records: Iterable[Any], now: float) -> list[DeadLetter]:
        if self.start is None:
            self.start = (time.perf_counter(), time.process_time())
        dead = super().apply(records, now)
        if self.end is None and self.applied >= self.n:
            self.end = (time.perf_counter(), time.process_time())
            self.done.set()
        return dead


@contextlib.contextmanager
def _natives(on: bool) -> Iterator[None]:
    """The collector's C modules in use (as installed), or off: what OUTRIDER_NATIVE=0 does at
    import, done in this process so both paths run in one run."""
    saved = _ingest_module.fast_row, _buckets._fastsketch
    if not on:
        _ingest_module.fast_row = None
        _buckets._fastsketch = None
    try:
        yield
    finally:
        _ingest_module.fast_row, _buckets._fastsketch = saved


async def collector_ingest(
    bootstrap: str, n: int, run: int, state_dir: Path, *, native: bool = True
) -> dict[str, float]:
    with _natives(native):
        return await _collector_ingest(bootstrap, n, run, state_dir)


async def _collector_ingest(bootstrap: str, n: int, run: int, state_dir: Path) -> dict[str, float]:
    windows = RollingWindows(bucket_s=5, retention_s=900, dedupe_size=max(200_000, n))
    ingestor = _TimedIngestor(n, windows, CollectorMetrics())
    group = f"bench-ingest-{run}"
    consumer = EventConsumer(
        bootstrap,
        group,
        ingestor,
        SystemClock(),
        max_records=COLLECTOR_FETCH_RECORDS,
        store=CheckpointStore(state_dir, group),
        checkpoint_interval_s=5.0,
    )
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        # timed from the first record (the group join is not ingest) to the n-th
        await asyncio.wait([task, asyncio.ensure_future(ingestor.done.wait())], return_when="FIRST_COMPLETED")
        if task.done():
            task.result()
        assert ingestor.start is not None and ingestor.end is not None
        figures = _figures(n, ingestor.end[0] - ingestor.start[0], ingestor.end[1] - ingestor.start[1])
    finally:
        consumer.request_stop()
        await asyncio.wait([task], timeout=5)
        task.cancel()
        await consumer.stop()
    stats = windows.snapshot(AGENTS[0], STABLE, common_pb2.ROLE_STABLE, 900, time.time())
    figures["checkpoints"] = consumer.checkpoints
    figures["sample_requests"] = stats.requests  # a sanity check that events were aggregated
    return figures


def _median(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


async def main_async(n: int, runs: int) -> dict[str, object]:
    async with EmbeddedBroker() as broker:
        produce_s = await produce(broker.bootstrap_servers, n)
        raw: list[dict[str, float]] = []
        raw_small: list[dict[str, float]] = []
        ingest: list[dict[str, float]] = []
        upb: list[dict[str, float]] = []
        with tempfile.TemporaryDirectory(prefix="outrider-bench-") as tmp:
            for run in range(runs):  # alternate, so all see the same machine noise
                raw.append(await raw_consume(broker.bootstrap_servers, n))
                raw_small.append(await raw_consume(broker.bootstrap_servers, n, COLLECTOR_FETCH_RECORDS))
                bootstrap, state = broker.bootstrap_servers, Path(tmp)
                ingest.append(await collector_ingest(bootstrap, n, run, state))
                upb.append(await collector_ingest(bootstrap, n, runs + run, state, native=False))
    raw_core, ingest_core = _median(raw, "events_per_cpu_s"), _median(ingest, "events_per_cpu_s")
    raw_small_core = _median(raw_small, "events_per_cpu_s")
    upb_core = _median(upb, "events_per_cpu_s")
    return {
        "benchmark": "collector-ingest",
        "events": n,
        "runs": runs,
        "produce_s": round(produce_s, 2),
        "raw_consume": {
            "records_per_fetch": RAW_FETCH_RECORDS,
            "median_events_per_s": _median(raw, "events_per_s"),
            "median_events_per_cpu_s": raw_core,
            "runs": raw,
        },
        "raw_consume_at_collector_fetch": {
            "records_per_fetch": COLLECTOR_FETCH_RECORDS,
            "median_events_per_s": _median(raw_small, "events_per_s"),
            "median_events_per_cpu_s": raw_small_core,
            "runs": raw_small,
        },
        "collector_ingest": {
            "median_events_per_s": _median(ingest, "events_per_s"),
            "median_events_per_cpu_s": ingest_core,
            "runs": ingest,
        },
        "collector_ingest_upb": {
            "median_events_per_s": _median(upb, "events_per_s"),
            "median_events_per_cpu_s": upb_core,
            "runs": upb,
        },
        "ingest_over_raw_per_core": round(ingest_core / raw_core, 3) if raw_core else None,
        "ingest_upb_over_raw_per_core": round(upb_core / raw_core, 3) if raw_core else None,
        "ingest_over_upb_per_core": round(ingest_core / upb_core, 3) if upb_core else None,
        "ingest_over_raw_at_collector_fetch_per_core": (
            round(ingest_core / raw_small_core, 3) if raw_small_core else None
        ),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/bench collector-ingest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.events < 1 or args.runs < 1:
        parser.error("--events and --runs must be at least 1")
    print(json.dumps(asyncio.run(main_async(args.events, args.runs)), indent=2))
