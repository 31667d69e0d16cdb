"""Encoding of records on the Outrider topics.

A record's value is the serialized protobuf message; its headers say what it is, so a
reader can tell a newer schema or a foreign record from garbage and dead-letter it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from google.protobuf.message import DecodeError as _ProtoDecodeError

from outrider.v1 import control_pb2, events_pb2

CONTENT_TYPE_HEADER = "content-type"
SCHEMA_HEADER = "outrider-schema"
SCHEMA_VERSION = 1

_EVENT_TYPE = b"application/x-protobuf; messageType=outrider.v1.Event"
_CONTROL_TYPE = b"application/x-protobuf; messageType=outrider.v1.ControlMessage"

Headers = Sequence[tuple[str, bytes]]


class DecodeError(ValueError):
    """A record that is not a message of the expected type and schema."""


def _headers(content_type: bytes) -> list[tuple[str, bytes]]:
    return [(CONTENT_TYPE_HEADER, content_type), (SCHEMA_HEADER, str(SCHEMA_VERSION).encode())]


# content type -> the headers last accepted for it: a consumed batch is mostly one writer's
# records, all with equal headers, and comparing with the last is a third of judging afresh
_accepted: dict[bytes, Headers] = {}


def _check(headers: Headers | None, content_type: bytes) -> None:
    if not headers or headers == _accepted.get(content_type):
        return  # records from writers that set no headers are judged by their bytes alone
    try:
        # every record of a writer carries the same headers: judge each distinct set once
        problem = _judged(headers, content_type)
    except TypeError:  # headers that are not hashable (a list): judged afresh, not kept
        problem = _problem(headers, content_type)
    else:
        if problem is None:
            _accepted[content_type] = headers  # hashable: a tuple of tuples, immutable
    if problem is not None:
        raise DecodeError(problem)


@functools.lru_cache(maxsize=256)
def _judged(headers: tuple[tuple[str, bytes], ...], content_type: bytes) -> str | None:
    return _problem(headers, content_type)


def _problem(headers: Headers, content_type: bytes) -> str | None:
    """Why the headers rule the record out, or None."""
    found = dict(headers)
    if found.get(CONTENT_TYPE_HEADER, content_type) != content_type:
        return f"unexpected content type {found[CONTENT_TYPE_HEADER]!r}"
    schema = found.get(SCHEMA_HEADER)
    if schema is not None:
        try:
            version = int(schema)
        except ValueError:
            return f"bad schema header {schema!r}"
        if version > SCHEMA_VERSION:
            return f"schema version {version} is newer than {SCHEMA_VERSION}"
    return None


def encode_event(event: events_pb2.Event) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of an `outrider.events` record."""
    return event.SerializeToString(), _headers(_EVENT_TYPE)


def decode_event(value: bytes | None, headers: Headers | None = None) -> events_pb2.Event:
    """Parse an `outrider.events` record; raise DecodeError for anything else."""
    return decode_event_head(value, headers)[0]


def check_event_headers(headers: Headers | None) -> None:
    """Raise DecodeError when the headers rule out an `outrider.events` record (the check
    `decode_event` makes first), for a reader that decodes the value itself."""
    if headers and headers != _accepted.get(_EVENT_TYPE):
        _check(headers, _EVENT_TYPE)


def decode_event_head(
    value: bytes | None, headers: Headers | None = None
) -> tuple[events_pb2.Event, str, str, str]:
    """`decode_event`, with what it read to judge the event: (event, event_id, agent, body
    name). A reader of many events takes them from here rather than read them again."""
    if headers and headers != _accepted.get(_EVENT_TYPE):  # `_check`'s first test, without the call
        _check(headers, _EVENT_TYPE)
    if not value:
        raise DecodeError("empty record")
    try:
        event = events_pb2.Event.FromString(value)  # one call: a third cheaper than Event() + Parse
    except _ProtoDecodeError as exc:
        raise DecodeError(f"not an outrider.v1.Event: {exc}") from exc
    event_id, agent, body = event.event_id, event.agent, event.WhichOneof("body")
    if not event_id or not agent or body is None:
        raise DecodeError("event lacks event_id, agent or body")
    return event, event_id, agent, body


def encode_control(message: control_pb2.ControlMessage) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of an `outrider.control` record."""
    return message.SerializeToString(), _headers(_CONTROL_TYPE)


def decode_control(value: bytes | None, headers: Headers | None = None) -> control_pb2.ControlMessage:
    """Parse an `outrider.control` record; raise DecodeError for anything else."""
    _check(headers, _CONTROL_TYPE)
    if not value:
        raise DecodeError("empty record")
    message = control_pb2.ControlMessage()
    try:
        message.ParseFromString(value)
    except _ProtoDecodeError as exc:
        raise DecodeError(f"not an outrider.v1.ControlMessage: {exc}") from exc
    if message.WhichOneof("body") is None:
        raise DecodeError("control message has no body")
    return message
