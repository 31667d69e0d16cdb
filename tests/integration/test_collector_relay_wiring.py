"""The span relay inside the Collector: `otlp_endpoint` (or the standard OTEL variables) turns
it on, spans on `outrider.spans` reach a real OTLP gRPC receiver on loopback, undecodable
span records go to the dead-letter topic, and the relay stops with the collector."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2 as otlp_common
from opentelemetry.proto.trace.v1 import trace_pb2

import outrider
from collector import Collector, CollectorSettings
from collector._settings import otlp_endpoint
from devstack.broker import EmbeddedBroker
from tests.integration.test_collector_deadletter import read_deadletters

pytestmark = pytest.mark.broker


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_endpoint_setting_and_environment() -> None:
    base = CollectorSettings()
    assert otlp_endpoint(base, {}) is None
    assert otlp_endpoint(base, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317"}) == "http://otel:4317"
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4317",
    }
    assert otlp_endpoint(base, env) == "http://b:4317"
    assert otlp_endpoint(CollectorSettings(otlp_endpoint="jaeger:4317"), env) == "jaeger:4317"


async def test_spans_are_relayed_and_garbage_dead_lettered(broker: EmbeddedBroker, tmp_path: Path) -> None:
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    span = trace_pb2.Span(
        trace_id=bytes(range(16)),
        span_id=bytes(range(8)),
        parent_span_id=bytes(range(8, 16)),
        name="chat sim-good",
        kind=trace_pb2.Span.SPAN_KIND_CLIENT,
        attributes=[
            otlp_common.KeyValue(key="gen_ai.operation.name", value=otlp_common.AnyValue(string_value="chat"))
        ],
    )
    request = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[trace_pb2.ResourceSpans(scope_spans=[trace_pb2.ScopeSpans(spans=[span])])]
    )
    settings = CollectorSettings.model_validate(
        {
            "kafka_bootstrap": broker.bootstrap_servers,
            "admin_listen": "127.0.0.1:0",
            "recovery_idle_s": 0.3,
            "state_dir": str(tmp_path),
            "otlp_endpoint": f"127.0.0.1:{port}",
        }
    )
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        async with Collector(settings) as collector:
            assert collector.relay is not None and collector.relay.running
            await producer.send_and_wait(outrider.SPANS_TOPIC, b"\x07garbage", key=b"t1")
            await producer.send_and_wait(outrider.SPANS_TOPIC, request.SerializeToString(), key=span.trace_id)
            deadline = time.monotonic() + 20
            while not receiver.spans:
                assert time.monotonic() < deadline, "no span reached the OTLP receiver"
                await asyncio.sleep(0.05)
            letters = await read_deadletters(broker, 1)
        assert not collector.relay.running
    finally:
        await producer.stop()
        await server.stop(None)
    assert receiver.spans == [span]  # parent link and gen_ai attributes intact
    headers = dict(letters[0].headers)
    assert letters[0].value == b"\x07garbage"
    assert headers["outrider-dlq-source-topic"] == outrider.SPANS_TOPIC.encode()
