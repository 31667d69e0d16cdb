"""A tool's arguments checked against its JSON schema (`parameters`) before anything is sent.

Validators are compiled once per (version id, tool) and kept in a bounded cache: a version's
tools never change under its id, and a pushed version brings new ids. The draft is the one the
schema names in `$schema`, else the latest jsonschema knows. Remote `$ref`s are never fetched
(the `referencing` default): an unresolvable one is the tool's fault, not the caller's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.protocols
import jsonschema.validators
import referencing.exceptions
from cachetools import LRUCache

from sidecar._version_config import ToolConfig

MAX_MESSAGE_CHARS = 200  # the failing value is echoed back: keep a huge one from filling the status
_CACHE_SIZE = 1024


class SchemaViolation(Exception):
    """The arguments break the tool's schema: `path` is e.g. "arguments.items[0].sku"."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class BadToolSchema(Exception):
    """The tool's own schema is not a valid JSON schema, or cannot be resolved."""


def field_path(parts: Iterable[str | int]) -> str:
    """`["items", 0, "sku"]` -> "arguments.items[0].sku"."""
    out = "arguments"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _short(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


class ToolSchemas:
    """Compiled validators, one per (version id, tool name)."""

    def __init__(self, maxsize: int = _CACHE_SIZE) -> None:
        self._cache: LRUCache[tuple[str, str], tuple[ToolConfig, jsonschema.protocols.Validator]] = LRUCache(
            maxsize=maxsize
        )
        self._lock = threading.Lock()

    def validator(self, version_id: str, tool: ToolConfig) -> jsonschema.protocols.Validator:
        key = (version_id, tool.name)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] is tool:
            return hit[1]
        schema = tool.parameters
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.exceptions.SchemaError as exc:
            raise BadToolSchema(
                f"tool {tool.name}: parameters is not a valid JSON schema: {_short(exc.message)}"
            ) from None
        validator = cls(schema)
        with self._lock:
            self._cache[key] = (tool, validator)
        return validator

    def check(self, version_id: str, tool: ToolConfig, arguments: Any) -> None:
        """Raise SchemaViolation for the most relevant error in `arguments` (parsed JSON)."""
        validator = self.validator(version_id, tool)
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
        except referencing.exceptions.Unresolvable as exc:
            raise BadToolSchema(f"tool {tool.name}: parameters has an unresolvable $ref: {exc}") from None
        except RecursionError:
            raise SchemaViolation("arguments", "nested too deeply to check") from None
        if error is not None:
            raise SchemaViolation(field_path(error.absolute_path), _short(error.message))
