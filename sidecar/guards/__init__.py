"""Guardrails: prompt-injection patterns on input, PII and secrets on output, per version.

The implementation is split by concern; this package is the one to import from:

- `_base`: the `Guard` seam (`Match`, `GuardScan`, `Action`, `Category`) and the
  regex machinery (`RegexGuard`, `Pattern`);
- `_builtin`: `InjectionGuard`, `EmailGuard`, `PhoneGuard`, `CardGuard`,
  `NationalIdGuard`, `SecretGuard`;
- `_policy`: `GuardRule`, `GuardPolicy` (`scan_input`, `scan_output`),
  `GuardOutcome`, `Hit`, `build_policy`;
- `_stream`: `StreamRedactor` for streamed replies;
- `_safety`: hits to `safety` events and metrics, input scanning, session costs (import it
  from its module: it needs the telemetry producer, which this package does not).

Nothing here does I/O; a hit never carries the text it matched.
"""

from __future__ import annotations

from sidecar.guards._base import (
    DEFAULT_MAX_MATCH_LEN,
    Action,
    Category,
    Direction,
    Guard,
    GuardScan,
    Match,
    Pattern,
    RegexGuard,
)
from sidecar.guards._builtin import (
    BUILTIN_GUARDS,
    CardGuard,
    EmailGuard,
    InjectionGuard,
    NationalIdGuard,
    PhoneGuard,
    SecretGuard,
    luhn_valid,
)
from sidecar.guards._policy import (
    PII_GROUP,
    GuardConfigError,
    GuardFactory,
    GuardOutcome,
    GuardPolicy,
    GuardRule,
    Hit,
    build_policy,
    parse_action,
    redaction_marker,
)
from sidecar.guards._stream import DEFAULT_MAX_PENDING, StreamOutput, StreamRedactor

__all__ = [
    "BUILTIN_GUARDS",
    "DEFAULT_MAX_MATCH_LEN",
    "DEFAULT_MAX_PENDING",
    "PII_GROUP",
    "Action",
    "CardGuard",
    "Category",
    "Direction",
    "EmailGuard",
    "Guard",
    "GuardConfigError",
    "GuardFactory",
    "GuardOutcome",
    "GuardPolicy",
    "GuardRule",
    "GuardScan",
    "Hit",
    "InjectionGuard",
    "Match",
    "NationalIdGuard",
    "Pattern",
    "PhoneGuard",
    "RegexGuard",
    "SecretGuard",
    "StreamOutput",
    "StreamRedactor",
    "build_policy",
    "luhn_valid",
    "parse_action",
    "redaction_marker",
]
