"""Durable telemetry: the broker becomes unreachable under steady load and comes back, and a
sidecar stopped (SIGTERM) while it is unreachable hands what it had to the next one.

The path to the broker is cut with a loopback TCP proxy the test controls; the broker
advertises the proxy's address, so every client connection (bootstrap and partition leader)
goes through it. Cutting resets the live connections and refuses new ones (accept + close).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yaml
from aiokafka import AIOKafkaConsumer

import outrider
from collector import Collector
from devstack.broker import EmbeddedBroker, free_port
from devstack.simprovider import SimProvider
from outrider.v1 import sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from tests.integration.test_collector_service import settings_for
from tests.integration.test_sidecar_api import API_KEY, USER, open_session, sidecar_config, sim_models
from tests.support import outrider_process, wait_serving

pytestmark = pytest.mark.broker

OUTAGE_S = float(os.environ.get("OUTRIDER_TEST_OUTAGE_S", "30"))
CALL_INTERVAL_S = 0.02  # ~50 Chat calls per second


class CutProxy:
    """Forwards loopback TCP to `target_port`; `cut()` drops every connection and refuses new
    ones until `restore()`."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.cut_off = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._drop_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        self.cut_off = True
        self._drop_all()

    def restore(self) -> None:
        self.cut_off = False

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if self.cut_off:
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(dst)
            dst.transport.abort()


@pytest.fixture
async def proxied_broker() -> AsyncIterator[tuple[EmbeddedBroker, CutProxy]]:
    broker_port = free_port()
    proxy = CutProxy(broker_port)
    await proxy.start()
    broker = EmbeddedBroker(broker_port, advertised_port=proxy.port)
    try:
        async with broker:
            yield broker, proxy
    finally:
        await proxy.stop()


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=5) as provider:
        yield provider


async def chat_events(bootstrap: str, want: int, within: float = 30.0) -> tuple[dict[str, int], int]:
    """Read outrider.events from the start until `want` distinct chat events arrived (or the
    time is up); return (count per event id of chat events, total records read)."""
    consumer = AIOKafkaConsumer(
        outrider.EVENTS_TOPIC,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        metadata_max_age_ms=500,
    )
    await consumer.start()
    seen: dict[str, int] = {}
    total = 0
    try:
        deadline = time.monotonic() + within
        while len(seen) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    total += 1
                    event = outrider.decode_event(record.value, list(record.headers))
                    if event.WhichOneof("body") == "call" and event.call.operation == "chat":
                        seen[event.event_id] = seen.get(event.event_id, 0) + 1
    finally:
        await consumer.stop()
    return seen, total


async def test_outage_under_steady_load_loses_nothing(
    proxied_broker: tuple[EmbeddedBroker, CutProxy], sim: SimProvider, tmp_path: Path
) -> None:
    broker, proxy = proxied_broker
    bootstrap = f"127.0.0.1:{proxy.port}"
    config = sidecar_config(sim, kafka=bootstrap, metrics_port=None, telemetry={"spill_dir": str(tmp_path)})
    calls = 0
    latencies: list[float] = []
    stop_load = asyncio.Event()
    async with (
        Collector(settings_for(broker, metrics_port=None)) as collector,
        Sidecar(config, sidecar_id="durable-1") as sidecar,
        grpc.aio.insecure_channel(sidecar.address) as ch,
    ):
        stub = sidecar_pb2_grpc.SidecarStub(ch)
        sid = (await open_session(stub)).session_id

        async def load() -> None:
            nonlocal calls
            while not stop_load.is_set():
                started = time.perf_counter()
                await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
                latencies.append(time.perf_counter() - started)
                calls += 1
                await asyncio.sleep(CALL_INTERVAL_S)

        loader = asyncio.create_task(load())
        telemetry = sidecar.telemetry
        try:
            await asyncio.sleep(2.0)
            assert telemetry.healthy and telemetry.spilled_records == 0
            proxy.cut()
            cut_at = time.monotonic()
            while telemetry.healthy:
                assert time.monotonic() - cut_at < 15, "the outage went unnoticed"
                await asyncio.sleep(0.05)
            detected_s = time.monotonic() - cut_at
            await asyncio.sleep(max(0.0, OUTAGE_S - detected_s))
            assert not telemetry.healthy
            assert telemetry.spill_pending_records > 0
            outage_calls = calls
            proxy.restore()
            restored_at = time.monotonic()
            deadline = restored_at + 60
            while telemetry.spill_pending_records or telemetry.last_outage_end is None:
                assert time.monotonic() < deadline, "the spill did not drain"
                await asyncio.sleep(0.05)
            assert telemetry.last_outage_end is not None
            drain_s = telemetry.last_outage_end - restored_at
            await asyncio.sleep(1.0)  # live traffic after the drain goes straight to Kafka again
        finally:
            stop_load.set()
            await loader
        dropped = sum(
            s.value
            for m in sidecar.metrics.telemetry_dropped.collect()
            for s in m.samples
            if s.name.endswith("_total")
        )
        # the collector (its path to the broker was cut too) counts every call exactly once
        deadline = time.monotonic() + 30
        while _llm_calls(collector) < calls:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # and no more: a late duplicate would show up here
        counted = _llm_calls(collector)
        figures = {
            "outage_s": OUTAGE_S,
            "calls": calls,
            "calls_before_restore": outage_calls,
            "outage_detected_after_s": round(detected_s, 3),
            "records_spilled": telemetry.spilled_records,
            "max_spill_bytes": telemetry.spill_high_water_bytes,
            "drain_after_recovery_s": round(drain_s, 3),
            "chat_p99_ms": round(sorted(latencies)[int(len(latencies) * 0.99)] * 1000, 2),
            "chat_max_ms": round(max(latencies) * 1000, 2),
            "collector_counted": counted,
        }
    assert dropped == 0
    seen, total = await chat_events(broker.bootstrap_servers, calls)
    figures["records_read"] = total
    figures["duplicates"] = sum(n - 1 for n in seen.values())
    print("\nspill-and-recover:", json.dumps(figures))
    assert len(seen) == calls, f"{calls - len(seen)} of {calls} chat events lost"
    assert counted == calls, f"the collector counted {counted} of {calls} calls"
    assert figures["records_spilled"] > 0 and figures["max_spill_bytes"] > 0
    assert max(latencies) < 1.0, "a request waited on telemetry"


