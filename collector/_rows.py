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
`outrider.decode_event_head` gives them: those three it read already. Or, for call and tool
events, straight from the record's bytes by `fast_row` (`collector/_fastrow.c`), which skips
upb: then the row's `event` is those bytes, and `event_of` parses them where a path needs
the whole event (a tracked rollout's evidence, the one-at-a-time fallbacks). Such rows never
carry feature flags: `fast_row` leaves events with flags to upb. `OUTRIDER_NATIVE=0`, or an
install without a C compiler, leaves every event to upb.

Plain tuples, not named ones: a row is made per event and unpacked where it is used, and a
plain tuple is the cheapest thing to make and unpack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final, TypeAlias

from collector._native import native
from outrider.v1 import events_pb2

CallDetail: TypeAlias = tuple[int, str, float, float, int, int, int, float, int, bool, float, str]
ToolDetail: TypeAlias = tuple[int, str, float, bool]
EventRef: TypeAlias = events_pb2.Event | bytes  # the event, or its record's bytes (`event_of`)
Row: TypeAlias = tuple[str | None, str, str, int, str, int, str, EventRef, CallDetail | ToolDetail | None]

Head: TypeAlias = tuple[events_pb2.Event, str, str, str | None]  # (event, event_id, agent, body)

ROW_AGENT: Final = 1  # where the agent is in a row
ROW_EVENT: Final = 7  # where the event is in a row
CALL_MODEL: Final = 11  # where the model is in a CallDetail


_fastrow = native("_fastrow")
# `(row, gap)` of a call or tool event's record value, gap being `(sidecar_id, agent, sequence)`
# (or None when there is no sequence to observe); None for any other record: decode that with
# upb (`outrider.decode_event_head`) and take `row_of` its head. None when not built.
fast_row: Final[Callable[[bytes], tuple[Row, tuple[str, str, int] | None] | None] | None] = (
    None if _fastrow is None else _fastrow.read_row
)


def event_of(ref: EventRef) -> events_pb2.Event:
    """The event of a row: parsed from its bytes when `fast_row` read it (it parses: fast_row
    takes nothing upb would refuse)."""
    return events_pb2.Event.FromString(ref) if isinstance(ref, bytes) else ref


def heads(events: Iterable[tuple[events_pb2.Event, str | None]]) -> list[Head]:
    """The heads of (event, its body) pairs, for the paths given events rather than records."""
    return [(event, event.event_id, event.agent, body) for event, body in events]


def read_rows(events: Sequence[Head]) -> list[Row]:
    """A row for each head, in order."""
    return [row_of(head) for head in events]


def row_of(head: Head) -> Row:
    """The row of one head."""
    event, event_id, agent, body = head
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
    return (
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
