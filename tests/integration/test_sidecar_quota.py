# ruff: noqa: F811, SIM117
"""Per-user quotas and the global TPM quota on a real Sidecar: RESOURCE_EXHAUSTED with
retry-after metadata and RetryInfo, grants from the control topic, the priority threshold."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaProducer
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import outrider
from devstack.broker import EmbeddedBroker
from outrider.v1 import common_pb2, control_pb2, sidecar_pb2, sidecar_pb2_grpc
from sidecar import ManualClock, Sidecar
from tests.integration.test_sidecar_resilience import USER, config, running, sim  # noqa: F401
from tests.support import signed_control

RESOURCE = "openai/primary"


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo:
    metadata = error.trailing_metadata() or ()
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, metadata
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    return info


async def test_user_quota_refusal_has_retry_after_and_retry_info(sim: Any) -> None:
    cfg = config(sim, user_quotas={"requests_per_minute": 2})
    async with running(cfg) as (_, stub, sid):
        request = sidecar_pb2.ChatRequest(session_id=sid, messages=USER)
        await stub.Chat(request)
        await stub.Chat(request)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Chat(request)
    error = info.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "user requests per minute" in (error.details() or "")
    metadata = dict(error.trailing_metadata() or ())
    assert 20_000 <= int(metadata["retry-after-ms"]) <= 31_000  # one request refills in 30 s
    assert retry_info(error).retry_delay.seconds >= 20
    assert sim.requests("primary") == 2


async def test_global_quota_priority_threshold_queue_then_refuse(sim: Any) -> None:
    """Non-priority calls may fill 80 % of the share over the window; then they wait in the
    queue and are refused with a retry-after, while priority calls still pass."""
    clock = ManualClock(time.time())
    quota = {RESOURCE: {"safe_share_tpm": 1000, "queue_timeout": "200ms", "usage_window": "60s"}}
    big = [common_pb2.ChatMessage(role="user", content="word " * 150)]
    async with Sidecar(config(sim, global_quotas=quota), sidecar_id="sc-1", clock=clock) as sidecar:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            sid = (await stub.OpenSession(sidecar_pb2.OpenSessionRequest())).session_id
            request = sidecar_pb2.ChatRequest(session_id=sid, messages=big)
            admitted = 0
            refused: grpc.aio.AioRpcError | None = None
            for _ in range(10):
                clock.advance(11.0)  # the local bucket refills; the 60 s window keeps the usage
                start = time.monotonic()
                try:
                    await stub.Chat(request)
                    admitted += 1
                except grpc.aio.AioRpcError as exc:
                    refused, waited = exc, time.monotonic() - start
                    break
            assert refused is not None and admitted >= 2
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry-after-ms" in dict(refused.trailing_metadata() or ())
            assert waited >= 0.2  # it waited in the queue first
            assert sidecar.global_quotas.quotas[RESOURCE].utilisation() > 0.6
            reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=big, priority=True))
            assert reply.served_by == "primary"


async def test_grant_from_the_control_topic_changes_admission(sim: Any, broker: EmbeddedBroker) -> None:
    quota = {RESOURCE: {"safe_share_tpm": 0, "queue_timeout": "100ms"}}
    cfg = config(sim, global_quotas=quota, kafka={"bootstrap_servers": broker.bootstrap_servers})
    async with running(cfg) as (sidecar, stub, sid):
        request = sidecar_pb2.ChatRequest(session_id=sid, messages=USER, priority=True)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Chat(request)  # safe share 0: nothing admitted
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        grant = control_pb2.QuotaGrant(
            resource=RESOURCE,
            generation=1,
            limit_tpm=100_000,
            grants_tpm={"sc-1": 60_000.0, "other": 40_000.0},
            issued_at_unix_nano=time.time_ns(),
            ttl_s=30,
        )
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
        await producer.start()
        try:
            key, value, headers = signed_control(control_pb2.ControlMessage(quota=grant))
            await producer.send_and_wait(outrider.CONTROL_TOPIC, value, key=key, headers=headers)
        finally:
            await producer.stop()
        gq = sidecar.global_quotas.quotas[RESOURCE]
        for _ in range(100):
            if gq.has_fresh_grant:
                break
            await asyncio.sleep(0.05)
        assert gq.tpm == 60_000.0
        # a grant of a stale writer (a lower epoch) never wins, whatever its generation
        quotas = sidecar.global_quotas
        stale = control_pb2.QuotaGrant()
        stale.CopyFrom(grant)
        stale.generation, stale.epoch, stale.grants_tpm["sc-1"] = 2**40, 0, 1.0
        newer = control_pb2.QuotaGrant()
        newer.CopyFrom(grant)
        newer.generation, newer.epoch = 1, 5  # a restarted collector numbers afresh
        assert quotas.apply(newer) and not quotas.apply(stale)
        assert gq.tpm == 60_000.0
        await asyncio.sleep(0.2)  # a new grant hands out no burst: let the bucket fill a little
        reply = await stub.Chat(request)
        assert reply.served_by == "primary"
