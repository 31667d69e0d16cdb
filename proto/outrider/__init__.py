"""The Outrider wire contract: generated protobuf code (`outrider.v1`) plus the small
helpers both the sidecar and the collector need (topic names, record keys and headers,
the envelope codec, the ErrorInfo reasons, the gRPC metadata keys; `outrider.clock` for
injectable time).

The signing, registry and control-record helpers need `cryptography` (the `server` extra):
they load on first use, so an agent client imports `outrider.v1` with protobuf and grpcio only."""

import importlib
from typing import TYPE_CHECKING, Any

from outrider._envelope import (
    CONTENT_TYPE_HEADER,
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    DecodeError,
    check_event_headers,
    decode_control,
    decode_event,
    decode_event_head,
    encode_control,
    encode_event,
)
from outrider._metadata import RETRY_AFTER_MS_KEY, TRACEPARENT_KEY, TRACESTATE_KEY
from outrider._reasons import ERROR_DOMAIN, FLAG_OFF, SESSION_DRAINED, SESSION_EXPIRED, TOOL_REJECTED
from outrider._topics import (
    COMMANDS_TOPIC,
    CONTROL_TOPIC,
    DEADLETTER_TOPIC,
    DEPLOYMENTS_TOPIC,
    EVENTS_TOPIC,
    MARKER_KEY_PREFIX,
    SPANS_TOPIC,
    VERSIONS_TOPIC,
    agent_key,
    deployment_key,
    flag_key,
    quota_key,
    rollout_key,
    version_key,
)

if TYPE_CHECKING:
    from outrider._control_records import (
        SignedRecord,
        is_marker,
        load_records,
        open_control,
        ordering,
        save_records,
    )
    from outrider._registry import (
        ID_MISMATCH,
        NOT_CANONICAL,
        canonical_form,
        check_version,
        open_version,
        version_id_of,
    )
    from outrider._signing import (
        RejectLog,
        SigningKey,
        SigningKeyError,
        Verdict,
        Verifier,
        VerifyMode,
        key_id,
        load_public_keys,
    )

# name -> the module that defines it, imported on first access (PEP 562)
_LAZY = {
    **dict.fromkeys(
        ("SignedRecord", "is_marker", "load_records", "open_control", "ordering", "save_records"),
        "outrider._control_records",
    ),
    **dict.fromkeys(
        ("ID_MISMATCH", "NOT_CANONICAL", "canonical_form", "check_version", "open_version", "version_id_of"),
        "outrider._registry",
    ),
    **dict.fromkeys(
        (
            "RejectLog",
            "SigningKey",
            "SigningKeyError",
            "Verdict",
            "Verifier",
            "VerifyMode",
            "key_id",
            "load_public_keys",
        ),
        "outrider._signing",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'outrider' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"outrider.{name} needs {exc.name}: install the contract's server extra "
            "(pip install 'outrider-contract[server]')"
        ) from exc
    globals()[name] = value
    return value


__all__ = [
    "RETRY_AFTER_MS_KEY",
    "TRACEPARENT_KEY",
    "TRACESTATE_KEY",
    "COMMANDS_TOPIC",
    "CONTENT_TYPE_HEADER",
    "CONTROL_TOPIC",
    "DEADLETTER_TOPIC",
    "DEPLOYMENTS_TOPIC",
    "ERROR_DOMAIN",
    "EVENTS_TOPIC",
    "FLAG_OFF",
    "SCHEMA_HEADER",
    "SCHEMA_VERSION",
    "MARKER_KEY_PREFIX",
    "SESSION_DRAINED",
    "SESSION_EXPIRED",
    "SPANS_TOPIC",
    "TOOL_REJECTED",
    "VERSIONS_TOPIC",
    "ID_MISMATCH",
    "NOT_CANONICAL",
    "DecodeError",
    "check_event_headers",
    "SigningKeyError",
    "RejectLog",
    "SignedRecord",
    "SigningKey",
    "Verdict",
    "Verifier",
    "VerifyMode",
    "agent_key",
    "canonical_form",
    "check_version",
    "deployment_key",
    "open_version",
    "version_id_of",
    "version_key",
    "flag_key",
    "is_marker",
    "key_id",
    "load_public_keys",
    "load_records",
    "open_control",
    "ordering",
    "quota_key",
    "rollout_key",
    "save_records",
    "decode_control",
    "decode_event",
    "decode_event_head",
    "encode_control",
    "encode_event",
]
