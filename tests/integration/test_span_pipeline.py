"""Spans end to end: SDK -> OTLP records (`encode_span_records`) -> `outrider.spans` on the embedded broker ->
SpanRelay -> a real OTLP gRPC TraceService on loopback. Parent links and gen_ai.*
attributes survive; garbage is counted and skipped; a receiver that is briefly down gets
everything once it is back; offsets are committed only for what was delivered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, overload

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import outrider
from collector._relay import SpanBatch, SpanRelay, decode_spans_record
from devstack.broker import EmbeddedBroker
from sidecar.telemetry._span_records import SpanRecord, encode_span_records
from sidecar.telemetry._tracing import Tracing

pytestmark = pytest.mark.broker

AGENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP TraceService that stores what it accepts and fails as scripted."""

    def __init__(self) -> None:
        # scripted failures, in order: a status code, or (code, RetryInfo delay in seconds)
        self.fail_with: list[grpc.StatusCode | tuple[grpc.StatusCode, float]] = []
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.calls = 0
        self.call_times: list[float] = []

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.calls += 1
        self.call_times.append(time.monotonic())
        if self.fail_with:
            failure = self.fail_with.pop(0)
            if isinstance(failure, tuple):
                code, delay = failure
                hint = RetryInfo(retry_delay=Duration(seconds=int(delay), nanos=int(delay % 1 * 1e9)))
                await context.abort(
                    code,
                    "scripted failure",
                    trailing_metadata=(("google.rpc.retryinfo-bin", hint.SerializeToString()),),
                )
            await context.abort(failure, "scripted failure")
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[trace_pb2.Span]:
        return [
            s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans
        ]

    def span_ids(self) -> set[bytes]:
        return {s.span_id for s in self.spans()}


async def _serve(receiver: Receiver) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    server, address = await _serve(r)
    try:
        yield r, address
    finally:
        await server.stop(None)


class EncodedSpans(Sequence[SpanRecord]):
    """The `outrider.spans` records of every finished span so far, each span encoded on its own
    (as the sidecar's queue would, had it taken one span per slice)."""

    def __init__(self, memory: InMemorySpanExporter) -> None:
        self._memory = memory

    def _records(self) -> list[SpanRecord]:
        return [r for span in self._memory.get_finished_spans() for r in encode_span_records([span])[0]]

    def __len__(self) -> int:
        return len(self._records())

    @overload
    def __getitem__(self, index: int) -> SpanRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[SpanRecord]: ...
    def __getitem__(self, index: int | slice) -> SpanRecord | list[SpanRecord]:
        return self._records()[index]


