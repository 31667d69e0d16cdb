"""GenAI client metrics and the `invoke_agent` span from a real Sidecar against the SimProvider:
one Chat and one ChatStream through the call pipeline, each recorded once (duration, first
chunk for the stream, tokens under both names) with provider, model and version labels, and
each turn's `invoke_agent` span the parent of its `chat` span."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from devstack.simprovider import Fault, SimProvider
from outrider.v1 import sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from tests.integration.test_sidecar_api import API_KEY, USER, open_session, sidecar_config, sim_models

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=3) as provider:
        yield provider


async def test_genai_metrics_and_invoke_agent_span_for_real_calls(sim: SimProvider) -> None:
    exporter = InMemorySpanExporter()
    async with Sidecar(sidecar_config(sim, metrics_port=None), sidecar_id="genai-1") as sidecar:
        assert sidecar.tracer_provider is not None
        sidecar.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        async with grpc.aio.insecure_channel(sidecar.address) as ch:
            stub = sidecar_pb2_grpc.SidecarStub(ch)
            session = await open_session(stub, user_id="u1")
            sid, version = session.session_id, session.version_id
            reply = await stub.Chat(
                sidecar_pb2.ChatRequest(session_id=sid, messages=USER),
                metadata=(("traceparent", TRACEPARENT),),
            )
            chunks = [
                c async for c in stub.ChatStream(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
            ]
            final = chunks[-1].final
            sim.script("sim-good", Fault.http_error(400, times=1))  # not retried: one failed call
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Chat(sidecar_pb2.ChatRequest(session_id=sid, messages=USER))
        sample = sidecar.metrics.registry.get_sample_value
        labels = {
            "gen_ai_operation_name": "chat",
            "gen_ai_provider_name": "openai",
            "gen_ai_request_model": "sim-good",
            "outrider_version_id": version,
        }
        ok = {**labels, "error_type": ""}
        assert sample("gen_ai_client_operation_duration_seconds_count", ok) == 2
        assert sample("gen_ai_client_operation_duration_seconds_sum", ok) > 0
        failed = [
            s
            for m in sidecar.metrics.registry.collect()
            if m.name == "gen_ai_client_operation_duration_seconds"
            for s in m.samples
            if s.name.endswith("_count") and s.labels["error_type"] not in ("",)
        ]
        assert len(failed) == 1 and failed[0].value == 1
        assert sample("gen_ai_client_operation_time_to_first_chunk_seconds_count", labels) == 1  # the stream
        input_total = reply.usage.input_tokens + final.usage.input_tokens
        output_total = reply.usage.output_tokens + final.usage.output_tokens
        assert sample("gen_ai_client_inference_usage_input_tokens_total", labels) == input_total > 0
        assert sample("gen_ai_client_inference_usage_output_tokens_total", labels) == output_total > 0
        for token_type, total in (("input", input_total), ("output", output_total)):
            token_labels = {**labels, "gen_ai_token_type": token_type}
            assert sample("gen_ai_client_token_usage_count", token_labels) == 2
            assert sample("gen_ai_client_token_usage_sum", token_labels) == total
        assert b"gen_ai_client_operation_duration_seconds_bucket{" in sidecar.metrics.exposition()

    spans = exporter.get_finished_spans()
    turns = [s for s in spans if s.name == "invoke_agent support-bot"]
    chats = [s for s in spans if s.name == "chat sim-good"]
    assert len(turns) == len(chats) == 3  # one turn per call, failed ones included
    by_id = {t.context.span_id: t for t in turns}
    for chat in chats:
        assert chat.parent is not None
        turn = by_id[chat.parent.span_id]  # every chat span's parent is its turn's span
        assert turn.context.trace_id == chat.context.trace_id
        assert turn.attributes is not None and chat.attributes is not None
        assert turn.attributes["gen_ai.operation.name"] == "invoke_agent"
        assert turn.attributes["gen_ai.agent.name"] == "support-bot"
        assert turn.attributes["gen_ai.conversation.id"] == chat.attributes["gen_ai.conversation.id"]
        assert turn.attributes["outrider.version.id"] == version
        assert turn.end_time is not None and chat.end_time is not None and turn.end_time >= chat.end_time
    assert len({t.attributes["gen_ai.conversation.id"] for t in turns if t.attributes}) == 1  # one session
    first = min(turns, key=lambda t: t.start_time or 0)
    assert first.parent is not None and format(first.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert sum(1 for t in turns if not t.status.is_ok) == 1  # the failed call's turn is marked failed
