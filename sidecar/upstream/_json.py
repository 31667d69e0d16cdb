"""JSON for the upstream request and response bodies: orjson when installed, else the stdlib.

orjson parses a typical completion about 5x faster and writes a request body about 15x
faster than `json`. Anything orjson refuses (NaN or Infinity in a response; integers past 64
bits or non-string keys in a request) falls back to the stdlib, so what is accepted is
unchanged. Two differences remain: orjson parses an integer past 64 bits as a float (no
provider sends a count that large), and it writes a NaN or Infinity in a request as `null`
where the stdlib writes `NaN`, which is not JSON and which a provider would refuse.
`OUTRIDER_ORJSON=0` turns it off.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the fallback is for odd platforms
    orjson = None  # type: ignore[assignment]

ORJSON_ENV = "OUTRIDER_ORJSON"
_orjson = (
    orjson if os.environ.get(ORJSON_ENV, "1").strip().lower() not in ("0", "false", "no", "off") else None
)


def loads(data: bytes | str) -> Any:
    """Parse a body; ValueError (as `json.loads` raises) if it is not JSON."""
    if _orjson is not None:
        try:
            return _orjson.loads(data)
        except _orjson.JSONDecodeError:
            pass  # e.g. NaN, which the stdlib accepts: let it decide
    return json.loads(data)


def dumps_bytes(value: Any) -> bytes:
    """A request body (aiohttp's `json_serialize_bytes`)."""
    if _orjson is not None:
        try:
            body: bytes = _orjson.dumps(value)
            return body
        except TypeError:
            pass  # e.g. an int past 64 bits
    return json.dumps(value).encode()


def aiohttp_session_options() -> dict[str, Any]:
    """`aiohttp.ClientSession` keyword arguments that make `json=` bodies use `dumps_bytes`
    (none on an aiohttp without `json_serialize_bytes`, which then uses the stdlib)."""
    import aiohttp

    if _orjson is None or "json_serialize_bytes" not in inspect.signature(aiohttp.ClientSession).parameters:
        return {}
    return {"json_serialize_bytes": dumps_bytes}
