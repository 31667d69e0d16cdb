"""Scripted faults for the simulated provider: what a request should suffer, queued per model and
per tool. Pure and synchronous; the server consumes a queue's head per request and does the I/O.

A `Fault` is an immutable value checked when it is made (a `FaultError`, a ValueError, names the
field). Queues are deterministic: faults apply in the order scripted, each to its next `times`
matching requests, no randomness involved.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

FaultKind = Literal[
    "status",  # answer `status` (4xx/5xx) with an OpenAI-style error body and optional retry headers
    "hang",  # sleep `delay_s` before anything (headers included), then answer normally
    "slow_first_byte",  # unary: delay_s before the headers; stream: headers, then delay_s, then chunks
    "cut_stream",  # stream only: send `after_chunks` SSE chunks, then close the connection (no [DONE])
    "stall",  # stream only: after `after_chunks` chunks, send nothing for delay_s (connection open)
    "malformed_json",  # 200, Content-Type application/json, a body that is not valid JSON
    "malformed_sse",  # stream only: after `after_chunks` chunks, a broken line; the rest follows
    "cut_body",  # unary only: headers with the full Content-Length, half the body, then close
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
STREAM_ONLY: frozenset[str] = frozenset({"cut_stream", "stall", "malformed_sse"})
UNARY_ONLY: frozenset[str] = frozenset({"cut_body"})
# Faults that break the answer (counted as errors); the others only delay a correct answer.
BREAKING: frozenset[str] = frozenset({"status", "cut_stream", "malformed_json", "malformed_sse", "cut_body"})
DEFAULT_BAD_SSE_LINE = 'data: {"id":"chatcmpl-sim-broken","object":"chat.completion.chunk","choices":[{'


class FaultError(ValueError):
    """A fault field is missing, of the wrong type, out of range or not allowed here."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _number(field: str, value: object, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FaultError(field, f"must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise FaultError(field, f"must be {'> 0' if positive else '>= 0'}, got {value!r}")


