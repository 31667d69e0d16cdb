"""uvloop and orjson on the sidecar's hot path: used when present, same behaviour as the stdlib."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from sidecar import _loop
from sidecar.upstream import _json


@pytest.mark.parametrize(
    ("value", "wanted"), [(None, True), ("1", True), ("0", False), ("off", False), (" False ", False)]
)
def test_uvloop_env(value: str | None, wanted: bool) -> None:
    env = {} if value is None else {_loop.UVLOOP_ENV: value}
    assert _loop.uvloop_wanted(env) is wanted


def test_run_uses_uvloop_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert issubclass(_loop.run(loop_type()), uvloop.Loop)
    monkeypatch.setenv(_loop.UVLOOP_ENV, "0")
    assert not issubclass(_loop.run(loop_type()), uvloop.Loop)


BODIES = [
    b'{"choices":[{"message":{"content":"h\\u00e9 \xe2\x9c\x93"}}],"usage":{"prompt_tokens":3}}',
    b'{"a": NaN, "b": Infinity}',  # the stdlib accepts these; orjson does not
    b'{"a": 1, "a": 2}',
]


@pytest.mark.parametrize("body", BODIES)
def test_loads_accepts_what_the_stdlib_does(body: bytes) -> None:
    got, want = _json.loads(body), json.loads(body)
    assert json.dumps(got) == json.dumps(want)


@pytest.mark.parametrize("body", [b"", b"{", b"[1,]", b'{"a": nan}'])
def test_loads_rejects_what_the_stdlib_does(body: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(body)
    with pytest.raises(ValueError):
        _json.loads(body)


@pytest.mark.parametrize(
    "value",
    [
        {"model": "m", "temperature": 0.2, "messages": [{"role": "user", "content": "é ✓"}]},
        {"big": 2**70},  # orjson refuses it: the stdlib writes it
        {1: "non-string key"},
    ],
)
def test_dumps_bytes_round_trips(value: object) -> None:
    assert json.loads(_json.dumps_bytes(value)) == json.loads(json.dumps(value))


def test_integers_past_64_bits_are_floats_with_orjson() -> None:
    # the one documented difference: no provider sends a count that large
    expected = 1.2345678901234568e29 if _json._orjson is not None else 123456789012345678901234567890
    assert _json.loads(b'{"big": 123456789012345678901234567890}') == {"big": expected}


def test_nan_body_still_parses_as_nan() -> None:
    assert math.isnan(_json.loads(b"[NaN]")[0])
