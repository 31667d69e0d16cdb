"""Validation errors as "file: field.path: message" lines."""

from __future__ import annotations

from pydantic import ValidationError

__all__ = ["format_validation_error"]


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        path = _field_path(tuple(error["loc"]))
        if message.startswith(("[", ".")) and path:  # a container validator pointing into its items
            path, message = path + message.split(":", 1)[0], message.split(":", 1)[1].strip()
        lines.append(f"{source}: {path}: {message}" if path else f"{source}: {message}")
    return "\n".join(lines)
