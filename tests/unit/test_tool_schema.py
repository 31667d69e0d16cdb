"""Tool argument schemas: the path of the failing field, a bad schema refused at load, and one
compiled validator per (version id, tool)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sidecar._version_config import ToolConfig
from sidecar.upstream._tool_schema import MAX_MESSAGE_CHARS, SchemaViolation, ToolSchemas, field_path

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}},
    },
    "required": ["order_id"],
}


def _tool(parameters: dict[str, Any] = SCHEMA) -> ToolConfig:
    return ToolConfig(name="lookup", endpoint="http://127.0.0.1:9/lookup", parameters=parameters)


def test_field_path() -> None:
    assert field_path([]) == "arguments"
    assert field_path(["lines", 0, "sku"]) == "arguments.lines[0].sku"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"order_id": 42}, "arguments.order_id: 42 is not of type 'string'"),
        ({}, "arguments: 'order_id' is a required property"),
        (
            {"order_id": "A", "lines": [{"sku": "x"}, {"sku": 7}]},
            "arguments.lines[1].sku: 7 is not of type 'string'",
        ),
    ],
)
def test_a_violation_names_the_path(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaViolation) as info:
        ToolSchemas().check("v1", _tool(), arguments)
    assert str(info.value) == message


def test_valid_arguments_pass_and_a_huge_value_is_cut_short() -> None:
    schemas = ToolSchemas()
    schemas.check("v1", _tool(), {"order_id": "A", "lines": [{"sku": "x"}]})
    with pytest.raises(SchemaViolation) as info:
        schemas.check("v1", _tool(), {"order_id": "x" * 10_000 + "y", "lines": "nope" * 5000})
    assert len(info.value.reason) <= MAX_MESSAGE_CHARS


def test_one_validator_per_version_and_tool() -> None:
    schemas, tool = ToolSchemas(), _tool()
    assert schemas.validator("v1", tool) is schemas.validator("v1", tool)
    assert schemas.validator("v2", tool) is not schemas.validator("v1", tool)
    # another config under the same key (a test reloading a version) compiles again
    assert schemas.validator("v1", _tool()) is not schemas.validator("v1", tool)


def test_a_bad_schema_fails_at_load_naming_where() -> None:
    with pytest.raises(ValidationError) as info:
        _tool({"type": "object", "properties": {"order_id": {"type": "strin"}}})
    assert "parameters" in str(info.value)
    assert "['properties']['order_id']['type']" in str(info.value)
