"""The collector's Kafka clients never leak a connection: not when a start is cancelled while
aiokafka bootstraps, not when two lazy starts race, not when a start comes after stop.

A leaked connection only shows at garbage collection ("Unclosed AIOKafkaConnection", raised
as unraisable by filterwarnings=error), usually in a later test; these check the connections
themselves, on the real broker.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiokafka.client
import pytest
from aiokafka.conn import AIOKafkaConnection
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest

import outrider
from collector import _recorder, _usage_relay
from collector._control import ensure_topics
from collector._history import DeploymentHistory
from collector._metrics import CollectorMetrics
from collector._producer import start_producer
from collector._recorder import DeploymentRecorder
from collector._windows import RollingWindows
from devstack.broker import EmbeddedBroker
from outrider.v1 import events_pb2
from tests.support import TEST_SIGNER

pytestmark = pytest.mark.broker


def _track_connections(monkeypatch: pytest.MonkeyPatch) -> list[AIOKafkaConnection]:
    made: list[AIOKafkaConnection] = []
    real = aiokafka.client.create_conn

    async def create_conn(*args: Any, **kwargs: Any) -> AIOKafkaConnection:
        conn = await real(*args, **kwargs)
        made.append(conn)
        return conn

    monkeypatch.setattr(aiokafka.client, "create_conn", create_conn)
    return made


async def test_cancelled_producer_start_leaves_no_open_connection(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _track_connections(monkeypatch)
    asking, answer = asyncio.Event(), asyncio.Event()
    real_send = AIOKafkaConnection.send

    def send(self: AIOKafkaConnection, request: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(request, MetadataRequest) and not asking.is_set():
            asking.set()  # the bootstrap's metadata request: held until the caller is cancelled

            async def later() -> Any:
                await answer.wait()
                return await real_send(self, request, *args, **kwargs)

            return later()
        return real_send(self, request, *args, **kwargs)

    monkeypatch.setattr(AIOKafkaConnection, "send", send)
    starting = asyncio.create_task(start_producer(broker.bootstrap_servers, 30.0))
    await asyncio.wait_for(asking.wait(), 30)
    starting.cancel()
    await asyncio.sleep(0)  # the cancellation reaches the start first
    answer.set()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert made, "no connection was made"
    assert not [c for c in made if c.connected()], "a cancelled start left a connection open"


def _event(n: int) -> events_pb2.Event:
    return events_pb2.Event(event_id=f"usage-{n}", agent="support-bot", sidecar_id="s1")


async def test_usage_relay_starts_one_producer_for_racing_flushes_and_none_after_stop(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ensure_topics(broker.bootstrap_servers, 1)
    made = _track_connections(monkeypatch)
    starts = []

    async def counted(bootstrap: str, timeout_s: float) -> Any:
        starts.append(bootstrap)
        return await start_producer(bootstrap, timeout_s)

    monkeypatch.setattr(_usage_relay, "start_producer", counted)
    relay = _usage_relay.UsageRelay(broker.bootstrap_servers, 10.0, lambda: False)
    relay.add(_event(1))
    first = asyncio.create_task(relay.flush())
    await asyncio.sleep(0)  # the first flush is starting the producer
    relay.add(_event(2))
    await asyncio.gather(first, relay.flush())
    assert len(starts) == 1 and relay.relayed == 2
    await relay.stop()
    relay.add(_event(3))
    await relay.flush()
    assert len(starts) == 1 and relay.relayed == 2
    assert not [c for c in made if c.connected()], "a producer was left open"


async def test_deployment_recorder_stops_at_once_and_starts_no_producer_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    starts = []

    async def counted(bootstrap: str, timeout_s: float) -> Any:
        starts.append(bootstrap)
        return await start_producer(bootstrap, timeout_s)

    monkeypatch.setattr(_recorder, "start_producer", counted)
    history = DeploymentHistory(outrider.Verifier([TEST_SIGNER.public]), None)
    recorder = DeploymentRecorder(
        history, lambda agent: None, RollingWindows(1.0, 900.0), TEST_SIGNER, "127.0.0.1:1", 1.0, 900.0,
        CollectorMetrics(),
    )  # fmt: skip
    await recorder.start()
    # at once: the writer's wake-up and the cancel coincide (wait_for swallowed that cancel on
    # 3.11, and stop hung for good)
    await asyncio.wait_for(recorder.stop(grace_s=0), 10)
    with pytest.raises(KafkaError, match="stopped"):
        await recorder._send(outrider.SignedRecord(b"k", b"v", ()))
    assert starts == []