@pytest.fixture
def traced() -> Iterator[tuple[Tracing, EncodedSpans]]:
    """A Tracing whose spans are encoded as the sidecar's queue encodes them."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "outrider-sidecar"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield Tracing(provider), EncodedSpans(memory)
    provider.shutdown()


async def eventually(predicate: Callable[[], bool], within: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def produce(bootstrap: str, records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(outrider.SPANS_TOPIC, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def produce_spans(bootstrap: str, spans: Sequence[SpanRecord]) -> None:
    await produce(bootstrap, [(r.key, r.value, r.headers) for r in spans])


def agent_call(tracing: Tracing, n: int) -> None:
    """What the sidecar does for one agent request: a chat with a retried attempt and a tool."""
    parent = tracing.extract_parent([("traceparent", f"00-{AGENT_TRACE}-{AGENT_SPAN}-01")])
    with tracing.chat_span(
        parent,
        model="gpt-4o-mini",
        provider="openai",
        conversation_id=f"sess-{n}",
        version_id="v1",
        role="canary",
    ) as chat:
        with pytest.raises(TimeoutError), chat.attempt(1):
            raise TimeoutError
        with chat.attempt(2):
            pass
        chat.set_response(model="gpt-4o-mini", response_id=f"resp-{n}", input_tokens=7, output_tokens=3)
    with tracing.tool_span(parent, tool="search", call_id=f"call-{n}"):
        pass


def one_record(records: Sequence[SpanRecord]) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """Records of one trace merged into one (serialized protobuf messages concatenate)."""
    assert len({r.key for r in records}) == 1
    return records[0].key, b"".join(r.value for r in records), records[0].headers


def relay_for(broker: EmbeddedBroker, address: str, **overrides: Any) -> SpanRelay:
    options: dict[str, Any] = {
        "flush_interval_s": 0.1,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "export_timeout_s": 5.0,
    }
    options.update(overrides)
    return SpanRelay(broker.bootstrap_servers, address, **options)


async def committed_total(bootstrap: str, group_id: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(outrider.SPANS_TOPIC) or set()
        total = 0
        for p in partitions:
            total += await consumer.committed(TopicPartition(outrider.SPANS_TOPIC, p)) or 0
        return total
    finally:
        await consumer.stop()


def attrs(span: trace_pb2.Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


async def test_spans_reach_the_otlp_receiver_with_parents_and_attributes(
    broker: EmbeddedBroker, receiver: tuple[Receiver, str], traced: tuple[Tracing, EncodedSpans]
) -> None:
    recv, address = receiver
    tracing, records = traced
    for n in range(3):
        agent_call(tracing, n)
    assert len(records) == 12  # SimpleSpanProcessor: one export, so one record, per span
    garbage: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = [
        (b"junk", b"\x00\x01 definitely not protobuf \xff", []),
        (b"json", b'{"spans": []}', [("content-type", b"application/json")]),
        (None, trace_service_pb2.ExportTraceServiceRequest().SerializeToString(), []),
    ]
    await produce(broker.bootstrap_servers, garbage[:2])
    await produce_spans(broker.bootstrap_servers, records)
    await produce(broker.bootstrap_servers, garbage[2:])

    reasons: list[str] = []

    async def dead_letter(record: Any, reason: str) -> None:
        reasons.append(reason)

    async with relay_for(broker, address, on_undecodable=dead_letter) as relay:
        await eventually(lambda: len(recv.span_ids()) == 12 and relay.undecodable == 3, what="all spans")
        await eventually(lambda: relay.exported_spans == 12, what="the counters")
    assert not relay.running

    spans = recv.spans()
    assert len(spans) == 12  # 3 x (chat, 2 attempts, tool), each delivered once
    for span in spans:
        assert span.trace_id.hex() == AGENT_TRACE
    chats = [s for s in spans if s.name == "chat gpt-4o-mini"]
    attempts = [s for s in spans if s.name == "attempt"]
    tools = [s for s in spans if s.name == "execute_tool search"]
    assert (len(chats), len(attempts), len(tools)) == (3, 6, 3)
    for span in chats + tools:
        assert span.parent_span_id.hex() == AGENT_SPAN  # the agent's span is the parent
    chat_ids = {c.span_id for c in chats}
    assert all(a.parent_span_id in chat_ids for a in attempts)
    assert sum(1 for a in attempts if attrs(a).get("error.type") == "TimeoutError") == 3
    assert all(
        a.status.code == trace_pb2.Status.STATUS_CODE_ERROR for a in attempts if "error.type" in attrs(a)
    )
    chat = attrs(chats[0])
    assert chat["gen_ai.operation.name"] == "chat"
    assert chat["gen_ai.provider.name"] == "openai"
    assert chat["gen_ai.request.model"] == "gpt-4o-mini"
    assert chat["gen_ai.usage.input_tokens"] == 7
    assert chat["gen_ai.usage.output_tokens"] == 3
    assert chat["outrider.role"] == "canary"
    assert {attrs(c)["gen_ai.conversation.id"] for c in chats} == {"sess-0", "sess-1", "sess-2"}
    assert {attrs(t)["gen_ai.tool.call.id"] for t in tools} == {"call-0", "call-1", "call-2"}
    assert chats[0].kind == trace_pb2.Span.SPAN_KIND_CLIENT
    resource = {
        kv.key: kv.value.string_value for kv in recv.requests[0].resource_spans[0].resource.attributes
    }
    assert resource["service.name"] == "outrider-sidecar"

    assert len(reasons) == 3
    assert any("content type" in r for r in reasons)
    assert any("empty" in r for r in reasons)
    assert relay.failed_batches == 0 and relay.retries == 0
    # everything, garbage included, is committed: a restarted relay would not send it again
    assert await committed_total(broker.bootstrap_servers, "outrider-span-relay") == len(records) + 3


async def test_unavailable_twice_then_ok_is_retried_and_delivered(
    broker: EmbeddedBroker, receiver: tuple[Receiver, str], traced: tuple[Tracing, EncodedSpans]
) -> None:
    recv, address = receiver
    # the first failure carries a server retry hint (short), the second does not (backoff)
    recv.fail_with = [(grpc.StatusCode.UNAVAILABLE, 0.05), grpc.StatusCode.UNAVAILABLE]
    tracing, records = traced
    agent_call(tracing, 0)
    # one record, so one batch: the first Export sees both scripted failures
    await produce(broker.bootstrap_servers, [one_record(records)])

    async with relay_for(broker, address, backoff_initial_s=1.0, backoff_max_s=1.0) as relay:
        await eventually(lambda: len(recv.span_ids()) == 4, what="the spans after retries")
    assert recv.calls == 3
    assert relay.retries == 2
    first_gap, second_gap = (b - a for a, b in zip(recv.call_times, recv.call_times[1:], strict=False))
    assert 0.05 <= first_gap < 0.7  # the hint, not the 1 s backoff
    assert second_gap >= 0.8  # backoff with at most 20 % jitter
    assert relay.failed_batches == 0
    assert relay.exported_spans == 4 and relay.exported_batches == 1
    assert await committed_total(broker.bootstrap_servers, "outrider-span-relay") == 1


async def test_a_receiver_down_past_the_deadline_gets_everything_later(
    broker: EmbeddedBroker, receiver: tuple[Receiver, str], traced: tuple[Tracing, EncodedSpans]
) -> None:
    recv, address = receiver
    recv.fail_with = [grpc.StatusCode.UNAVAILABLE] * 8
    tracing, records = traced
    for n in range(4):
        agent_call(tracing, n)
    await produce_spans(broker.bootstrap_servers, records)

    # a deadline that fits only a couple of retries: batches fail, get re-read and sent later
    async with relay_for(broker, address, export_timeout_s=0.25) as relay:
        await eventually(lambda: len(recv.span_ids()) == 16, what="every span once the receiver is back")
    assert relay.failed_batches >= 1
    assert not recv.fail_with
    assert await committed_total(broker.bootstrap_servers, "outrider-span-relay") == len(records)


async def test_a_batch_the_receiver_calls_malformed_is_skipped(
    broker: EmbeddedBroker, receiver: tuple[Receiver, str], traced: tuple[Tracing, EncodedSpans]
) -> None:
    recv, address = receiver
    recv.fail_with = [grpc.StatusCode.INVALID_ARGUMENT]
    tracing, records = traced
    agent_call(tracing, 0)
    await produce(broker.bootstrap_servers, [one_record(records)])
    async with relay_for(broker, address) as relay:
        await eventually(lambda: relay.rejected_batches == 1, what="the rejection")
        before = len(records)
        agent_call(tracing, 1)
        await produce_spans(broker.bootstrap_servers, records[before:])
        await eventually(lambda: relay.exported_spans > 0, what="the next batch")
    assert relay.retries == 0
    assert {attrs(s)["gen_ai.conversation.id"] for s in recv.spans() if s.name.startswith("chat")} == {
        "sess-1"
    }


async def test_start_and_stop_are_idempotent_and_prompt(receiver: tuple[Receiver, str], port: int) -> None:
    _, address = receiver
    # no broker listening: start returns at once, the task keeps trying, stop does not wait
    relay = SpanRelay(f"127.0.0.1:{port}", address, backoff_initial_s=0.05)
    await relay.stop()
    await relay.start()
    await relay.start()
    assert relay.running and not relay.connected
    await asyncio.sleep(0.3)
    assert relay.running
    started = time.monotonic()
    await relay.stop()
    await relay.stop()
    assert time.monotonic() - started < 1.0
    assert not relay.running


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="batch_max"):
        SpanRelay("127.0.0.1:1", "127.0.0.1:2", batch_max=0)
    with pytest.raises(ValueError, match="otlp_endpoint"):
        SpanRelay("127.0.0.1:1", "ftp://x/y")


# --- the relay's pure parts --------------------------------------------------------------


def test_decode_spans_record(traced: tuple[Tracing, EncodedSpans]) -> None:
    tracing, records = traced
    agent_call(tracing, 0)
    record = records[0]
    request, spans = decode_spans_record(record.value, record.headers)
    assert spans == 1 and request.resource_spans[0].scope_spans[0].spans[0].span_id
    decode_spans_record(record.value, [("content-type", b"application/x-protobuf; v=1")])
    decode_spans_record(record.value)  # no headers: judged by the bytes
    bad_ids = trace_service_pb2.ExportTraceServiceRequest.FromString(record.value)
    bad_ids.resource_spans[0].scope_spans[0].spans[0].trace_id = b"short"
    cases = [
        (record.value, [("content-type", b"application/json")], "content type"),
        (b"", None, "empty"),
        (None, None, "empty"),
        (b"\xff\xfe garbage", None, "not an OTLP"),
        (b"\x10\x01", None, "unknown fields"),
        (
            trace_service_pb2.ExportTraceServiceRequest(
                resource_spans=[trace_pb2.ResourceSpans()]
            ).SerializeToString(),
            None,
            "no spans",
        ),
        (bad_ids.SerializeToString(), None, "malformed"),
    ]
    for value, headers, reason in cases:
        with pytest.raises(outrider.DecodeError, match=reason):
            decode_spans_record(value, headers)


def test_span_batch_bookkeeping() -> None:
    batch = SpanBatch()
    assert not batch.due(0.0, 10, 1000, 1.0) and batch.time_left(0.0, 1.0) is None
    request = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans()])
    batch.add("p0", 5, request, 3, 100, now=10.0)
    batch.add("p1", 7, None, 0, 0, now=10.2)  # undecodable: offset only
    batch.add("p0", 6, request, 4, 100, now=10.3)
    assert (batch.spans, batch.nbytes, batch.records) == (7, 200, 3)
    assert batch.first == {"p0": 5, "p1": 7} and batch.next == {"p0": 7, "p1": 8}
    assert batch.time_left(10.5, 1.0) == pytest.approx(0.5)
    assert not batch.due(10.5, 10, 1000, 1.0)
    assert batch.due(11.0, 10, 1000, 1.0)  # interval
    assert batch.due(10.5, 7, 1000, 1.0)  # spans
    assert batch.due(10.5, 10, 200, 1.0)  # bytes
    assert batch.would_overflow(4, 1, 10, 1000) and not batch.would_overflow(3, 1, 10, 1000)
    assert batch.would_overflow(1, 801, 10, 1000)
    assert len(batch.request().resource_spans) == 2
    assert not SpanBatch().would_overflow(10_000, 10**9, 10, 1000)  # an empty batch takes anything
