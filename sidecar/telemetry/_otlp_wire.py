"""`LiteSpan`s written straight into OTLP protobuf bytes (`ExportTraceServiceRequest`).

Building opentelemetry-proto messages from Python costs more than the encoding itself: every
nested message given to a constructor is copied into its parent. This writer emits the wire
format of the few messages a span needs directly (opentelemetry/proto/trace/v1/trace.proto,
common/v1/common.proto), with attribute keys' bytes cached, and the resource and scope
serialized once by the protobuf library. The result parses to the same message as the SDK's
`encode_spans` would give (tests/unit/test_lite_spans.py compares them).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
)
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, StatusCode

if TYPE_CHECKING:
    from sidecar.telemetry._lite_spans import LiteSpan

# tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32)
_SPAN_TRACE_ID = b"\x0a"  # 1
_SPAN_SPAN_ID = b"\x12"  # 2
_SPAN_TRACE_STATE = b"\x1a"  # 3
_SPAN_PARENT_ID = b"\x22"  # 4
_SPAN_NAME = b"\x2a"  # 5
_SPAN_KIND = b"\x30"  # 6
_SPAN_START = b"\x39"  # 7, fixed64
_SPAN_END = b"\x41"  # 8, fixed64
_SPAN_ATTRIBUTE = b"\x4a"  # 9
_SPAN_EVENT = b"\x5a"  # 11
_SPAN_STATUS = b"\x7a"  # 15
_SPAN_FLAGS = b"\x85\x01"  # 16, fixed32
_EVENT_TIME = b"\x09"  # Span.Event 1, fixed64
_EVENT_NAME = b"\x12"  # 2
_EVENT_ATTRIBUTE = b"\x1a"  # 3
_STATUS_MESSAGE = b"\x12"  # Status 2
_STATUS_CODE = b"\x18"  # 3
_KV_KEY = b"\x0a"  # KeyValue 1
_KV_VALUE = b"\x12"  # 2
_ANY_STRING = b"\x0a"  # AnyValue 1
_ANY_BOOL_TRUE = b"\x10\x01"  # 2
_ANY_BOOL_FALSE = b"\x10\x00"
_ANY_INT = b"\x18"  # 3
_ANY_DOUBLE = b"\x21"  # 4, fixed64
_ANY_ARRAY = b"\x2a"  # 5
_ANY_BYTES = b"\x3a"  # 7
_ARRAY_VALUE = b"\x0a"  # ArrayValue 1
_FIELD_1 = b"\x0a"  # ExportTraceServiceRequest.resource_spans, ResourceSpans.resource, ScopeSpans.scope
_FIELD_2 = b"\x12"  # ResourceSpans.scope_spans, ScopeSpans.spans
_FIELD_3 = b"\x1a"  # the schema_url of ResourceSpans and ScopeSpans

_KINDS = {  # as the SDK's encoder maps them: the OTLP enum counts from UNSPECIFIED = 0
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
_STATUS_CODES = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}
_FLAGS_LOCAL = struct.pack("<I", SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK)
_FLAGS_REMOTE = struct.pack(
    "<I",
    SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK,
)
_SMALL = [bytes([n]) for n in range(128)]
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _value(value: Any) -> bytes:
    """An AnyValue's bytes (a oneof: a zero or empty value is still written)."""
    kind = type(value)
    if kind is str:
        return _field(_ANY_STRING, value.encode())
    if kind is bool:
        return _ANY_BOOL_TRUE if value else _ANY_BOOL_FALSE
    if kind is int:
        return _ANY_INT + _varint(value & _U64)  # int64: negatives as 10-byte two's complement
    if kind is float:
        return _ANY_DOUBLE + _pack_d(value)
    if kind is bytes:
        return _field(_ANY_BYTES, value)
    if isinstance(value, Sequence):
        return _field(_ANY_ARRAY, b"".join(_field(_ARRAY_VALUE, _value(v)) for v in value))
    raise TypeError(f"span attribute value of type {kind.__name__} cannot be encoded")


