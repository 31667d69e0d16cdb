"""The spill's on-disk format: the files in a spill directory and the bytes in them.

Pure encoding and decoding (plus reading frames from a file descriptor); `_spill_files` does the
file I/O and `_spill` the buffer's bookkeeping.

Directory layout
----------------

    <directory>/lock                    flock(2)-held while open: one buffer per directory
    <directory>/cursor                  the read cursor, replaced atomically (write tmp, rename)
    <directory>/00000000000000000007.seg   segment files, ids increasing, never reused
    <directory>/00000000000000000008.seg   the newest one is the one being appended to

Segment file (all integers big-endian)::

    header   "OSPL"  u8 version=1  3 zero bytes  u64 segment id          16 bytes
    frame*   u32 payload length    u32 CRC-32 (zlib) of the payload      8 bytes
             payload:
               u16 topic length, topic (UTF-8)
               i32 key length (-1: no key), key
               u32 value length, value
               u16 header count, then per header:
                 u16 name length, name (UTF-8), u32 value length, value

Cursor file: "OSCR" u8 version=1, 3 zero bytes, u64 segment id, u64 byte offset of the next
unacknowledged frame, u32 CRC-32 of the preceding 24 bytes (28 bytes).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from typing import Final

from sidecar.telemetry._spill_models import SpillRecord

SEGMENT_MAGIC: Final = b"OSPL"
CURSOR_MAGIC: Final = b"OSCR"
VERSION: Final = 1
SEGMENT_HEADER = struct.Struct(">4sB3xQ")
_CURSOR_BODY = struct.Struct(">4sB3xQQ")
_CURSOR_CRC = struct.Struct(">I")
_FRAME = struct.Struct(">II")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")

SEGMENT_HEADER_BYTES: Final = SEGMENT_HEADER.size  # 16
FRAME_HEADER_BYTES: Final = _FRAME.size  # 8
# topic len + key len + value len + header count: the smallest possible payload
MIN_PAYLOAD: Final = 2 + 4 + 4 + 2
_MAX_U16: Final = 0xFFFF
_MAX_I32: Final = 0x7FFFFFFF

LOCK_NAME: Final = "lock"
CURSOR_NAME: Final = "cursor"
CURSOR_TMP_NAME: Final = "cursor.tmp"
SEGMENT_SUFFIX: Final = ".seg"


def segment_name(segment_id: int) -> str:
    return f"{segment_id:020d}{SEGMENT_SUFFIX}"


def encode_frame(record: SpillRecord) -> bytes:
    topic = record.topic.encode()
    if len(topic) > _MAX_U16:
        raise ValueError("SpillRecord.topic is longer than 65535 bytes")
    if len(record.headers) > _MAX_U16:
        raise ValueError("SpillRecord.headers has more than 65535 entries")
    parts = [_U16.pack(len(topic)), topic]
    if record.key is None:
        parts.append(_I32.pack(-1))
    else:
        if len(record.key) > _MAX_I32:
            raise ValueError("SpillRecord.key is too large")
        parts += (_I32.pack(len(record.key)), record.key)
    if len(record.value) > _MAX_I32:
        raise ValueError("SpillRecord.value is too large")
    parts += (_U32.pack(len(record.value)), record.value, _U16.pack(len(record.headers)))
    for name, value in record.headers:
        raw = name.encode()
        if len(raw) > _MAX_U16:
            raise ValueError("SpillRecord.headers name is longer than 65535 bytes")
        if len(value) > _MAX_I32:
            raise ValueError("SpillRecord.headers value is too large")
        parts += (_U16.pack(len(raw)), raw, _U32.pack(len(value)), value)
    payload = b"".join(parts)
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: memoryview) -> SpillRecord:
    """Decode a CRC-checked payload; raises ValueError (or struct.error) if it is malformed."""
    p = bytes(payload)
    (n,) = _U16.unpack_from(p, 0)
    pos = 2 + n
    topic = p[2:pos].decode()
    (n,) = _I32.unpack_from(p, pos)
    pos += 4
    key: bytes | None = None
    if n != -1:
        if n < 0:
            raise ValueError("negative key length")
        key = p[pos : pos + n]
        pos += n
    (n,) = _U32.unpack_from(p, pos)
    pos += 4
    value = p[pos : pos + n]
    pos += n
    (count,) = _U16.unpack_from(p, pos)
    pos += 2
    headers: list[tuple[str, bytes]] = []
    for _ in range(count):
        (n,) = _U16.unpack_from(p, pos)
        name = p[pos + 2 : pos + 2 + n].decode()
        pos += 2 + n
        (n,) = _U32.unpack_from(p, pos)
        headers.append((name, p[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    # a length running past the end leaves pos beyond it (slices clamp silently)
    if pos != len(p):
        raise ValueError("frame length does not match its fields")
    # the fields are well-typed by construction: skip SpillRecord's checks on the read path
    record = object.__new__(SpillRecord)
    object.__setattr__(record, "topic", topic)
    object.__setattr__(record, "key", key)
    object.__setattr__(record, "value", value)
    object.__setattr__(record, "headers", tuple(headers))
    return record


def iter_frames(fd: int, start: int, end: int, chunk: int) -> Iterator[tuple[int, memoryview]]:
    """Yield (offset after the frame, payload) for each good frame in [start, end).

    Stops at the first torn (runs past `end`) or corrupt (bad length or CRC) frame; the caller
    compares the last offset with `end`. Memory is bounded by max(chunk, one frame).
    """
    pos = start
    buf = memoryview(b"")
    buf_start = start
    while end - pos >= FRAME_HEADER_BYTES:
        rel = pos - buf_start
        if len(buf) - rel < FRAME_HEADER_BYTES:
            buf, buf_start, rel = memoryview(os.pread(fd, min(chunk, end - pos), pos)), pos, 0
            if len(buf) < FRAME_HEADER_BYTES:
                return
        length, crc = _FRAME.unpack_from(buf, rel)
        total = FRAME_HEADER_BYTES + length
        if length < MIN_PAYLOAD or total > end - pos:
            return
        if len(buf) - rel < total:
            buf, buf_start, rel = memoryview(os.pread(fd, min(max(chunk, total), end - pos), pos)), pos, 0
            if len(buf) < total:
                return
        payload = buf[rel + FRAME_HEADER_BYTES : rel + total]
        if zlib.crc32(payload) != crc:
            return
        pos += total
        yield pos, payload


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def segment_id(name: str) -> int | None:
    """The id in a segment file's name, or None for any other file."""
    stem = name.removesuffix(SEGMENT_SUFFIX)
    if name.endswith(SEGMENT_SUFFIX) and len(stem) == 20 and stem.isdigit():
        return int(stem)
    return None


def segment_header(seg_id: int) -> bytes:
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, VERSION, seg_id)


def segment_header_ok(header: bytes, seg_id: int) -> bool:
    return len(header) >= SEGMENT_HEADER_BYTES and SEGMENT_HEADER.unpack(header) == (
        SEGMENT_MAGIC,
        VERSION,
        seg_id,
    )


def encode_cursor(seg_id: int, offset: int) -> bytes:
    body = _CURSOR_BODY.pack(CURSOR_MAGIC, VERSION, seg_id, offset)
    return body + _CURSOR_CRC.pack(zlib.crc32(body))


def decode_cursor(raw: bytes) -> tuple[int, int] | None:
    """(segment id, byte offset), or None when `raw` is not a good cursor file."""
    if len(raw) == _CURSOR_BODY.size + _CURSOR_CRC.size:
        magic, version, seg_id, offset = _CURSOR_BODY.unpack_from(raw)
        (crc,) = _CURSOR_CRC.unpack_from(raw, _CURSOR_BODY.size)
        if magic == CURSOR_MAGIC and version == VERSION and crc == zlib.crc32(raw[: _CURSOR_BODY.size]):
            return seg_id, offset
    return None
