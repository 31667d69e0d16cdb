"""Incremental decoding of a server-sent-events byte stream (the OpenAI streaming format).

`SSEDecoder.feed(bytes)` returns the `data` payloads of every event completed by those
bytes; lines may be split anywhere across chunks. Comments (`:`), `event:`/`id:`/`retry:`
fields and field-less lines are ignored, as the SSE spec says. Multi-line data is joined
with "\\n". A line longer than `max_line_bytes` is refused (SSEError) so a broken upstream
cannot grow the buffer without bound.
"""

from __future__ import annotations

DEFAULT_MAX_LINE_BYTES = 4 << 20


class SSEError(ValueError):
    """The byte stream is not valid server-sent events."""


class SSEDecoder:
    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._max = max_line_bytes

    def feed(self, chunk: bytes) -> list[str]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[str] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line(line, events)
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max:
            raise SSEError(f"SSE line longer than {self._max} bytes")
        return events

    def finish(self) -> list[str]:
        """The stream ended: dispatch an event left without its closing blank line."""
        events: list[str] = []
        if self._buffer:
            line, self._buffer = self._buffer.rstrip(b"\r"), b""
            self._line(line, events)
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: bytes, events: list[str]) -> None:
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            try:
                self._data.append(value.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise SSEError("SSE data is not UTF-8") from exc
        # comments, other fields and field-less lines carry nothing we use