_key_bytes: dict[str, bytes] = {}  # attribute key -> its KeyValue.key field; a small fixed set
# (key, str or int value) -> the whole attribute field, per tag: most values repeat from span to
# span (operation, provider, model, version, role, server and port, attempt number, a session's
# conversation id). Only str and int values are looked up: True == 1 == 1.0 as dict keys, so
# bools and floats would share int entries
_pairs: dict[bytes, dict[tuple[str, str | int], bytes]] = {_SPAN_ATTRIBUTE: {}, _EVENT_ATTRIBUTE: {}}
_PAIRS_MAX = 8192  # past this the cache starts over: conversation ids keep coming
_PAIR_VALUE_MAX = 256  # longer values (captured content, opted in) are encoded each time


def _key(key: str) -> bytes:
    k = _key_bytes.get(key)
    if k is None:
        k = _field(_KV_KEY, key.encode())
        if len(_key_bytes) < 4096:  # keys are the code's constants, bound the cache anyway
            _key_bytes[key] = k
    return k


def _attributes(tag: bytes, attributes: Mapping[str, Any], out: list[bytes]) -> None:
    pairs = _pairs[tag]
    for item in attributes.items():
        key, value = item
        kind = type(value)
        if kind is int or (kind is str and len(value) <= _PAIR_VALUE_MAX):
            encoded = pairs.get(item)
            if encoded is None:
                if len(pairs) >= _PAIRS_MAX:
                    pairs.clear()
                encoded = pairs[item] = _field(tag, _key(key) + _field(_KV_VALUE, _value(value)))
            out.append(encoded)
        else:
            out.append(_field(tag, _key(key) + _field(_KV_VALUE, _value(value))))


def _span(span: LiteSpan) -> bytes:
    ctx = span.get_span_context()
    parent = span.parent
    out = [_SPAN_TRACE_ID, b"\x10", ctx.trace_id.to_bytes(16, "big"), _SPAN_SPAN_ID, b"\x08"]
    out.append(ctx.span_id.to_bytes(8, "big"))
    state = ctx.trace_state
    if state:
        out.append(_field(_SPAN_TRACE_STATE, ",".join(f"{k}={v}" for k, v in state.items()).encode()))
    if parent is not None:
        out += (_SPAN_PARENT_ID, b"\x08", parent.span_id.to_bytes(8, "big"))
    if span.name:
        out.append(_field(_SPAN_NAME, span.name.encode()))
    out += (_SPAN_KIND, _SMALL[_KINDS[span.kind]])
    out += (_SPAN_START, _pack_q(span.start_time), _SPAN_END, _pack_q(span.end_time or 0))
    _attributes(_SPAN_ATTRIBUTE, span.attributes, out)
    for name, timestamp, attributes in span.events:
        event = [_EVENT_TIME, _pack_q(timestamp)]
        if name:
            event.append(_field(_EVENT_NAME, name.encode()))
        _attributes(_EVENT_ATTRIBUTE, attributes, event)
        out.append(_field(_SPAN_EVENT, b"".join(event)))
    status = span.status
    code = _STATUS_CODES[status.status_code]
    body = _field(_STATUS_MESSAGE, status.description.encode()) if status.description else b""
    out.append(_field(_SPAN_STATUS, body + (_STATUS_CODE + _SMALL[code] if code else b"")))
    out += (_SPAN_FLAGS, _FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(out)


class OtlpWriter:
    """One resource and scope's spans -> `ExportTraceServiceRequest` bytes."""

    def __init__(self, resource: Resource, scope_name: str) -> None:
        head = _field(_FIELD_1, _encode_resource(resource).SerializeToString())
        self._resource_head = head
        self._resource_tail = _field(_FIELD_3, resource.schema_url.encode()) if resource.schema_url else b""
        scope = _encode_instrumentation_scope(InstrumentationScope(scope_name)).SerializeToString()
        self._scope_head = _field(_FIELD_1, scope)

    def encode(self, spans: Iterable[LiteSpan]) -> bytes:
        scope_spans = self._scope_head + b"".join(_field(_FIELD_2, _span(s)) for s in spans)
        resource_spans = self._resource_head + _field(_FIELD_2, scope_spans) + self._resource_tail
        return _field(_FIELD_1, resource_spans)
