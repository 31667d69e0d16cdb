"""A consumed batch's events about a version as rows: each field the aggregates use, read once.

Reading a protobuf field from Python (upb) costs about as much as the arithmetic done with it,
and the windows, the totals and the sightings read the same fields of every call. So the
ingest step reads them once per event, into a tuple, and hands all three the same rows.

A row is `(body, agent, event_id, stamp, version, role, session, event, detail)`: `stamp` is
`time_unix_nano`, `event` the decoded event (for the bodies read field by field, and for the
paths that fall back to one event at a time), and `detail` is

- a call:  `CallDetail` (outcome, error_class, latency_ms, ttft_ms, input_tokens,
  output_tokens, cached_tokens, cost_usd, fallback_tier, degraded, quota_wait_ms, model);
- a tool:  `ToolDetail` (outcome, error_class, latency_ms, intercepted);
- any other body: None.

The rows are read from heads, `(event, event_id, agent, body)`, as
`outrider.decode_event_head` gives them: those three it read already.

Plain tuples, not named ones: a row is made per event and unpacked where it is used, and a
plain tuple is the cheapest thing to make and unpack.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, TypeAlias

from outrider.v1 import events_pb2

CallDetail: TypeAlias = tuple[int, str, float, float, int, int, int, float, int, bool, float, str]
ToolDetail: TypeAlias = tuple[int, str, float, bool]
Row: TypeAlias = tuple[
    str | None, str, str, int, str, int, str, events_pb2.Event, CallDetail | ToolDetail | None
]

Head: TypeAlias = tuple[events_pb2.Event, str, str, str | None]  # (event, event_id, agent, body)

ROW_AGENT: Final = 1  # where the agent is in a row
ROW_EVENT: Final = 7  # where the event is in a row
CALL_MODEL: Final = 11  # where the model is in a CallDetail


def heads(events: Iterable[tuple[events_pb2.Event, str | None]]) -> list[Head]:
    """The heads of (event, its body) pairs, for the paths given events rather than records."""
    return [(event, event.event_id, event.agent, body) for event, body in events]


def read_rows(events: Sequence[Head]) -> list[Row]:
    """A row for each head, in order."""
    rows: list[Row] = []
    append = rows.append
    for event, event_id, agent, body in events:
        detail: CallDetail | ToolDetail | None
        if body == "call":
            c = event.call
            detail = (
                c.outcome,
                c.error_class,
                c.latency_ms,
                c.time_to_first_token_ms,
                c.input_tokens,
                c.output_tokens,
                c.cached_input_tokens,
                c.cost_usd,
                c.fallback_tier,
                c.degraded,
                c.quota_wait_ms,
                c.model,
            )
        elif body == "tool":
            t = event.tool
            detail = (t.outcome, t.error_class, t.latency_ms, t.intercepted)
        else:
            detail = None
        append(
            (
                body,
                agent,
                event_id,
                event.time_unix_nano,
                event.version_id,
                event.role,
                event.session_id,
                event,
                detail,
            )
        )
    return rows
