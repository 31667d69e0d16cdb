"""Durations in config files, specs and flags: "500ms", "30s", "5m", "1h", "7d", or a number
of seconds. The one duration parser of the sidecar, the collector and the CLI."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def parse_duration(value: Any, *, positive: bool = False) -> float:
    """Seconds from a duration string or number; ValueError names the accepted forms.
    `positive`: zero is refused too (a timeout, an interval)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _PATTERN.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value):
        seconds = float(value)
    else:
        raise ValueError(f"{value!r} is not a duration (use 500ms, 30s, 5m, 1h, 7d or a number of seconds)")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"{value!r}: a duration must be a finite number >= 0")
    if positive and seconds == 0:
        raise ValueError(f"{value!r}: must be longer than 0s")
    return seconds


def parse_positive_duration(value: Any) -> float:
    """`parse_duration` refusing zero."""
    return parse_duration(value, positive=True)


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A pydantic field type: seconds, written as a duration string or a number."""
PositiveDuration = Annotated[float, BeforeValidator(parse_positive_duration)]
"""`Duration` refusing zero."""
