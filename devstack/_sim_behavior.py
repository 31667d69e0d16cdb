"""Behavior of the simulated provider's models and tools, and its YAML config file.

A behavior is an immutable value checked when it is made; every error names the field.
The same mapping form is read from the YAML config file and from the run-time
``PUT /_sim/models/{model}`` and ``PUT /_sim/tools/{name}`` endpoints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

DEFAULT_MODEL = "sim-fast"
DEFAULT_MODEL_LATENCY_MS = 5.0
JUDGE_MODEL = "sim-judge"  # answers judge prompts with scripted scores
DIVERGENT_MODEL = "sim-divergent"  # a shadow candidate that disagrees with sim-fast
REPLY_STYLES = ("echo", "reworded")
DEFAULT_JUDGE_SCORE = 0.5
BUILTIN_TOOLS = ("lookup_order", "echo")


class BehaviorError(ValueError):
    """A behavior field is missing, of the wrong type or out of range; `field` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class SimConfigError(ValueError):
    """The simulated provider's config file is unreadable or invalid; the message names file and field."""


def _check_ms(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BehaviorError(field, f"must be a finite number, got {value!r}")
    if value < 0:
        raise BehaviorError(field, f"must be >= 0, got {value!r}")


def _check_rate(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BehaviorError(field, f"must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise BehaviorError(field, f"must be in [0, 1], got {value!r}")


def _check_status(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BehaviorError(field, f"must be an integer HTTP status, got {value!r}")
    if not 400 <= value <= 599:
        raise BehaviorError(field, f"must be an HTTP error status in [400, 599], got {value}")


def _check_bool(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise BehaviorError(field, f"must be true or false, got {value!r}")


def _check_str(field: str, value: object) -> None:
    if not isinstance(value, str):
        raise BehaviorError(field, f"must be a string, got {value!r}")


def _check_names(field: str, value: object, check: Any) -> dict[str, Any]:
    """A mapping of non-empty names to values that `check` accepts; returns a private copy."""
    if not isinstance(value, Mapping):
        raise BehaviorError(field, f"must be a mapping of name -> value, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise BehaviorError(field, f"names must be non-empty strings, got {key!r}")
        check(f"{field}.{key}", item)
    return dict(value)


def _check_tool_name(field: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise BehaviorError(field, f"must be a non-empty tool name, got {value!r}")


@dataclass(frozen=True)
class ModelBehavior:
    """How one simulated model answers.

    Shadow candidates differ from stable through `tool_rename` (the tool a ``/tool NAME``
    command calls is renamed), `ignore_tools` (answer in text even when tools are offered),
    `reply_style` ("echo": the usual reply; "reworded": a reply that shares few words with it)
    and `reply_prefix`. A `judge` model answers judge prompts (``[Answer A]``/``[Answer B]``
    sections, or one ``[Answer]``) with JSON scores: each answer scores `judge_scores` of the
    model named in its "Simulated reply from <model>", else `judge_default_score`.
    """

    latency_ms: float = 0.0  # added before the response (or before the first SSE chunk)
    latency_jitter_ms: float = 0.0  # uniform +- jitter, from the server's seeded random source
    error_rate: float = 0.0  # probability that a request answers with error_status
    error_status: int = 500
    chunk_delay_ms: float = 0.0  # delay between SSE chunks
    tool_rename: dict[str, str] = field(default_factory=dict)
    ignore_tools: bool = False
    reply_style: str = "echo"
    reply_prefix: str = ""
    judge: bool = False
    judge_scores: dict[str, float] = field(default_factory=dict)
    judge_default_score: float = DEFAULT_JUDGE_SCORE

    def __post_init__(self) -> None:
        _check_ms("latency_ms", self.latency_ms)
        _check_ms("latency_jitter_ms", self.latency_jitter_ms)
        _check_rate("error_rate", self.error_rate)
        _check_status("error_status", self.error_status)
        _check_ms("chunk_delay_ms", self.chunk_delay_ms)
        # private copies, so a caller's later change to its dict cannot change a frozen behavior
        object.__setattr__(
            self, "tool_rename", _check_names("tool_rename", self.tool_rename, _check_tool_name)
        )
        _check_bool("ignore_tools", self.ignore_tools)
        if self.reply_style not in REPLY_STYLES:
            raise BehaviorError(
                "reply_style", f"must be one of {', '.join(REPLY_STYLES)}, got {self.reply_style!r}"
            )
        _check_str("reply_prefix", self.reply_prefix)
        _check_bool("judge", self.judge)
        object.__setattr__(self, "judge_scores", _check_names("judge_scores", self.judge_scores, _check_rate))
        _check_rate("judge_default_score", self.judge_default_score)


@dataclass(frozen=True)
class ToolBehavior:
    """How one simulated tool service answers."""

    latency_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500

    def __post_init__(self) -> None:
        _check_ms("latency_ms", self.latency_ms)
        _check_rate("error_rate", self.error_rate)
        _check_status("error_status", self.error_status)


B = TypeVar("B", ModelBehavior, ToolBehavior)


def behavior_from_mapping(cls: type[B], data: object, base: B | None = None) -> B:
    """Build a behavior from a JSON/YAML mapping; fields it omits come from `base` (or the defaults).

    Raises BehaviorError naming the offending field (unknown fields included).
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise BehaviorError("(behavior)", f"must be a mapping of fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise BehaviorError(str(key), f"unknown field (known: {', '.join(sorted(known))})")
    start = base if base is not None else cls()
    return dataclasses.replace(start, **dict(data))


def behavior_to_dict(behavior: ModelBehavior | ToolBehavior) -> dict[str, Any]:
    return dataclasses.asdict(behavior)


def default_models() -> dict[str, ModelBehavior]:
    """sim-fast; sim-divergent, a shadow candidate that calls another tool and words its
    replies differently; sim-judge, which prefers sim-fast's answers to sim-divergent's."""
    return {
        DEFAULT_MODEL: ModelBehavior(latency_ms=DEFAULT_MODEL_LATENCY_MS),
        DIVERGENT_MODEL: ModelBehavior(
            latency_ms=DEFAULT_MODEL_LATENCY_MS,
            tool_rename={"lookup_order": "search_orders"},
            reply_style="reworded",
        ),
        JUDGE_MODEL: ModelBehavior(
            latency_ms=DEFAULT_MODEL_LATENCY_MS,
            judge=True,
            judge_scores={DEFAULT_MODEL: 0.8, DIVERGENT_MODEL: 0.3},
        ),
    }


def default_tools() -> dict[str, ToolBehavior]:
    return {name: ToolBehavior() for name in BUILTIN_TOOLS}


def _section(cls: type[B], path: Path, doc: Mapping[str, Any], key: str) -> dict[str, B]:
    raw = doc.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SimConfigError(f"{path}: {key}: must be a mapping of name -> behavior")
    out: dict[str, B] = {}
    for name, fields in raw.items():
        if not isinstance(name, str) or not name:
            raise SimConfigError(f"{path}: {key}: names must be non-empty strings, got {name!r}")
        try:
            out[name] = behavior_from_mapping(cls, fields)
        except BehaviorError as exc:
            where = key + "." + name if exc.field == "(behavior)" else f"{key}.{name}.{exc.field}"
            raise SimConfigError(f"{path}: {where}: {exc.problem}") from exc
    return out


def load_sim_config(path: Path) -> tuple[dict[str, ModelBehavior], dict[str, ToolBehavior]]:
    """Read a YAML file with optional ``models:`` and ``tools:`` sections of name -> behavior."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SimConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SimConfigError(f"{path}: not valid YAML: {exc}") from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise SimConfigError(f"{path}: top level must be a mapping with 'models' and/or 'tools'")
    for key in doc:
        if key not in ("models", "tools"):
            raise SimConfigError(f"{path}: {key}: unknown section (known: models, tools)")
    return _section(ModelBehavior, path, doc, "models"), _section(ToolBehavior, path, doc, "tools")
