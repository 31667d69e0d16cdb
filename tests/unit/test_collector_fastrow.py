"""`collector._fastrow` (the rows of call and tool events, read off the wire) against upb.

On any record it gives the row `row_of(decode_event_head(value))` gives, with the record's
bytes for the event, or None; never a row for what upb refuses. It takes every plain call
and tool event, or the fast path would be a stub that always says None."""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import outrider
from collector import _rows
from collector._native import NATIVE_ENV
from collector._rows import event_of, row_of
from outrider.v1 import events_pb2

if os.environ.get(NATIVE_ENV) == "0":  # pragma: no cover - the suite's upb-only run
    pytest.skip(f"{NATIVE_ENV}=0: the native reader is off", allow_module_level=True)

from collector import _fastrow  # built by the install (setup.py)

read_row = _fastrow.read_row

INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
DOUBLE = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, math.nan])
TEXT = st.text(max_size=12) | st.sampled_from(["", "bot", "v1", "gpt-4o", "é", "𝄞"])


def _same(value: Any) -> Any:
    """A value compared exactly: floats by their bits (NaN equals itself, -0.0 is not 0.0), and
    bools apart from ints."""
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, tuple):
        return tuple(_same(v) for v in value)
    return (type(value).__name__, value)


def _expected(value: bytes) -> tuple[Any, tuple[str, str, int] | None] | None:
    """What the reader must give: upb's row, or None when upb refuses or it is no call or tool."""
    try:
        head = outrider.decode_event_head(value)
    except outrider.DecodeError:
        return None
    event, _, agent, _ = head
    row = row_of(head)
    gap = (event.sidecar_id, agent, event.sequence) if event.sidecar_id and event.sequence > 0 else None
    return (*row[:7], value, row[8]), gap


def _check(value: bytes) -> tuple[Any, tuple[str, str, int] | None] | None:
    got, want = read_row(value), _expected(value)
    if got is not None:
        assert want is not None, "read a row upb refuses"
        assert _same(got) == _same(want)
        assert got[0][7] is value
    return got


@st.composite
def events(draw: st.DrawFn) -> events_pb2.Event:
    e = events_pb2.Event(
        event_id=draw(TEXT),
        time_unix_nano=draw(INT64),
        agent=draw(TEXT),
        version_id=draw(TEXT),
        role=draw(INT32),
        session_id=draw(TEXT),
        sidecar_id=draw(TEXT),
        rollout_id=draw(TEXT),
        unit_id=draw(TEXT),
        sequence=draw(INT64),
        cohort=draw(TEXT),
    )
    body = draw(st.sampled_from(["call", "call", "tool", "feedback", "usage", "none"]))
    if body == "call":
        c = e.call
        c.operation, c.provider, c.model = draw(TEXT), draw(TEXT), draw(TEXT)
        c.latency_ms, c.time_to_first_token_ms, c.cost_usd = draw(DOUBLE), draw(DOUBLE), draw(DOUBLE)
        c.quota_wait_ms = draw(DOUBLE)
        c.input_tokens, c.output_tokens, c.cached_input_tokens = draw(INT64), draw(INT64), draw(INT64)
        c.outcome, c.fallback_tier, c.attempts = draw(INT32), draw(INT32), draw(INT32)
        c.error_class, c.served_by = draw(TEXT), draw(TEXT)
        c.degraded, c.priority = draw(st.booleans()), draw(st.booleans())
        c.guard_hits.extend(draw(st.lists(TEXT, max_size=3)))
        if draw(st.booleans()):
            e.call.SetInParent()  # an empty call is still a call
    elif body == "tool":
        t = e.tool
        t.tool_name, t.error_class, t.arguments_json = draw(TEXT), draw(TEXT), draw(TEXT)
        t.latency_ms, t.outcome, t.status_code = draw(DOUBLE), draw(INT32), draw(INT32)
        t.intercepted, t.attempts = draw(st.booleans()), draw(INT32)
        t.arguments_sha256, t.side_effects = draw(TEXT), draw(TEXT)
        if draw(st.booleans()):
            e.tool.SetInParent()
    elif body == "feedback":
        e.feedback.score = draw(DOUBLE)
    elif body == "usage":
        e.usage.resource = draw(TEXT)
    if draw(st.integers(0, 5)) == 0:
        e.flags[draw(TEXT)] = draw(st.booleans())
    return e


def _plain(e: events_pb2.Event) -> bool:
    """A call or tool event the reader must take: it names its id and agent and has no flags."""
    return e.WhichOneof("body") in ("call", "tool") and bool(e.event_id and e.agent) and not e.flags


def test_the_reader_is_built_and_in_use() -> None:
    assert _rows.fast_row is read_row


