"""The one place where an event's free-form `error_class` becomes an error class.

Sidecars write short labels ("provider_5xx", "timeout", "tool_4xx", "quota",
"guard_blocked", "breaker_open", ...); gates, windows and /metrics count errors by the
handful of classes below, so a new sidecar label only needs a line here.
"""

from __future__ import annotations

PROVIDER = "provider"
TOOL = "tool"
TIMEOUT = "timeout"
QUOTA = "quota"
GUARD_BLOCK = "guard_block"  # the user's input was blocked: not the version's doing
GUARD_OUTPUT = "guard_output"  # the version's output was blocked
CANCELLED = "cancelled"
OTHER = "other"

ERROR_CLASSES = (PROVIDER, TOOL, TIMEOUT, QUOTA, GUARD_BLOCK, GUARD_OUTPUT, CANCELLED, OTHER)
# what a version does not cause: the reliability gate counts these apart, in neither side
NOT_CAUSED = frozenset({QUOTA, GUARD_BLOCK, CANCELLED})

_EXACT = {
    "timeout": TIMEOUT,
    "stream_stall": TIMEOUT,
    "deadline_exceeded": TIMEOUT,
    "quota": QUOTA,
    "quota_exceeded": QUOTA,
    "quota_refused": QUOTA,
    "rate_limited": QUOTA,
    "guard_blocked": GUARD_BLOCK,
    "guard_blocked_input": GUARD_BLOCK,
    "guard_blocked_output": GUARD_OUTPUT,
    "guard_block": GUARD_BLOCK,
    "blocked": GUARD_BLOCK,
    "cancelled": CANCELLED,
    "canceled": CANCELLED,
    "provider": PROVIDER,
    "tool": TOOL,
}
# upstream failures that belong to whichever upstream the record is about
_UPSTREAM = frozenset({"connect", "invalid_response", "breaker_open", "unavailable", "error"})


def classify(error_class: str, *, tool: bool = False) -> str:
    """The error class of a failed call (`tool=False`) or tool call (`tool=True`)."""
    label = error_class.strip().lower()
    if label in _EXACT:
        found = _EXACT[label]
        return TOOL if tool and found == PROVIDER else found
    if label.endswith(("_timeout", "_stall")):
        return TIMEOUT
    if label.startswith("tool"):
        return TOOL
    if label.startswith("provider") or label in _UPSTREAM or not label:
        return TOOL if tool else PROVIDER
    if label.startswith("guard"):
        return GUARD_BLOCK
    if label.startswith("quota"):
        return QUOTA
    return OTHER
