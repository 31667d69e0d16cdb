"""`LiteSpan`s (the sidecar's default span path) encode to the same OTLP as SDK spans.

The same calls run through a `Tracing` whose provider holds only the telemetry queue's
processor (LiteSpans) and through one with a second processor (SDK spans); the records put on
`outrider.spans` must be the same protobuf, ids and times aside.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan

from sidecar.telemetry._lite_spans import LiteSpan
from sidecar.telemetry._span_queue import SpanQueueProcessor
from sidecar.telemetry._span_records import build_tracer_provider, encode_span_records, trace_key
from sidecar.telemetry._tracing import Tracing

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


@dataclass
class Queue:
    """Stands in for the TelemetryProducer: what `SpanQueueProcessor` hands over."""

    spans: list[ReadableSpan | LiteSpan] = field(default_factory=list)

    def emit_span(self, span: ReadableSpan | LiteSpan) -> bool:
        self.spans.append(span)
        return True


@dataclass
class Setup:
    tracing: Tracing
    queue: Queue
    provider: TracerProvider


@pytest.fixture
def make() -> Iterator[object]:
    loop = asyncio.new_event_loop()
    providers: list[TracerProvider] = []

    def _make(*, sdk: bool, provider: TracerProvider | None = None) -> Setup:
        if provider is None:
            provider = build_tracer_provider(
                resource_attributes={"outrider.agent": "a", "service.instance.id": "s1"}, otlp_from_env=False
            )
        providers.append(provider)
        queue = Queue()
        provider.add_span_processor(SpanQueueProcessor(queue, loop))  # type: ignore[arg-type]
        if sdk:  # anyone else taking spans needs SDK spans
            provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        return Setup(Tracing(provider), queue, provider)

    yield _make
    for provider in providers:
        provider.shutdown()
    loop.close()


def _turn(tracing: Tracing, traceparent: str | None) -> None:
    """One call's spans as the recorder makes them, with every kind of attribute."""
    parent = tracing.extract_parent([("traceparent", traceparent)] if traceparent else [])
    turn = {"conversation_id": "c1", "version_id": "v2", "role": "canary"}
    with tracing.agent_span(parent, agent="support", **turn) as agent:
        with tracing.chat_span(
            agent.context,
            model="gpt-4o-mini",
            provider="openai",
            server_address="api.example",
            server_port=443,
            conversation_id="c1",
            version_id="v2",
            role="canary",
            request_params={"temperature": 0.2, "max_tokens": 64},
            stream=False,
        ) as chat:
            with pytest.raises(TimeoutError), chat.attempt(1, tier=0, model="gpt-4o-mini"):
                raise TimeoutError
            with chat.attempt(2, tier=0) as attempt:
                trace_of = attempt.headers()["traceparent"].split("-")[1]
                assert trace_of == chat.headers()["traceparent"].split("-")[1]
            chat.record_attempt(1, error_type="TimeoutError", tier=0, duration_ms=12.5)
            chat.record_fallback(1, model="small", provider="openai", reason="timeout")
            chat.set_response(
                model="gpt-4o-mini-2024",
                response_id="r1",
                finish_reasons=["stop"],
                input_tokens=12,
                output_tokens=3,
                cost_usd=0.0001,
                tier=1,
                degraded=True,
            )
            chat.set_quota_wait(1.5)
            chat.set_guard_hits(["pii.email", "injection"])
        agent.set_error("UpstreamError", "upstream failed")
    with tracing.tool_span(parent, tool="lookup", call_id="t1", server_address="h", server_port=9) as tool:
        tool.set_disposition("simulate")