def _int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FaultError(field, f"must be an integer, got {value!r}")
    if value < minimum:
        raise FaultError(field, f"must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class Fault:
    """One scripted fault. Fields a kind does not use must stay at their defaults.

    - status: the HTTP status of kind "status" (400-599, required there).
    - retry_after_s / retry_after_ms: kind "status" only; sent as ``Retry-After`` (seconds) and
      ``retry-after-ms`` headers. Neither is sent unless set (a 429 fault carries none by default).
    - delay_s: the pause of "hang", "slow_first_byte" and "stall" (required > 0 there).
    - after_chunks: SSE chunks sent before "cut_stream", "stall" or "malformed_sse" strikes.
    - body: "malformed_json": the exact body (default: the real answer cut in half);
      "malformed_sse": the exact line written (default: a ``data:`` line with truncated JSON);
      write any non-SSE garbage here to test that case.
    - times: how many matching requests it applies to before it expires; None = until cleared.
    """

    kind: FaultKind
    status: int | None = None
    retry_after_s: float | None = None
    retry_after_ms: float | None = None
    delay_s: float = 0.0
    after_chunks: int = 0
    body: str | None = None
    times: int | None = 1

    def __post_init__(self) -> None:
        kind = self.kind
        if kind == "refuse":  # type: ignore[comparison-overlap]
            raise FaultError("kind", "'refuse' is not a server-side fault; use refused_base_url()")
        if kind not in FAULT_KINDS:
            raise FaultError("kind", f"must be one of {', '.join(FAULT_KINDS)}; got {kind!r}")
        if kind == "status":
            if self.status is None:
                raise FaultError("status", "required for kind 'status'")
            _int("status", self.status, 400)
            if self.status > 599:
                raise FaultError("status", f"must be an HTTP error status in [400, 599], got {self.status}")
        elif self.status is not None:
            raise FaultError("status", f"only for kind 'status', not {kind!r}")
        for name in ("retry_after_s", "retry_after_ms"):
            value = getattr(self, name)
            if value is None:
                continue
            if kind != "status":
                raise FaultError(name, f"only for kind 'status', not {kind!r}")
            _number(name, value)
        if kind in ("hang", "slow_first_byte", "stall"):
            _number("delay_s", self.delay_s, positive=True)
        elif self.delay_s != 0:
            raise FaultError("delay_s", f"only for kinds hang, slow_first_byte and stall, not {kind!r}")
        _int("after_chunks", self.after_chunks, 0)
        if self.after_chunks and kind not in STREAM_ONLY:
            raise FaultError("after_chunks", f"only for kinds {', '.join(sorted(STREAM_ONLY))}, not {kind!r}")
        if self.body is not None:
            if not isinstance(self.body, str):
                raise FaultError("body", f"must be a string, got {self.body!r}")
            if kind not in ("malformed_json", "malformed_sse"):
                raise FaultError("body", f"only for kinds malformed_json and malformed_sse, not {kind!r}")
            if kind == "malformed_sse" and ("\n" in self.body or "\r" in self.body):
                raise FaultError("body", "must be one line (no line breaks) for kind 'malformed_sse'")
        if self.times is not None:
            _int("times", self.times, 1)

    # shorthands for the common cases

    @classmethod
    def http_error(
        cls,
        status: int,
        *,
        retry_after_s: float | None = None,
        retry_after_ms: float | None = None,
        times: int | None = 1,
    ) -> Fault:
        return cls(
            "status", status=status, retry_after_s=retry_after_s, retry_after_ms=retry_after_ms, times=times
        )

    @classmethod
    def rate_limit(
        cls, *, retry_after_s: float | None = None, retry_after_ms: float | None = None, times: int | None = 1
    ) -> Fault:
        return cls.http_error(429, retry_after_s=retry_after_s, retry_after_ms=retry_after_ms, times=times)

    @classmethod
    def hang(cls, delay_s: float, *, times: int | None = 1) -> Fault:
        return cls("hang", delay_s=delay_s, times=times)

    @classmethod
    def slow_first_byte(cls, delay_s: float, *, times: int | None = 1) -> Fault:
        return cls("slow_first_byte", delay_s=delay_s, times=times)

    @classmethod
    def cut_stream(cls, after_chunks: int, *, times: int | None = 1) -> Fault:
        return cls("cut_stream", after_chunks=after_chunks, times=times)

    @classmethod
    def stall(cls, after_chunks: int, delay_s: float, *, times: int | None = 1) -> Fault:
        return cls("stall", after_chunks=after_chunks, delay_s=delay_s, times=times)

    @classmethod
    def malformed_json(cls, body: str | None = None, *, times: int | None = 1) -> Fault:
        return cls("malformed_json", body=body, times=times)

    @classmethod
    def malformed_sse(cls, after_chunks: int = 0, body: str | None = None, *, times: int | None = 1) -> Fault:
        return cls("malformed_sse", after_chunks=after_chunks, body=body, times=times)

    @classmethod
    def cut_body(cls, *, times: int | None = 1) -> Fault:
        return cls("cut_body", times=times)

    def applies_to(self, stream: bool) -> bool:
        """Stream-only kinds leave unary requests alone, and cut_body leaves streams alone."""
        return not (self.kind in STREAM_ONLY and not stream) and not (self.kind in UNARY_ONLY and stream)

    def retry_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = f"{self.retry_after_s:g}"
        if self.retry_after_ms is not None:
            headers["retry-after-ms"] = f"{self.retry_after_ms:g}"
        return headers


def fault_from_mapping(data: object) -> Fault:
    """A Fault from its JSON form (the field names); raises FaultError naming the field."""
    if not isinstance(data, Mapping):
        raise FaultError("(fault)", f"must be an object with 'kind', got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(Fault)}
    for key in data:
        if key not in known:
            raise FaultError(str(key), f"unknown field (known: {', '.join(sorted(known))})")
    if "kind" not in data:
        raise FaultError("kind", "required")
    try:
        return Fault(**dict(data))
    except TypeError as exc:  # pragma: no cover - all fields have defaults but kind
        raise FaultError("(fault)", str(exc)) from exc


def faults_from_json(data: object) -> list[Fault]:
    """A JSON list of faults (or one fault object); the error field is prefixed with [i]."""
    items = data if isinstance(data, list) else [data]
    out: list[Fault] = []
    for i, item in enumerate(items):
        try:
            out.append(fault_from_mapping(item))
        except FaultError as exc:
            raise FaultError(f"[{i}].{exc.field}", exc.problem) from exc
    return out


def fault_to_dict(fault: Fault) -> dict[str, Any]:
    return dataclasses.asdict(fault)


class FaultQueue:
    """The faults scripted for one model or tool, head first, with the head's uses left."""

    def __init__(self) -> None:
        self._items: collections.deque[list[Any]] = collections.deque()  # [fault, remaining]

    def push(self, faults: Iterable[Fault]) -> None:
        """Queue faults after those already there. One with times=None never expires, so nothing
        may follow it (FaultError on `times`)."""
        faults = list(faults)
        tail_forever = bool(self._items) and self._items[-1][1] is None
        for i, fault in enumerate(faults):
            if not isinstance(fault, Fault):
                raise FaultError(f"[{i}]", f"must be a Fault, got {type(fault).__name__}")
            if tail_forever or (fault.times is None and i != len(faults) - 1):
                raise FaultError("times", "a fault with times=None never expires, so no fault may follow it")
        self._items.extend([f, f.times] for f in faults)

    def take(self, stream: bool) -> Fault | None:
        """The fault this request suffers (using one of its times), or None. A head that does not
        apply to this kind of request (stream vs unary) is left in place, unused."""
        if not self._items:
            return None
        item = self._items[0]
        fault: Fault = item[0]
        if not fault.applies_to(stream):
            return None
        if item[1] is not None:
            item[1] -= 1
            if item[1] <= 0:
                self._items.popleft()
        return fault

    def pending(self) -> list[Fault]:
        """What is left, each with `times` set to its remaining uses."""
        return [dataclasses.replace(f, times=left) for f, left in self._items]

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def refused_base_url(host: str = "127.0.0.1") -> str:
    """An http://HOST:PORT/v1 base URL where nothing listens, so connecting is really refused
    (the kernel answers RST, the client gets ECONNREFUSED). The port was bound and released just
    now; another process could take it later, which on loopback in a test is very unlikely."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
