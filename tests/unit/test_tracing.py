"""GenAI spans, W3C context in and out, opt-in content, and the Kafka span encoding."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import outrider
from outrider.v1 import common_pb2
from sidecar.telemetry import _semconv as sc
from sidecar.telemetry._span_records import (
    SpanRecord,
    build_tracer_provider,
    encode_span_records,
    trace_key,
)
from sidecar.telemetry._tracing import Tracing

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@dataclass
class Traced:
    tracing: Tracing
    exporter: InMemorySpanExporter
    provider: TracerProvider = field(repr=False)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def one(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]


def _traced(capture_content: bool) -> Iterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "outrider-sidecar-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Traced(Tracing(provider, capture_content=capture_content), exporter, provider)
    provider.shutdown()


@pytest.fixture
def traced() -> Iterator[Traced]:
    yield from _traced(capture_content=False)


@pytest.fixture
def traced_content() -> Iterator[Traced]:
    yield from _traced(capture_content=True)


def _messages() -> list[common_pb2.ChatMessage]:
    return [
        common_pb2.ChatMessage(role="system", content="You are terse."),
        common_pb2.ChatMessage(role="user", content="secret prompt text"),
    ]


def _chat(t: Traced, **overrides: object) -> None:
    parent = t.tracing.extract_parent([("traceparent", TRACEPARENT), ("x-other", b"1")])
    kwargs: dict[str, object] = {
        "model": "gpt-4o-mini",
        "provider": "openai",
        "server_address": "127.0.0.1",
        "server_port": 8080,
        "conversation_id": "sess-1",
        "version_id": "v-abc",
        "role": "canary",
        "request_params": {"temperature": 0.2, "max_tokens": 256, "stop": ["x"]},
    }
    kwargs.update(overrides)
    with t.tracing.chat_span(parent, **kwargs) as span:  # type: ignore[arg-type]
        span.set_input_messages(_messages())
        span.set_quota_wait(12.5)
        span.set_guard_hits(["pii.email"])
        span.set_response(
            model="gpt-4o-mini-2024",
            response_id="chatcmpl-1",
            finish_reasons=["stop"],
            input_tokens=10,
            output_tokens=5,
            cost_usd=0.0012,
            tier=0,
            degraded=False,
        )
        span.set_output_messages([common_pb2.ChatMessage(role="assistant", content="secret answer")])


# --- semconv ---------------------------------------------------------------------------


def test_span_names() -> None:
    assert sc.chat_span_name("gpt-4o") == "chat gpt-4o"
    assert sc.chat_span_name("") == "chat"
    assert sc.tool_span_name("search") == "execute_tool search"


@pytest.mark.parametrize(
    ("value", "on"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("span_only", True),
        ("SPAN_AND_EVENT", True),
        ("false", False),
        ("0", False),
        ("NO_CONTENT", False),
        ("", False),
        ("maybe", False),
    ],
)
def test_capture_content_setting(value: str, on: bool) -> None:
    assert sc.capture_content_enabled({sc.CAPTURE_CONTENT_ENV: value}) is on
    assert sc.capture_content_enabled({}) is False


# --- spans -------------------------------------------------------------------------------


def test_chat_span_is_a_child_of_the_agents_traceparent(traced: Traced) -> None:
    _chat(traced)
    span = traced.one("chat gpt-4o-mini")
    assert span.kind is SpanKind.CLIENT
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and span.parent.is_remote
    assert format(span.parent.span_id, "016x") == PARENT_ID
    attrs = dict(span.attributes or {})
    assert attrs == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.max_tokens": 256,
        "gen_ai.conversation.id": "sess-1",
        "server.address": "127.0.0.1",
        "server.port": 8080,
        "outrider.version.id": "v-abc",
        "outrider.role": "canary",
        "outrider.quota.wait_ms": 12.5,
        "outrider.guard.hits": ("pii.email",),
        "gen_ai.response.model": "gpt-4o-mini-2024",
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 10,
        "gen_ai.usage.output_tokens": 5,
        "outrider.cost.usd": 0.0012,
        "outrider.fallback.tier": 0,
        "outrider.degraded": False,
    }
    assert span.status.status_code is StatusCode.UNSET


def test_no_traceparent_starts_a_new_trace(traced: Traced) -> None:
    parent = traced.tracing.extract_parent([("user-agent", "grpc-python")])
    with traced.tracing.chat_span(parent, model="m", provider="openai"):
        pass
    (span,) = traced.spans()
    assert span.parent is None
    assert span.context.is_valid


def test_malformed_traceparent_is_ignored(traced: Traced) -> None:
    parent = traced.tracing.extract_parent([("traceparent", "00-zz-yy-01")])
    with traced.tracing.chat_span(parent, model="m", provider="openai"):
        pass
    (span,) = traced.spans()
    assert span.parent is None


def test_content_is_not_recorded_by_default(traced: Traced) -> None:
    _chat(traced)
    span = traced.one("chat gpt-4o-mini")
    attrs = dict(span.attributes or {})
    assert sc.GEN_AI_INPUT_MESSAGES not in attrs
    assert sc.GEN_AI_OUTPUT_MESSAGES not in attrs
    blob = repr(attrs) + repr([e.attributes for e in span.events])
    assert "secret" not in blob


def test_content_is_recorded_when_opted_in(traced_content: Traced) -> None:
    _chat(traced_content)
    attrs = dict(traced_content.one("chat gpt-4o-mini").attributes or {})
    inputs = json.loads(str(attrs[sc.GEN_AI_INPUT_MESSAGES]))
    assert inputs == [
        {"role": "system", "parts": [{"type": "text", "content": "You are terse."}]},
        {"role": "user", "parts": [{"type": "text", "content": "secret prompt text"}]},
    ]
    outputs = json.loads(str(attrs[sc.GEN_AI_OUTPUT_MESSAGES]))
    assert outputs == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "secret answer"}],
            "finish_reason": "stop",
        }
    ]


def test_tool_calls_and_tool_results_as_parts(traced_content: Traced) -> None:
    call = common_pb2.ToolCall(id="call_1", name="search", arguments_json='{"q": "x"}')
    messages = [
        common_pb2.ChatMessage(role="assistant", tool_calls=[call]),
        common_pb2.ChatMessage(role="tool", tool_call_id="call_1", content="found"),
    ]
    with traced_content.tracing.chat_span(None, model="m", provider="openai") as span:
        span.set_input_messages(messages)
    attrs = dict(traced_content.one("chat m").attributes or {})
    assert json.loads(str(attrs[sc.GEN_AI_INPUT_MESSAGES])) == [
        {
            "role": "assistant",
            "parts": [{"type": "tool_call", "id": "call_1", "name": "search", "arguments": {"q": "x"}}],
        },
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "found"}]},
    ]


def test_attempts_and_fallback_are_visible(traced: Traced) -> None:
    with traced.tracing.chat_span(None, model="big", provider="openai", server_address="p1") as span:
        with pytest.raises(TimeoutError), span.attempt(1, tier=0):
            raise TimeoutError
        with span.attempt(2, tier=0) as attempt:
            attempt.set_error("http.503")
        span.record_fallback(1, model="small", provider="openai", reason="breaker_open")
        with span.attempt(1, tier=1, model="small"):
            pass
        span.record_attempt(3, error_type="timeout", tier=0, duration_ms=10.0)
        span.set_response(tier=1, degraded=True)
    chat = traced.one("chat big")
    attempts = sorted((s for s in traced.spans() if s.name == "attempt"), key=lambda s: s.start_time or 0)
    assert len(attempts) == 3
    for a in attempts:
        assert a.parent is not None and a.parent.span_id == chat.context.span_id
        assert a.context.trace_id == chat.context.trace_id
        assert a.kind is SpanKind.CLIENT
        assert (a.attributes or {})["server.address"] == "p1"
    first, second, third = (dict(a.attributes or {}) for a in attempts)
    assert first["outrider.attempt"] == 1 and first["error.type"] == "TimeoutError"
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert second["error.type"] == "http.503"
    assert third == {
        "outrider.attempt": 1,
        "outrider.fallback.tier": 1,
        "gen_ai.request.model": "small",
        "server.address": "p1",
    }
    events = {e.name: dict(e.attributes or {}) for e in chat.events}
    assert events["fallback"] == {
        "outrider.fallback.tier": 1,
        "gen_ai.request.model": "small",
        "gen_ai.provider.name": "openai",
        "outrider.fallback.reason": "breaker_open",
    }
    assert events["attempt"]["error.type"] == "timeout"
    assert (chat.attributes or {})["outrider.degraded"] is True
    assert chat.status.status_code is StatusCode.UNSET  # the call itself succeeded


def test_an_exception_marks_the_span_failed(traced: Traced) -> None:
    with pytest.raises(ConnectionError), traced.tracing.chat_span(None, model="m", provider="openai"):
        raise ConnectionError("details that must not be copied")
    (span,) = traced.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "ConnectionError"
    assert "details" not in str(span.status.description)


def test_an_explicit_error_wins_over_the_exception(traced: Traced) -> None:
    with pytest.raises(RuntimeError), traced.tracing.chat_span(None, model="m", provider="openai") as span:
        span.set_error("quota_exhausted", "RESOURCE_EXHAUSTED")
        raise RuntimeError("abort")
    (span_data,) = traced.spans()
    assert (span_data.attributes or {})["error.type"] == "quota_exhausted"
    assert span_data.status.description == "RESOURCE_EXHAUSTED"


async def test_cancellation_is_an_error_type(traced: Traced) -> None:
    async def call() -> None:
        with traced.tracing.chat_span(None, model="m", provider="openai"):
            await asyncio.sleep(10)

    task = asyncio.create_task(call())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (span,) = traced.spans()
    assert (span.attributes or {})["error.type"] == "cancelled"


def test_tool_span(traced_content: Traced) -> None:
    parent = traced_content.tracing.extract_parent([("traceparent", TRACEPARENT)])
    with traced_content.tracing.tool_span(
        parent, tool="search", call_id="call_9", conversation_id="s", version_id="v", role="stable"
    ) as span:
        span.set_arguments('{"q": 1}')
        with span.attempt(1):
            pass
        span.set_result("ok")
    tool = traced_content.one("execute_tool search")
    assert tool.kind is SpanKind.INTERNAL
    attrs = dict(tool.attributes or {})
    assert attrs["gen_ai.operation.name"] == "execute_tool"
    assert attrs["gen_ai.tool.name"] == "search"
    assert attrs["gen_ai.tool.call.id"] == "call_9"
    assert attrs["gen_ai.tool.call.arguments"] == '{"q": 1}'
    assert attrs["gen_ai.tool.call.result"] == "ok"
    assert format(tool.context.trace_id, "032x") == TRACE_ID
    attempt = traced_content.one("attempt")
    assert attempt.parent is not None and attempt.parent.span_id == tool.context.span_id


def test_tool_content_off_by_default(traced: Traced) -> None:
    with traced.tracing.tool_span(None, tool="search") as span:
        span.set_arguments('{"q": 1}')
        span.set_result("ok")
    attrs = dict(traced.one("execute_tool search").attributes or {})
    assert "gen_ai.tool.call.arguments" not in attrs and "gen_ai.tool.call.result" not in attrs


def test_inject_headers_round_trip(traced: Traced) -> None:
    parent = traced.tracing.extract_parent([("traceparent", TRACEPARENT), ("tracestate", "vendor=x")])
    assert traced.tracing.inject_headers(parent) == {"traceparent": TRACEPARENT, "tracestate": "vendor=x"}
    with traced.tracing.chat_span(parent, model="m", provider="openai") as span, span.attempt(1) as attempt:
        headers = attempt.headers()
        back = traced.tracing.extract_parent(list(headers.items()))
        assert traced.tracing.inject_headers(back) == headers
    attempt_span = traced.one("attempt")
    assert headers["traceparent"] == f"00-{TRACE_ID}-{attempt_span.context.span_id:016x}-01"
    assert headers["tracestate"] == "vendor=x"
    assert traced.tracing.inject_headers(None) == {}


def test_bytes_metadata_and_uppercase_keys(traced: Traced) -> None:
    parent = traced.tracing.extract_parent([("Traceparent", TRACEPARENT.encode()), ("x-bin", b"\xff")])
    assert traced.tracing.inject_headers(parent)["traceparent"] == TRACEPARENT


def test_without_a_provider_context_still_flows() -> None:
    tracing = Tracing(None)
    assert not tracing.enabled
    parent = tracing.extract_parent([("traceparent", TRACEPARENT)])
    with tracing.chat_span(parent, model="m", provider="openai") as span:
        span.set_response(model="m", input_tokens=1)
        assert not span.span.is_recording()
        assert span.headers()["traceparent"] == TRACEPARENT


# --- Kafka span encoding -----------------------------------------------------------------


def _spans_in_two_traces(t: Traced) -> list[ReadableSpan]:
    for traceparent in (TRACEPARENT, f"00-{'1' * 32}-{'2' * 16}-01"):
        parent = t.tracing.extract_parent([("traceparent", traceparent)])
        with t.tracing.chat_span(parent, model="m", provider="openai", conversation_id="s") as span:
            with span.attempt(1):
                pass
            span.set_response(input_tokens=3, output_tokens=4)
    return t.spans()


def test_span_records_are_one_per_trace_in_otlp_protobuf(traced: Traced) -> None:
    spans = _spans_in_two_traces(traced)
    assert len(spans) == 4
    records, dropped = encode_span_records(spans)
    assert dropped == 0
    assert sorted(r.key for r in records) == sorted([b"1" * 32, TRACE_ID.encode()])
    for record in records:
        assert record.topic == outrider.SPANS_TOPIC
        assert record.headers == [("content-type", b"application/x-protobuf")]
        request = ExportTraceServiceRequest.FromString(record.value)
        (resource_spans,) = request.resource_spans
        resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
        assert resource["service.name"] == "outrider-sidecar-test"
        (scope_spans,) = resource_spans.scope_spans
        assert scope_spans.scope.name == "outrider.sidecar"
        assert {s.trace_id.hex() for s in scope_spans.spans} == {record.key.decode()}
        by_name = {s.name: s for s in scope_spans.spans}
        assert by_name["attempt"].parent_span_id == by_name["chat m"].span_id
        chat_attrs = {kv.key: kv.value for kv in by_name["chat m"].attributes}
        assert chat_attrs["gen_ai.provider.name"].string_value == "openai"
        assert chat_attrs["gen_ai.usage.output_tokens"].int_value == 4
    assert len(records) == 2


def test_a_big_trace_is_split_and_an_oversize_span_dropped(traced: Traced) -> None:
    with traced.tracing.chat_span(None, model="m", provider="openai") as span:
        for n in range(8):
            with span.attempt(n):
                pass
    spans = traced.spans()
    whole = len(encode_span_records(spans)[0][0].value)
    limit = max(len(encode_span_records([s])[0][0].value) for s in spans) * 2
    assert limit < whole
    records, dropped = encode_span_records(spans, max_record_bytes=limit)
    assert dropped == 0 and len(records) > 1
    assert len({r.key for r in records}) == 1
    seen = [s.span_id for r in records for s in _pb_spans(r)]
    assert sorted(seen) == sorted(s.context.span_id.to_bytes(8, "big") for s in spans)
    assert all(len(r.value) <= limit for r in records)
    records, dropped = encode_span_records(spans, max_record_bytes=10)
    assert records == [] and dropped == len(spans)


def _pb_spans(record: SpanRecord) -> list[trace_pb2.Span]:
    request = ExportTraceServiceRequest.FromString(record.value)
    return [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=12))
def test_records_partition_spans_by_trace(trace_choices: list[int]) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    try:
        for n, choice in enumerate(trace_choices):
            parent = tracing.extract_parent([("traceparent", f"00-{choice:032x}-{n + 1:016x}-01")])
            with tracing.chat_span(parent, model="m", provider="p"):
                pass
        spans = exporter.get_finished_spans()
        records, dropped = encode_span_records(spans)
        assert dropped == 0
        assert [r.key for r in records] == [trace_key(t) for t in dict.fromkeys(trace_choices)]
        for record in records:
            assert {s.trace_id.hex() for s in _pb_spans(record)} == {record.key.decode()}
        assert sum(len(_pb_spans(r)) for r in records) == len(trace_choices)
    finally:
        provider.shutdown()


def test_otlp_exporter_from_the_standard_env() -> None:
    provider = build_tracer_provider(
        environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    )
    try:
        processors = provider._active_span_processor._span_processors
        assert len(processors) == 1
    finally:
        provider.shutdown()
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        build_tracer_provider(
            environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
        )
    no_otlp = build_tracer_provider(environ={})
    assert no_otlp._active_span_processor._span_processors == ()
    no_otlp.shutdown()


# --- invoke_agent (a session turn) -------------------------------------------------------


def test_genai_invoke_agent_span_parents_the_chat_span(traced: Traced) -> None:
    parent = traced.tracing.extract_parent([("traceparent", TRACEPARENT)])
    with (
        traced.tracing.agent_span(
            parent, agent="support-bot", conversation_id="sess-1", version_id="v-abc", role="canary"
        ) as turn,
        traced.tracing.chat_span(turn.context, model="m", provider="openai", conversation_id="sess-1"),
    ):
        pass
    agent, chat = traced.one("invoke_agent support-bot"), traced.one("chat m")
    assert agent.kind == SpanKind.INTERNAL
    assert agent.parent is not None and format(agent.parent.span_id, "016x") == PARENT_ID
    assert format(agent.context.trace_id, "032x") == TRACE_ID
    assert chat.parent is not None and chat.parent.span_id == agent.context.span_id
    assert dict(agent.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "support-bot",
        "gen_ai.conversation.id": "sess-1",
        "outrider.version.id": "v-abc",
        "outrider.role": "canary",
    }
    assert sc.agent_span_name("") == "invoke_agent"
