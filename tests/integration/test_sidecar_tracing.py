"""GenAI traces from a real Sidecar: W3C context from the agent's gRPC metadata becomes the
parent, `invoke_agent {agent}` -> `chat {model}` / `execute_tool {name}` spans with gen_ai.*
attributes, attempts and fallback tiers visible, traceparent passed on to the provider and tools, spans on
`outrider.spans` as OTLP protobuf keyed by trace id, content only when opted in, and
direct OTLP export to a real TraceService receiver when OTEL_EXPORTER_OTLP_* is set."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

import outrider
from devstack.broker import EmbeddedBroker, free_port
from devstack.simprovider import Fault, SimProvider
from outrider.v1 import sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from tests.integration.test_sidecar_api import API_KEY, USER, open_session, sidecar_config, sim_models
from tests.integration.test_sidecar_resilience import config as resilience_config
from tests.integration.test_sidecar_resilience import sim as resilience_sim  # noqa: F401
from tests.integration.test_sidecar_resilience import tiers

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{AGENT_SPAN}-01"


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=9) as provider:
        yield provider


def attrs(span: trace_pb2.Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(v, v.WhichOneof("value")) for v in kv.value.array_value.values]
        else:
            out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[trace_pb2.Span]:
    return [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


async def read_spans(
    bootstrap: str, want: int, within: float = 15.0
) -> tuple[list[trace_pb2.Span], list[Any]]:
    """Spans from outrider.spans until `want` arrived; also the raw records."""
    consumer = AIOKafkaConsumer(
        outrider.SPANS_TOPIC,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        metadata_max_age_ms=500,
    )
    await consumer.start()
    spans: list[trace_pb2.Span] = []
    records: list[Any] = []
    try:
        deadline = time.monotonic() + within
        while len(spans) < want and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                for record in batch:
                    records.append(record)
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(record.value)
                    spans.extend(spans_of(request))
    finally:
        await consumer.stop()
    return spans, records


async def test_chat_and_tool_spans_reach_kafka_with_agent_parent(
    broker: EmbeddedBroker, sim: SimProvider
) -> None:
    sim.script("sim-good", Fault.http_error(503, times=1))  # one retry: two attempt spans
    config = sidecar_config(sim, kafka=broker.bootstrap_servers, metrics_port=None)
    metadata = (("traceparent", TRACEPARENT),)
    async with Sidecar(config, sidecar_id="tr-1") as sidecar:
        async with grpc.aio.insecure_channel(sidecar.address) as ch:
            stub = sidecar_pb2_grpc.SidecarStub(ch)
            session = await open_session(stub, user_id="u1")
            sid = session.session_id
            reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER), metadata=metadata)
            assert reply.attempts == 2
            await stub.CallTool(
                sidecar_pb2.CallToolRequest(
                    session_id=sid, tool_name="lookup_order", arguments_json='{"order_id": "A1"}'
                ),
                metadata=metadata,
            )
        # what the provider and the tool were sent: the attempt's / tool span's context
        sent = [r.headers.get("traceparent", "") for r in sim.received]
        assert len(sent) == 3 and all(tp.startswith(f"00-{TRACE_ID}-") for tp in sent), sent
        assert AGENT_SPAN not in "".join(sent)  # each names the sidecar's own span
    # stop() flushed the tracer provider into Kafka
    spans, records = await read_spans(broker.bootstrap_servers, 6)
    assert {r.key for r in records} == {TRACE_ID.encode()}
    assert all(
        dict(r.headers).get(outrider.CONTENT_TYPE_HEADER) == b"application/x-protobuf" for r in records
    )
    by_name: dict[str, list[trace_pb2.Span]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    (chat,) = by_name["chat sim-good"]
    (turn,) = by_name["invoke_agent support-bot"]  # the session turn, parent of its chat span
    (tool,) = by_name["execute_tool lookup_order"]
    attempts = by_name["attempt"]
    assert len(attempts) == 3  # two for the chat, one for the tool
    assert turn.trace_id.hex() == TRACE_ID and turn.parent_span_id.hex() == AGENT_SPAN
    assert chat.trace_id.hex() == TRACE_ID and chat.parent_span_id == turn.span_id
    assert attrs(turn)["gen_ai.conversation.id"] == attrs(chat)["gen_ai.conversation.id"]
    assert chat.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    a = attrs(chat)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "sim-good"
    assert a["gen_ai.response.model"] == "sim-good"
    assert a["gen_ai.response.id"] == reply.response_id
    assert a["gen_ai.response.finish_reasons"] == [reply.finish_reason]
    assert a["gen_ai.usage.input_tokens"] == reply.usage.input_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == reply.usage.output_tokens > 0
    assert a["gen_ai.conversation.id"] and a["gen_ai.conversation.id"] not in sid.split(".")[1]
    assert a["outrider.version.id"] == session.version_id and a["outrider.role"] == "stable"
    assert a["outrider.cost.usd"] == pytest.approx(reply.cost_usd)
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a  # not opted in
    chat_attempts = sorted(
        (s for s in attempts if s.parent_span_id == chat.span_id), key=lambda s: s.start_time_unix_nano
    )
    assert [attrs(s)["outrider.attempt"] for s in chat_attempts] == [1, 2]
    assert attrs(chat_attempts[0])["error.type"] == "provider_5xx"
    assert chat_attempts[0].status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert sent[1] == f"00-{TRACE_ID}-{chat_attempts[1].span_id.hex()}-01"
    assert tool.parent_span_id.hex() == AGENT_SPAN
    t = attrs(tool)
    assert t["gen_ai.operation.name"] == "execute_tool" and t["gen_ai.tool.name"] == "lookup_order"
    assert "gen_ai.tool.call.arguments" not in t
    assert sidecar.metrics.registry.get_sample_value("outrider_sidecar_spans_exported_total") == 6


async def test_fallback_tier_is_visible_on_the_span(
    broker: EmbeddedBroker,
    resilience_sim: SimProvider,  # noqa: F811
) -> None:
    cfg = resilience_config(
        resilience_sim,
        fallback=tiers(resilience_sim, "light"),
        kafka={"bootstrap_servers": broker.bootstrap_servers},
    )
    resilience_sim.script("primary", Fault.http_error(500, times=None))
    async with Sidecar(cfg, sidecar_id="tr-2") as sidecar, grpc.aio.insecure_channel(sidecar.address) as ch:
        stub = sidecar_pb2_grpc.SidecarStub(ch)
        sid = (await open_session(stub)).session_id
        reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
        assert reply.fallback_tier == 1
    spans, _ = await read_spans(broker.bootstrap_servers, 2 + reply.attempts)
    (chat,) = [s for s in spans if s.name.startswith("chat ")]
    a = attrs(chat)
    assert a["outrider.fallback.tier"] == 1 and a["outrider.degraded"] is True
    assert a["gen_ai.response.model"] == "light"
    (event,) = [e for e in chat.events if e.name == "fallback"]
    ev = {kv.key: kv.value for kv in event.attributes}
    assert ev["outrider.fallback.tier"].int_value == 1 and ev["gen_ai.request.model"].string_value == "light"
    (turn,) = [s for s in spans if s.name.startswith("invoke_agent ")]
    assert chat.parent_span_id == turn.span_id
    assert not turn.parent_span_id  # no trace context from the agent: a new trace


async def test_content_only_when_opted_in(
    broker: EmbeddedBroker, sim: SimProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    config = sidecar_config(sim, kafka=broker.bootstrap_servers, metrics_port=None)
    async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as ch:
        stub = sidecar_pb2_grpc.SidecarStub(ch)
        sid = (await open_session(stub)).session_id
        reply = await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
    spans, _ = await read_spans(broker.bootstrap_servers, 3)
    (chat,) = [s for s in spans if s.name.startswith("chat ")]
    a = attrs(chat)
    assert "Where is my order?" in a["gen_ai.input.messages"]
    assert reply.message.content in a["gen_ai.output.messages"]


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_direct_otlp_export_when_the_standard_env_is_set(
    sim: SimProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "true")
        # Kafka unreachable, and no spill: the OTLP path alone must deliver
        config = sidecar_config(sim, metrics_port=None, kafka=f"127.0.0.1:{free_port()}")
        async with Sidecar(config) as sidecar, grpc.aio.insecure_channel(sidecar.address) as ch:
            stub = sidecar_pb2_grpc.SidecarStub(ch)
            sid = (await open_session(stub)).session_id
            await stub.Chat(
                sidecar_pb2.ChatRequest(session_id=sid, messages=USER),
                metadata=(("traceparent", TRACEPARENT),),
            )
        spans = [s for r in receiver.requests for s in spans_of(r)]
        (chat,) = [s for s in spans if s.name == "chat sim-good"]
        (turn,) = [s for s in spans if s.name == "invoke_agent support-bot"]
        assert chat.trace_id.hex() == TRACE_ID and chat.parent_span_id == turn.span_id
        assert turn.parent_span_id.hex() == AGENT_SPAN
        resource = {
            kv.key: kv.value.string_value
            for r in receiver.requests
            for rs in r.resource_spans
            for kv in rs.resource.attributes
        }
        assert resource["service.name"] == "outrider-sidecar" and resource["outrider.agent"] == "support-bot"
    finally:
        await asyncio.to_thread(server.stop, None)