def _normalized(records: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Records with ids replaced by their order of appearance and times zeroed."""
    ids: dict[bytes, bytes] = {}

    def norm(raw: bytes) -> bytes:
        return raw and ids.setdefault(raw, len(ids).to_bytes(len(raw), "big"))

    out = []
    for key, value in records:
        request = ExportTraceServiceRequest.FromString(value)
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    span.trace_id, span.span_id = norm(span.trace_id), norm(span.span_id)
                    span.parent_span_id = norm(span.parent_span_id)
                    span.start_time_unix_nano = span.end_time_unix_nano = 0
                    for event in span.events:
                        event.time_unix_nano = 0
        known = key == trace_key(0x0AF7651916CD43DD8448EB211C80319C)  # else a new trace's random id
        out.append((key if known else b"", request.SerializeToString()))
    return out


@pytest.mark.parametrize("traceparent", [TRACEPARENT, None])
def test_lite_spans_encode_like_sdk_spans(make: object, traceparent: str | None) -> None:
    lite, sdk = make(sdk=False), make(sdk=True)  # type: ignore[operator]
    _turn(lite.tracing, traceparent)
    _turn(sdk.tracing, traceparent)
    assert lite.queue.spans and all(isinstance(s, LiteSpan) for s in lite.queue.spans)
    assert sdk.queue.spans and all(isinstance(s, ReadableSpan) for s in sdk.queue.spans)
    assert len(lite.queue.spans) == len(sdk.queue.spans) == 5
    lite_records, lite_dropped = encode_span_records(lite.queue.spans)
    sdk_records, sdk_dropped = encode_span_records(sdk.queue.spans)
    assert lite_dropped == sdk_dropped == 0
    as_pairs = [(r.key, r.value) for r in lite_records], [(r.key, r.value) for r in sdk_records]
    assert _normalized(as_pairs[0]) == _normalized(as_pairs[1])
    assert [r.headers for r in lite_records] == [r.headers for r in sdk_records]
    # again, from the writer's caches of attribute fields: the same bytes
    again, _ = encode_span_records(lite.queue.spans)
    assert [(r.key, r.value) for r in again] == as_pairs[0]


def test_unsampled_parent_gives_no_span_but_passes_context_on(make: object) -> None:
    lite = make(sdk=False)  # type: ignore[operator]
    parent = lite.tracing.extract_parent([("traceparent", UNSAMPLED)])
    with lite.tracing.chat_span(parent, model="m", provider="openai") as chat:
        assert isinstance(chat.span, NonRecordingSpan)
        assert chat.headers()["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
        assert chat.headers()["traceparent"].endswith("-00")
    assert lite.queue.spans == []


def test_other_sampler_or_processor_switches_to_sdk_spans(make: object) -> None:
    custom = make(sdk=False, provider=TracerProvider(sampler=ALWAYS_ON))  # type: ignore[operator]
    with custom.tracing.chat_span(None, model="m", provider="openai"):
        pass
    assert [type(s) for s in custom.queue.spans] != [LiteSpan]
    lite = make(sdk=False)  # type: ignore[operator]
    with lite.tracing.chat_span(None, model="m", provider="openai"):
        pass
    lite.provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))  # added while running
    with lite.tracing.chat_span(None, model="m", provider="openai"):
        pass
    assert [isinstance(s, LiteSpan) for s in lite.queue.spans] == [True, False]


def test_lite_span_after_end_changes_nothing(make: object) -> None:
    lite = make(sdk=False)  # type: ignore[operator]
    with lite.tracing.chat_span(None, model="m", provider="openai") as chat:
        pass
    span = lite.queue.spans[0]
    assert isinstance(span, LiteSpan) and not span.is_recording()
    chat.set_attribute("late", 1)
    chat.set_error("Late")
    span.end()
    assert "late" not in span.attributes and len(lite.queue.spans) == 1


def test_cached_attribute_fields_keep_bool_int_and_float_apart() -> None:
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    from sidecar.telemetry import _otlp_wire

    decoded = []
    for value in (1, True, 1.0, "1", 1, True):  # the repeats come from the cache
        out: list[bytes] = []
        _otlp_wire._attributes(_otlp_wire._SPAN_ATTRIBUTE, {"a": value}, out)
        field = out[0][2:]  # tag and one-byte length off: the KeyValue
        decoded.append(KeyValue.FromString(field).value.WhichOneof("value"))
    assert decoded == ["int_value", "bool_value", "double_value", "string_value", "int_value", "bool_value"]