def test_it_knows_every_field_of_the_schema() -> None:
    # a field added to events.proto fails here until collector/_fastrow.c knows it
    for name, numbers in _fastrow.KNOWN_FIELDS.items():
        descriptor = events_pb2.DESCRIPTOR.message_types_by_name[name]
        assert sorted(f.number for f in descriptor.fields) == list(numbers), name


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_any_event_reads_as_upb_reads_it(e: events_pb2.Event) -> None:
    value = e.SerializeToString()
    got = _check(value)
    assert (got is not None) == _plain(e)
    if got is not None:
        assert event_of(got[0][7]) == e


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events(), events(), st.data())
def test_mangled_records_read_as_upb_reads_them_or_not_at_all(
    first: events_pb2.Event, second: events_pb2.Event, data: st.DataObject
) -> None:
    value = first.SerializeToString()
    how = data.draw(st.sampled_from(["join", "cut", "flip", "insert"]))
    if how == "join":  # upb merges: fields of the second win, bodies merge or switch
        value += second.SerializeToString()
    elif how == "cut":
        value = value[: data.draw(st.integers(0, len(value)))]
    elif how == "flip":
        assume(value)
        at = data.draw(st.integers(0, len(value) - 1))
        value = value[:at] + bytes([value[at] ^ data.draw(st.integers(1, 255))]) + value[at + 1 :]
    else:
        at = data.draw(st.integers(0, len(value)))
        value = value[:at] + data.draw(st.binary(min_size=1, max_size=6)) + value[at:]
    _check(value)


@pytest.mark.parametrize(
    "value, why",
    [
        (b"\x0a\x02e1\x1a\x01a\x42\x01\xff\x52\x00", "bad UTF-8 in a string the row does not carry"),
        (b"\x0a\x02e1\x1a\x01a\x52\x03\x1a\x01\xc0", "bad UTF-8 in the call's model"),
        (b"\x0a\x02e1\x1a\x01a\x52\x00\x5a\x00", "a call, then a tool: upb keeps the last"),
        (b"\x0a\x02e1\x1a\x01a\x52\x00\x52\x00", "two calls: upb merges them"),
        (b"\x0a\x02e1\x1a\x01a\x52\x00\xaa\x01\x04\x0a\x00\x10\x01", "feature flags"),
        (b"\x0a\x02e1\x1a\x01a\x52\x00\xfb\x0f\xfc\x0f", "a group"),
        (b"\x0a\x02e1\x1a\x01a\x52\x00\x12\x00", "time_unix_nano with the wrong wire type"),
        (b"\x0a\x02e1\x1a\x01a\x52\x02\x21\x00", "a truncated latency"),
        (b"\x0a\x02e1\x1a\x01a\x52\x00\x10" + b"\xff" * 10 + b"\x01", "a varint past ten bytes"),
        (b"\x0a\x02e1\x1a\x01a\x52\x05", "a body longer than the record"),
        (b"\x0a\x00\x1a\x01a\x52\x00", "no event id"),
        (b"\x0a\x02e1\x52\x00", "no agent"),
        (b"\x0a\x02e1\x1a\x01a\x62\x00", "feedback, a body it leaves to upb"),
        (b"", "empty"),
    ],
)
def test_what_it_leaves_to_upb(value: bytes, why: str) -> None:
    assert read_row(value) is None, why
    _check(value)


def test_unknown_fields_are_skipped_as_upb_skips_them() -> None:
    plain = events_pb2.Event(event_id="e1", agent="a", call=events_pb2.CallRecord(model="m"))
    # field 99 as a varint, field 98 as 8 bytes, field 97 as bytes, field 96 as 4 bytes, and a
    # field 30 inside the call: a newer writer's fields
    extra = b"\x98\x06\x07\x91\x06" + b"\x00" * 8 + b"\x8a\x06\x02hi\x85\x06" + b"\x00" * 4
    value = plain.SerializeToString() + extra
    got = _check(value)
    assert got is not None and got[0][8][11] == "m"
    inner = events_pb2.Event(event_id="e1", agent="a").SerializeToString() + b"\x52\x03\xf0\x01\x05"
    assert _check(inner) is not None
    reserved = plain.SerializeToString() + b"\xc0\xa3\x09\x01"  # field 19000: upb takes it too
    assert _check(reserved) is not None


def test_repeated_strings_are_shared_within_a_run() -> None:
    values = [
        events_pb2.Event(
            event_id=f"e{i}", agent="bot", version_id="v1", call=events_pb2.CallRecord(model="gpt")
        ).SerializeToString()
        for i in range(3)
    ]
    rows = [read_row(v) for v in values]
    assert all(r is not None for r in rows)
    first, last = rows[0][0], rows[-1][0]  # type: ignore[index]
    assert first[1] is last[1] and first[4] is last[4] and first[8][11] is last[8][11]
    assert first[2] == "e0" and last[2] == "e2"


def test_what_is_not_bytes_is_left_to_upb() -> None:
    value = events_pb2.Event(event_id="e1", agent="a", call=events_pb2.CallRecord()).SerializeToString()
    assert read_row(bytearray(value)) is None  # type: ignore[arg-type]
    assert read_row(None) is None  # type: ignore[arg-type]
