"""SSE decoding and the streamed-completion assembler; upstream error classes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.upstream._exceptions import (
    UpstreamConnectError,
    UpstreamInvalidResponse,
    UpstreamStatusError,
    UpstreamTimeout,
)
from sidecar.upstream._provider import StreamAssembler, StreamError, parse_completion
from sidecar.upstream._sse import SSEDecoder, SSEError


def chunk(delta: dict[str, object], finish: str | None = None, **extra: object) -> str:
    return json.dumps(
        {
            "id": "c1",
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
    )


STREAM_EVENTS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hello "}),
    chunk({"content": "wörld"}),
    chunk({}, "stop"),
    json.dumps({"id": "c1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}),
    "[DONE]",
]
WIRE = "".join(f"data: {e}\n\n" for e in STREAM_EVENTS).encode()


def decode_all(pieces: list[bytes]) -> list[str]:
    decoder = SSEDecoder()
    out: list[str] = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    out.extend(decoder.finish())
    return out


@given(st.lists(st.integers(0, len(WIRE)), max_size=12))
def test_split_anywhere_decodes_the_same(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    pieces = [WIRE[a:b] for a, b in zip([0, *points], [*points, len(WIRE)], strict=True)]
    assert decode_all(pieces) == STREAM_EVENTS


def test_crlf_comments_fields_and_multiline() -> None:
    wire = b": keep-alive\r\nevent: message\r\nid: 3\r\ndata: a\r\ndata: b\r\n\r\ngarbage-line\n\ndata:x\n\n"
    assert decode_all([wire]) == ["a\nb", "x"]


def test_event_without_closing_blank_line_is_dispatched_at_finish() -> None:
    assert decode_all([b"data: [DONE]"]) == ["[DONE]"]


def test_overlong_line_is_refused() -> None:
    decoder = SSEDecoder(max_line_bytes=100)
    with pytest.raises(SSEError):
        decoder.feed(b"data: " + b"x" * 200)


def test_assembler_full_stream() -> None:
    a = StreamAssembler()
    deltas = [a.feed(e) for e in STREAM_EVENTS]
    assert "".join(deltas) == "Hello wörld"
    result = a.result()
    assert (result.content, result.finish_reason, result.input_tokens, result.output_tokens) == (
        "Hello wörld",
        "stop",
        7,
        3,
    )
    assert result.response_id == "c1" and result.model == "m"


def test_assembler_tool_calls_by_index() -> None:
    a = StreamAssembler()
    a.feed(
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "t0", "function": {"name": "lookup_order", "arguments": ""}},
                    {"index": 1, "id": "t1", "function": {"name": "echo", "arguments": "{"}},
                ]
            }
        )
    )
    a.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"order_id"'}}]}))
    a.feed(chunk({"tool_calls": [{"index": 1, "function": {"arguments": "}"}}]}))
    a.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': "A1"}'}}]}))
    a.feed(chunk({}, "tool_calls"))
    a.feed("[DONE]")
    result = a.result()
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [
        ("t0", "lookup_order", '{"order_id": "A1"}'),
        ("t1", "echo", "{}"),
    ]


@pytest.mark.parametrize(
    ("events", "message"),
    [
        (STREAM_EVENTS[:3], "finish_reason"),  # cut mid-answer
        (STREAM_EVENTS[:5], r"\[DONE\]"),  # finished but the stream was cut before [DONE]
        ([STREAM_EVENTS[1], "[DONE]"], "finish_reason"),
    ],
)
def test_incomplete_streams_are_errors(events: list[str], message: str) -> None:
    a = StreamAssembler()
    for e in events:
        a.feed(e)
    with pytest.raises(StreamError, match=message):
        a.result()


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        "[1, 2]",
        '{"choices": 5}',
        '{"error": {"message": "boom"}}',
        json.dumps({"choices": [{"index": 0, "delta": "x"}]}),
    ],
)
def test_malformed_chunks_are_errors(bad: str) -> None:
    with pytest.raises(StreamError):
        StreamAssembler().feed(bad)


def test_data_after_done_is_an_error() -> None:
    a = StreamAssembler()
    a.feed("[DONE]")
    with pytest.raises(StreamError):
        a.feed(STREAM_EVENTS[1])


def test_parse_completion() -> None:
    body = json.dumps(
        {
            "id": "x",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                        ],
                    },
                }
            ],
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": 2,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
        }
    ).encode()
    result = parse_completion(body, "openai")
    assert result.content == "" and result.tool_calls[0].name == "f" and result.cached_input_tokens == 4
    for bad in (b"", b"{}", b'{"choices": []}', b"<html>"):
        with pytest.raises(UpstreamInvalidResponse, match="openai"):
            parse_completion(bad, "openai")


def test_error_classes_and_retriability() -> None:
    assert UpstreamStatusError("x", upstream="openai", status=503).error_class == "provider_5xx"
    assert UpstreamStatusError("x", upstream="openai", status=503).retriable
    assert UpstreamStatusError("x", upstream="openai", status=429).error_class == "provider_429"
    assert UpstreamStatusError("x", upstream="openai", status=429).retriable
    assert not UpstreamStatusError("x", upstream="openai", status=400).retriable
    assert UpstreamStatusError("x", upstream="t", kind="tool", status=404).error_class == "tool_4xx"
    assert (
        UpstreamTimeout("x", upstream="o").error_class == "timeout"
        and UpstreamTimeout("x", upstream="o").retriable
    )
    assert UpstreamConnectError("x", upstream="o").error_class == "connect"
    invalid = UpstreamInvalidResponse("x", upstream="o")
    assert invalid.error_class == "invalid_response" and not invalid.retriable
