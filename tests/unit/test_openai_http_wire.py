"""The OpenAI wire mapping of `sidecar._openai_wire`: requests parse into pipeline messages
or fail naming the field, and pipeline errors map onto HTTP statuses and `param`."""

from __future__ import annotations

import grpc
import pytest

from sidecar._config import ConfigError, parse_config
from sidecar._openai_wire import ChatBody, WireError, http_status, param_of


def test_openai_http_body_maps_roles_parts_and_tool_calls() -> None:
    body = ChatBody(
        {
            "model": "gpt-4o",
            "user": "ann",
            "stream": True,
            "stream_options": {"include_usage": True},
            "tools": [{"type": "function", "function": {"name": "ignored"}}],
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ],
        }
    )
    assert (body.model, body.user, body.stream, body.include_usage) == ("gpt-4o", "ann", True, True)
    roles = [m.role for m in body.messages]
    assert roles == ["system", "user", "assistant", "tool"]
    assert body.messages[1].content == "ab"
    assert body.messages[2].tool_calls[0].arguments_json == '{"x": 1}'
    assert body.messages[3].tool_call_id == "c1"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], "body"),
        ({}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": 1}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{}]}]},
            "messages[0].tool_calls[0].function.name",
        ),
        ({"model": 3, "messages": []}, "model"),
    ],
)
def test_openai_http_body_errors_name_the_field(body: object, param: str) -> None:
    with pytest.raises(WireError) as info:
        ChatBody(body)
    assert info.value.param == param and info.value.message.startswith(f"{param}: ")


def test_openai_http_error_mapping() -> None:
    assert http_status(grpc.StatusCode.INVALID_ARGUMENT) == 400
    assert http_status(grpc.StatusCode.PERMISSION_DENIED) == 403
    assert http_status(grpc.StatusCode.FAILED_PRECONDITION) == 409
    assert http_status(grpc.StatusCode.RESOURCE_EXHAUSTED) == 429
    assert http_status(grpc.StatusCode.UNAVAILABLE) == 503
    assert http_status(grpc.StatusCode.INTERNAL) == 500
    assert param_of("messages[0].role: must be one of user") == "messages[0].role"
    assert param_of("session_id: unknown session") == "x-outrider-session"
    assert param_of("reply blocked by guardrail secret") is None


def test_openai_http_listen_is_checked_at_load() -> None:
    data = {
        "agent": "a",
        "stable": "v1",
        "versions": {"v1": {"provider": {"base_url": "http://127.0.0.1:1/v1"}, "model": "m"}},
        "openai_http": {"listen": "nowhere"},
    }
    with pytest.raises(ConfigError, match=r"openai_http\.listen"):
        parse_config(data, source="t.yaml")
