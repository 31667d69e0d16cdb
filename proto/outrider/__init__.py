"""The Outrider wire contract: generated protobuf code (`outrider.v1`) plus the small
helpers both the sidecar and the collector need (topic names, record keys and headers,
the envelope codec, the ErrorInfo reasons; `outrider.clock` for injectable time)."""

from outrider._envelope import (
    CONTENT_TYPE_HEADER,
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    DecodeError,
    decode_control,
    decode_event,
    encode_control,
    encode_event,
)
from outrider._reasons import ERROR_DOMAIN, FLAG_OFF, SESSION_DRAINED, SESSION_EXPIRED, TOOL_REJECTED
from outrider._topics import (
    COMMANDS_TOPIC,
    CONTROL_TOPIC,
    DEADLETTER_TOPIC,
    EVENTS_TOPIC,
    SPANS_TOPIC,
    agent_key,
)

__all__ = [
    "COMMANDS_TOPIC",
    "CONTENT_TYPE_HEADER",
    "CONTROL_TOPIC",
    "DEADLETTER_TOPIC",
    "ERROR_DOMAIN",
    "EVENTS_TOPIC",
    "FLAG_OFF",
    "SCHEMA_HEADER",
    "SCHEMA_VERSION",
    "SESSION_DRAINED",
    "SESSION_EXPIRED",
    "SPANS_TOPIC",
    "TOOL_REJECTED",
    "DecodeError",
    "agent_key",
    "decode_control",
    "decode_event",
    "encode_control",
    "encode_event",
]