def _llm_calls(collector: Collector) -> float:
    return sum(
        sample.value
        for metric in collector.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "outrider_llm_calls_total"
    )


def _write_config(tmp_path: Path, sim: SimProvider, kafka: str, spill: Path) -> tuple[Path, str]:
    data = sidecar_config(sim, kafka=kafka, metrics_port=None).model_dump(mode="json")
    listen = f"127.0.0.1:{free_port()}"
    data.update(listen=listen, telemetry={"spill_dir": str(spill)}, shutdown_grace="2s")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, listen


async def test_sigterm_while_unreachable_persists_and_restart_delivers(
    proxied_broker: tuple[EmbeddedBroker, CutProxy],
    sim: SimProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, proxy = proxied_broker
    monkeypatch.setenv("TEST_SIM_KEY", API_KEY)
    spill = tmp_path / "spill"
    path, listen = _write_config(tmp_path, sim, f"127.0.0.1:{proxy.port}", spill)
    proxy.cut()
    calls = 20
    with outrider_process("sidecar", "--config", str(path), log_path=tmp_path / "a.log") as first:
        await wait_serving(listen, first)
        async with grpc.aio.insecure_channel(listen) as ch:
            stub = sidecar_pb2_grpc.SidecarStub(ch)
            sid = (await open_session(stub)).session_id
            for _ in range(calls):
                await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
        assert first.stop() == 0
    assert any(p.stat().st_size > 16 for p in spill.glob("*.seg")), f"nothing persisted:\n{first.output()}"

    proxy.restore()
    with outrider_process("sidecar", "--config", str(path), log_path=tmp_path / "b.log") as second:
        await wait_serving(listen, second)
        seen, _ = await chat_events(broker.bootstrap_servers, calls, within=20.0)
        assert second.stop() == 0
    assert len(seen) == calls, second.output()


def _sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    return sidecar.metrics.registry.get_sample_value(name, labels or None) or 0.0


async def test_full_spill_drops_oldest_and_counts(sim: SimProvider, tmp_path: Path) -> None:
    # Kafka: a port nobody listens on; a 64 KiB spill holds a few hundred events
    config = sidecar_config(
        sim, metrics_port=None, telemetry={"spill_dir": str(tmp_path), "spill_max_bytes": 64 * 1024}
    )
    async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as ch:
        stub = sidecar_pb2_grpc.SidecarStub(ch)
        sid = (await open_session(stub)).session_id
        telemetry = sidecar.telemetry
        for _ in range(800):
            await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
        deadline = time.monotonic() + 10
        while telemetry.queue_depth or telemetry.spilled_records < 800:
            assert time.monotonic() < deadline, "events did not reach the spill"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        # events and span records (the tracer's batches) share the spill
        dropped = _sample(sidecar, "outrider_sidecar_telemetry_dropped_total", reason="spill_full")
        pending = _sample(sidecar, "outrider_sidecar_telemetry_spill_records")
        spilled = _sample(sidecar, "outrider_sidecar_telemetry_spilled_total")
        assert dropped > 0 and pending > 0 and spilled >= 800
        assert dropped + pending == spilled == telemetry.spilled_records
        assert 0 < _sample(sidecar, "outrider_sidecar_telemetry_spill_bytes") <= 64 * 1024
        assert _sample(sidecar, "outrider_sidecar_telemetry_kafka_up") == 0
        assert _sample(sidecar, "outrider_sidecar_telemetry_dropped_total", reason="queue_full") == 0


async def test_telemetry_disabled_sends_nothing_and_traces_nothing(
    broker: EmbeddedBroker, sim: SimProvider, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    config = sidecar_config(
        sim,
        kafka=broker.bootstrap_servers,
        metrics_port=None,
        telemetry={"enabled": False, "spill_dir": str(spill)},
    )
    async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as ch:
        stub = sidecar_pb2_grpc.SidecarStub(ch)
        sid = (await open_session(stub)).session_id
        reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
        assert reply.message.content
        assert sidecar.tracer_provider is None and sidecar.telemetry.queue_depth == 0
    assert _sample(sidecar, "outrider_sidecar_telemetry_sent_total") == 0
    assert not spill.exists()
