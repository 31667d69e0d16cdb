"""Loading YAML into validated models, with errors that name the file and the field.

SpecError (ValueError)       a rollout spec or settings file is not valid
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
_RELATIVE = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class SpecError(ValueError):
    """A YAML document that does not validate. `problems` are "field.path: message" lines."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("; ".join(f"{source}: {p}" for p in self.problems))


def field_path(loc: Sequence[int | str]) -> str:
    """("steps", 1, "weight") -> "steps[1].weight"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _problem(error: Any) -> str:
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    path = field_path(error["loc"])
    # model-level validators name the field relative to their model: "max_ratio: ..."
    if path and (rel := _RELATIVE.match(message)):
        return f"{path}.{rel.group(1)}: {message[rel.end() :]}"
    return f"{path}: {message}" if path else message


def parse_yaml_model(model: type[M], text: str, source: str, overrides: dict[str, Any] | None = None) -> M:
    """Parse YAML `text` (named `source` in errors) into `model`; raise SpecError."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise SpecError(source, [f"not valid YAML{line}: {getattr(exc, 'problem', None) or exc}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(source, [f"expected a mapping at the top level, got {type(data).__name__}"])
    data.update(overrides or {})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, [_problem(e) for e in exc.errors()]) from None
