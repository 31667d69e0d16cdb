"""A bounded, ordered, on-disk FIFO of Kafka records: where telemetry waits while Kafka is away.

The produce path appends here when the broker is unreachable (and at shutdown, for whatever is
still pending); a drain task reads in order with `peek`, delivers, then `ack`s. All calls are
synchronous file I/O, each bounded in time and memory, so the async layer runs them with
`asyncio.to_thread`. One lock serialises them, so a writer and a reader may share an instance
from different threads.

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

Guarantees
----------

- Order: records are read back in append order, across segments and across restarts.
- At least once: `ack(batch)` moves the cursor past a batch only after the caller delivered it.
  A crash between delivery and ack re-delivers that batch after reopen (consumers dedupe by
  event id). Acknowledged records are never re-delivered by a reopened buffer, as long as the
  cursor file survived (it is replaced by rename, so it is either the old or the new one).
- Bounded: segment files never total more than `max_bytes`. When an append would exceed it,
  whole oldest segments are deleted first (unread records in them are counted in
  `dropped_records` / `dropped_bytes`); new records are never refused for lack of room. Dropping
  is per segment, so after a drop the buffer may hold up to `segment_bytes` less than the bound.
  A single record that cannot fit even in an empty buffer is refused with `ValueError`.
- Crash safety: `open()` checks every remaining frame (length and CRC). A torn or corrupt tail
  (a crash mid-write, a bad sector) is truncated at the last good frame and counted in
  `corrupt_truncations` / `corrupt_bytes`, never raised to the reader; a bad or missing cursor
  file falls back to the oldest segment (re-delivery, never loss). `open()` therefore reads the
  whole pending backlog once (about a second for 256 MiB).
- Durability: with `fsync=False` (the default) data reaches the OS page cache on every
  `append`, so it survives the process being killed (SIGKILL included) but not a power cut;
  `close()` and `sync()` fsync it. With `fsync=True` every append, new segment and cursor
  update is fsynced before the call returns.

Errors::

    SpillError               an I/O failure; the message names the file
     ├── SpillClosedError    a method needing the files was called before open() or after close()
     └── SpillLockedError    another open buffer (this process or another) holds the directory

Bad input (a record of the wrong type or too large, bad limits) raises TypeError or ValueError
naming the field.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import warnings
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PEEK_MAX_BYTES",
    "DEFAULT_PEEK_MAX_RECORDS",
    "DEFAULT_SEGMENT_BYTES",
    "SpillBatch",
    "SpillBuffer",
    "SpillClosedError",
    "SpillError",
    "SpillLockedError",
    "SpillPosition",
    "SpillRecord",
    "SpillStats",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024
DEFAULT_SEGMENT_BYTES: Final = 4 * 1024 * 1024
DEFAULT_PEEK_MAX_RECORDS: Final = 500
DEFAULT_PEEK_MAX_BYTES: Final = 1024 * 1024

_SEGMENT_MAGIC: Final = b"OSPL"
_CURSOR_MAGIC: Final = b"OSCR"
_VERSION: Final = 1
_SEGMENT_HEADER = struct.Struct(">4sB3xQ")
_CURSOR_BODY = struct.Struct(">4sB3xQQ")
_CURSOR_CRC = struct.Struct(">I")
_FRAME = struct.Struct(">II")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")

SEGMENT_HEADER_BYTES: Final = _SEGMENT_HEADER.size  # 16
FRAME_HEADER_BYTES: Final = _FRAME.size  # 8
# topic len + key len + value len + header count: the smallest possible payload
_MIN_PAYLOAD: Final = 2 + 4 + 4 + 2
_MAX_U16: Final = 0xFFFF
_MAX_I32: Final = 0x7FFFFFFF
_SCAN_CHUNK: Final = 1024 * 1024
_MIN_READ_CHUNK: Final = 16 * 1024
_PEEK_CHUNK: Final = 256 * 1024
_WRITE_CHUNK: Final = 1024 * 1024

_LOCK_NAME: Final = "lock"
_CURSOR_NAME: Final = "cursor"
_CURSOR_TMP_NAME: Final = "cursor.tmp"
_SEGMENT_SUFFIX: Final = ".seg"


class SpillError(Exception):
    """The spill buffer could not read or write its files."""


class SpillClosedError(SpillError):
    """The buffer is not open."""


class SpillLockedError(SpillError):
    """Another open buffer holds the directory."""


@dataclass(frozen=True, slots=True)
class SpillRecord:
    """One Kafka record to send later. `headers` is normalised to a tuple of (name, value) pairs."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes]] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not self.topic:
            raise TypeError("SpillRecord.topic must be a non-empty str")
        if self.key is not None and not isinstance(self.key, bytes):
            raise TypeError("SpillRecord.key must be bytes or None")
        if not isinstance(self.value, bytes):
            raise TypeError("SpillRecord.value must be bytes")
        headers = tuple(self.headers)
        for item in headers:
            if (
                not isinstance(item, tuple)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not isinstance(item[1], bytes)
            ):
                raise TypeError("SpillRecord.headers must be (str, bytes) pairs")
        object.__setattr__(self, "headers", headers)


@dataclass(frozen=True, slots=True, order=True)
class SpillPosition:
    """Where a batch ends: opaque to callers, ordered by (segment, offset)."""

    segment: int
    offset: int
    index: int = field(compare=False)  # records before `offset` in the segment


@dataclass(frozen=True, slots=True)
class SpillBatch:
    """Records read by `peek`, in order, with the position `ack` moves the cursor to."""

    records: tuple[SpillRecord, ...]
    nbytes: int  # framed bytes on disk, the unit of `pending_bytes`
    end: SpillPosition | None  # None for an empty batch

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True, slots=True)
class SpillStats:
    """A snapshot of the counters, for metrics."""

    pending_records: int
    pending_bytes: int
    disk_bytes: int
    segments: int
    dropped_records: int
    dropped_bytes: int
    corrupt_truncations: int
    corrupt_bytes: int


@dataclass(slots=True)
class _Segment:
    id: int
    path: Path
    size: int  # bytes in the file, header included (plus any still in the write buffer)
    records: int
    committed_size: int  # bytes known to be in the file
    committed_records: int


def _segment_name(segment_id: int) -> str:
    return f"{segment_id:020d}{_SEGMENT_SUFFIX}"


def _encode(record: SpillRecord) -> bytes:
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


def _decode(payload: memoryview) -> SpillRecord:
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


def _frames(fd: int, start: int, end: int, chunk: int) -> Iterator[tuple[int, memoryview]]:
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
        if length < _MIN_PAYLOAD or total > end - pos:
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


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class SpillBuffer:
    """A bounded on-disk FIFO of `SpillRecord`s; see the module docstring for format and guarantees."""

    def __init__(
        self,
        directory: Path | str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = False,
    ) -> None:
        min_segment = SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + _MIN_PAYLOAD
        if not isinstance(segment_bytes, int) or segment_bytes < min_segment:
            raise ValueError(f"segment_bytes must be an int >= {min_segment}, got {segment_bytes!r}")
        if not isinstance(max_bytes, int) or max_bytes < segment_bytes:
            raise ValueError(
                f"max_bytes must be an int >= segment_bytes ({segment_bytes}), got {max_bytes!r}"
            )
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._lock = threading.Lock()
        self._open = False
        self._lock_fd: int | None = None
        self._segments: deque[_Segment] = deque()
        self._active: _Segment | None = None
        self._active_fd: int | None = None
        self._wbuf = bytearray()
        self._next_id = 0
        self._cursor = SpillPosition(0, SEGMENT_HEADER_BYTES, 0)
        self._disk_bytes = 0
        self._pending_records = 0
        self._pending_bytes = 0
        # counters are cumulative over the object's life (they feed monotonic metrics)
        self._dropped_records = 0
        self._dropped_bytes = 0
        self._corrupt_truncations = 0
        self._corrupt_bytes = 0

    # ---- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, recover its segments and cursor. Idempotent."""
        with self._lock:
            if self._open:
                return
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                self._acquire_dir_lock()
            except OSError as exc:
                raise SpillError(f"cannot open spill directory {self._dir}: {exc.strerror}") from exc
            try:
                self._recover()
            except OSError as exc:
                self._release_files()
                raise SpillError(f"cannot recover spill directory {self._dir}: {exc.strerror}") from exc
            except BaseException:
                self._release_files()
                raise
            self._open = True
            log.debug(
                "spill buffer %s opened: %d records, %d bytes pending",
                self._dir,
                self._pending_records,
                self._pending_bytes,
            )

    def close(self) -> None:
        """Fsync what was written and release the files. Idempotent; `open()` may follow."""
        with self._lock:
            if not self._open:
                return
            try:
                self._sync_locked()
            finally:
                self._open = False
                self._release_files()

    def sync(self) -> None:
        """Fsync the segment being written and the directory, whatever `fsync` says."""
        with self._lock:
            self._check_open()
            self._sync_locked()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_open", False):
            warnings.warn(f"unclosed SpillBuffer {self._dir}", ResourceWarning, stacklevel=1)
            with contextlib.suppress(Exception):
                self._release_files()

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<SpillBuffer {str(self._dir)!r} {state} pending={self._pending_records}>"

    # ---- writing --------------------------------------------------------------------------

    def append(self, records: Iterable[SpillRecord]) -> int:
        """Append records in order; return the framed bytes they take (the growth of pending_bytes).

        If they do not fit in `max_bytes`, whole oldest segments are dropped and counted first
        (within one oversized call, that can include its own earliest records). Nothing is
        written if any record is invalid. On an OS error a prefix of the records may be stored.
        """
        frames = [_encode(r) for r in records]
        limit = self._max_bytes - SEGMENT_HEADER_BYTES
        for i, frame in enumerate(frames):
            if len(frame) > limit:
                raise ValueError(
                    f"records[{i}] takes {len(frame)} bytes framed, more than max_bytes allows ({limit})"
                )
        with self._lock:
            self._check_open()
            for frame in frames:
                self._append_frame(frame)
            self._flush_active()
        return sum(len(f) for f in frames)

    def _append_frame(self, frame: bytes) -> None:
        size = len(frame)
        active = self._active
        roll = active is None or (active.records > 0 and active.size + size > self._segment_bytes)
        need = size + (SEGMENT_HEADER_BYTES if roll else 0)
        while self._disk_bytes + need > self._max_bytes:
            self._drop_oldest()
            if not roll and self._active is None:
                roll = True
                need += SEGMENT_HEADER_BYTES
        if roll:
            self._seal_active()
            self._start_segment()
        seg = self._active
        assert seg is not None
        self._wbuf += frame
        seg.size += size
        seg.records += 1
        self._disk_bytes += size
        self._pending_bytes += size
        self._pending_records += 1
        if len(self._wbuf) >= _WRITE_CHUNK:
            self._flush_active()  # keep a large append from doubling its size in memory

    def _drop_oldest(self) -> None:
        assert self._segments, "nothing to drop: a frame larger than max_bytes got through"
        seg = self._segments[0]
        # the cursor always sits in the oldest segment: everything before it was acked
        records = seg.records - self._cursor.index
        nbytes = seg.size - self._cursor.offset
        self._dropped_records += records
        self._dropped_bytes += nbytes
        self._pending_records -= records
        self._pending_bytes -= nbytes
        log.warning(
            "spill buffer %s full (%d bytes): dropped %d oldest records (%d bytes)",
            self._dir,
            self._max_bytes,
            records,
            nbytes,
        )
        self._remove_oldest()
        self._reset_cursor_to_oldest()

    def _start_segment(self) -> None:
        seg_id = self._next_id
        path = self._dir / _segment_name(seg_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError as exc:
            raise SpillError(f"cannot create spill segment {path}: {exc.strerror}") from exc
        try:
            _write_all(fd, _SEGMENT_HEADER.pack(_SEGMENT_MAGIC, _VERSION, seg_id))
            if self._fsync:
                os.fsync(fd)
                self._fsync_dir()
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise SpillError(f"cannot write spill segment {path}: {exc.strerror}") from exc
        self._next_id += 1
        seg = _Segment(seg_id, path, SEGMENT_HEADER_BYTES, 0, SEGMENT_HEADER_BYTES, 0)
        self._segments.append(seg)
        self._active, self._active_fd = seg, fd
        self._disk_bytes += SEGMENT_HEADER_BYTES
        if len(self._segments) == 1:
            self._cursor = SpillPosition(seg_id, SEGMENT_HEADER_BYTES, 0)

    def _flush_active(self) -> None:
        seg, fd = self._active, self._active_fd
        if seg is None or fd is None or not self._wbuf:
            return
        try:
            _write_all(fd, self._wbuf)
            if self._fsync:
                os.fdatasync(fd)
        except OSError as exc:
            # put the file and the counters back to what is known to be on disk
            lost_bytes = seg.size - seg.committed_size
            lost_records = seg.records - seg.committed_records
            with contextlib.suppress(OSError):
                os.ftruncate(fd, seg.committed_size)
            seg.size, seg.records = seg.committed_size, seg.committed_records
            self._disk_bytes -= lost_bytes
            self._pending_bytes -= lost_bytes
            self._pending_records -= lost_records
            self._wbuf.clear()
            raise SpillError(f"cannot write spill segment {seg.path}: {exc.strerror}") from exc
        seg.committed_size, seg.committed_records = seg.size, seg.records
        self._wbuf.clear()

    def _seal_active(self) -> None:
        """Finish the segment being written: later appends go to a new one."""
        self._flush_active()
        fd = self._active_fd
        self._active, self._active_fd = None, None
        if fd is not None:
            try:
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    # ---- reading --------------------------------------------------------------------------

    def peek(
        self,
        max_records: int = DEFAULT_PEEK_MAX_RECORDS,
        max_bytes: int = DEFAULT_PEEK_MAX_BYTES,
    ) -> SpillBatch:
        """Read up to `max_records` / `max_bytes` (framed) from the cursor without moving it.

        Returns at least one record when any is pending, even one larger than `max_bytes`, so
        the reader always makes progress. Calling it again before `ack` returns the same records.
        """
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        chunk = min(max(max_bytes, _MIN_READ_CHUNK), _PEEK_CHUNK)
        with self._lock:
            self._check_open()
            records: list[SpillRecord] = []
            nbytes = 0
            end: SpillPosition | None = None
            pos = self._cursor
            full = damaged = False
            for seg in list(self._segments):
                if len(records) >= max_records or nbytes >= max_bytes:
                    break
                start, index = (pos.offset, pos.index) if seg.id == pos.segment else (SEGMENT_HEADER_BYTES, 0)
                offset = start
                try:
                    fd = os.open(seg.path, os.O_RDONLY)
                except OSError as exc:
                    raise SpillError(f"cannot read spill segment {seg.path}: {exc.strerror}") from exc
                try:
                    for after, payload in _frames(fd, start, seg.size, chunk):
                        size = after - offset
                        if records and (len(records) >= max_records or nbytes + size > max_bytes):
                            full = True
                            break
                        try:
                            record = _decode(payload)
                        except (ValueError, struct.error):
                            break  # a good CRC over bad content: treat it as corruption
                        records.append(record)
                        nbytes += size
                        index += 1
                        offset = after
                except OSError as exc:
                    raise SpillError(f"cannot read spill segment {seg.path}: {exc.strerror}") from exc
                finally:
                    os.close(fd)
                if offset > start:
                    end = SpillPosition(seg.id, offset, index)
                if full:
                    break
                if offset < seg.size:
                    # open() checked every frame, so the file was damaged since: cut it here
                    self._truncate_segment(seg, offset, index)
                    damaged = True
            if damaged and not records:
                self._skip_finished()
            return SpillBatch(tuple(records), nbytes, end)

    def ack(self, batch: SpillBatch) -> None:
        """Mark a delivered batch done: move the cursor past it and delete finished segments.

        Acking a batch the cursor is already past (acked before, or dropped meanwhile) is a no-op.
        """
        end = batch.end
        with self._lock:
            self._check_open()
            if end is None or end <= self._cursor:
                return
            target = next((s for s in self._segments if s.id == end.segment), None)
            if target is None or end.offset > target.size or end.index > target.records:
                raise ValueError("batch does not belong to this spill buffer")
            cur = self._cursor
            while self._segments[0].id != end.segment:
                seg = self._segments[0]
                self._pending_records -= seg.records - cur.index
                self._pending_bytes -= seg.size - cur.offset
                self._remove_oldest()
                cur = SpillPosition(self._segments[0].id, SEGMENT_HEADER_BYTES, 0)
            self._pending_records -= end.index - cur.index
            self._pending_bytes -= end.offset - cur.offset
            self._cursor = end
            self._skip_finished()
            self._write_cursor()

    # ---- state ----------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def pending_records(self) -> int:
        """Records appended and not yet acked (exact)."""
        with self._lock:
            return self._pending_records

    @property
    def pending_bytes(self) -> int:
        """Framed bytes on disk of the records not yet acked (exact)."""
        with self._lock:
            return self._pending_bytes

    @property
    def disk_bytes(self) -> int:
        """Total size of the segment files, headers and acked-but-kept frames included."""
        with self._lock:
            return self._disk_bytes

    @property
    def empty(self) -> bool:
        with self._lock:
            return self._pending_records == 0

    @property
    def dropped_records(self) -> int:
        """Unread records deleted to make room, since this object was created."""
        with self._lock:
            return self._dropped_records

    @property
    def dropped_bytes(self) -> int:
        with self._lock:
            return self._dropped_bytes

    @property
    def corrupt_truncations(self) -> int:
        """Torn or corrupt segment tails found (and cut off) since this object was created."""
        with self._lock:
            return self._corrupt_truncations

    @property
    def corrupt_bytes(self) -> int:
        with self._lock:
            return self._corrupt_bytes

    def stats(self) -> SpillStats:
        with self._lock:
            return SpillStats(
                pending_records=self._pending_records,
                pending_bytes=self._pending_bytes,
                disk_bytes=self._disk_bytes,
                segments=len(self._segments),
                dropped_records=self._dropped_records,
                dropped_bytes=self._dropped_bytes,
                corrupt_truncations=self._corrupt_truncations,
                corrupt_bytes=self._corrupt_bytes,
            )

    # ---- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            raise SpillClosedError(f"spill buffer {self._dir} is not open")

    def _acquire_dir_lock(self) -> None:
        fd = os.open(self._dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpillLockedError(f"spill directory {self._dir} is in use by another buffer") from exc
            raise
        self._lock_fd = fd

    def _release_files(self) -> None:
        self._wbuf.clear()
        if self._active_fd is not None:
            os.close(self._active_fd)
        self._active, self._active_fd = None, None
        self._segments.clear()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _sync_locked(self) -> None:
        try:
            self._flush_active()
            if self._active_fd is not None:
                os.fsync(self._active_fd)
            self._fsync_dir()
        except OSError as exc:
            raise SpillError(f"cannot sync spill directory {self._dir}: {exc.strerror}") from exc

    def _fsync_dir(self) -> None:
        fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _remove_oldest(self) -> None:
        seg = self._segments.popleft()
        if seg is self._active:
            self._wbuf.clear()
            fd = self._active_fd
            self._active, self._active_fd = None, None
            if fd is not None:
                os.close(fd)
        self._disk_bytes -= seg.size
        try:
            seg.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SpillError(f"cannot delete spill segment {seg.path}: {exc.strerror}") from exc

    def _reset_cursor_to_oldest(self) -> None:
        seg_id = self._segments[0].id if self._segments else self._next_id
        self._cursor = SpillPosition(seg_id, SEGMENT_HEADER_BYTES, 0)

    def _skip_finished(self) -> None:
        """Delete segments the cursor has read to the end (the active one too: empty buffer)."""
        while self._segments and self._cursor.offset >= self._segments[0].size:
            self._remove_oldest()
            self._reset_cursor_to_oldest()

    def _truncate_segment(self, seg: _Segment, offset: int, index: int) -> None:
        lost_bytes, lost_records = seg.size - offset, seg.records - index
        log.error(
            "spill segment %s is corrupt at byte %d: cut %d bytes (%d records)",
            seg.path,
            offset,
            lost_bytes,
            lost_records,
        )
        if seg is self._active:
            self._flush_active()
        try:
            os.truncate(seg.path, offset)
        except OSError as exc:
            raise SpillError(f"cannot truncate spill segment {seg.path}: {exc.strerror}") from exc
        seg.size = seg.committed_size = offset
        seg.records = seg.committed_records = index
        self._disk_bytes -= lost_bytes
        self._corrupt_truncations += 1
        self._corrupt_bytes += lost_bytes
        # what was cut was after the cursor (peek reads from it), so it was pending
        self._pending_bytes -= lost_bytes
        self._pending_records -= lost_records

    def _read_cursor(self) -> tuple[int, int] | None:
        path = self._dir / _CURSOR_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        size = _CURSOR_BODY.size + _CURSOR_CRC.size
        if len(raw) == size:
            magic, version, seg_id, offset = _CURSOR_BODY.unpack_from(raw)
            (crc,) = _CURSOR_CRC.unpack_from(raw, _CURSOR_BODY.size)
            if magic == _CURSOR_MAGIC and version == _VERSION and crc == zlib.crc32(raw[: _CURSOR_BODY.size]):
                return seg_id, offset
        log.warning("spill cursor %s is unreadable: re-reading from the oldest segment", path)
        return None

    def _write_cursor(self) -> None:
        body = _CURSOR_BODY.pack(_CURSOR_MAGIC, _VERSION, self._cursor.segment, self._cursor.offset)
        data = body + _CURSOR_CRC.pack(zlib.crc32(body))
        tmp = self._dir / _CURSOR_TMP_NAME
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, data)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._dir / _CURSOR_NAME)
            if self._fsync:
                self._fsync_dir()
        except OSError as exc:
            raise SpillError(f"cannot write spill cursor in {self._dir}: {exc.strerror}") from exc

    def _recover(self) -> None:
        """Rebuild the in-memory state from the directory (called by open() under the lock)."""
        with contextlib.suppress(FileNotFoundError):
            (self._dir / _CURSOR_TMP_NAME).unlink()
        found: list[tuple[int, Path]] = []
        for path in self._dir.iterdir():
            stem = path.name.removesuffix(_SEGMENT_SUFFIX)
            if path.name.endswith(_SEGMENT_SUFFIX) and len(stem) == 20 and stem.isdigit():
                found.append((int(stem), path))
        found.sort()
        cursor = self._read_cursor()
        cur_seg, cur_off = cursor if cursor is not None else (found[0][0] if found else 0, 0)
        self._next_id = max([cur_seg] + [seg_id + 1 for seg_id, _ in found])
        self._segments.clear()
        self._disk_bytes = self._pending_bytes = self._pending_records = 0
        cursor_pos: SpillPosition | None = None
        for seg_id, path in found:
            if seg_id < cur_seg:
                path.unlink()  # fully acked; the crash came between the cursor write and the unlink
                continue
            offset = cur_off if seg_id == cur_seg else SEGMENT_HEADER_BYTES
            seg, pos = self._scan_segment(seg_id, path, offset)
            if seg is None:
                continue
            if cursor_pos is None:
                cursor_pos = pos if seg_id == cur_seg else SpillPosition(seg_id, SEGMENT_HEADER_BYTES, 0)
            self._segments.append(seg)
            self._disk_bytes += seg.size
            self._pending_records += seg.records - (cursor_pos.index if seg_id == cursor_pos.segment else 0)
            self._pending_bytes += seg.size - (
                cursor_pos.offset if seg_id == cursor_pos.segment else SEGMENT_HEADER_BYTES
            )
        self._cursor = cursor_pos or SpillPosition(self._next_id, SEGMENT_HEADER_BYTES, 0)
        # every recovered segment stays sealed; appends start a new one
        self._skip_finished()
        self._write_cursor()

    def _scan_segment(
        self, seg_id: int, path: Path, cursor_offset: int
    ) -> tuple[_Segment | None, SpillPosition]:
        """Check a segment's frames, cut a bad tail; return it (None if unusable) and the cursor in it."""
        start = SpillPosition(seg_id, SEGMENT_HEADER_BYTES, 0)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise SpillError(f"cannot open spill segment {path}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            header = os.pread(fd, SEGMENT_HEADER_BYTES, 0)
            if len(header) < SEGMENT_HEADER_BYTES or _SEGMENT_HEADER.unpack(header) != (
                _SEGMENT_MAGIC,
                _VERSION,
                seg_id,
            ):
                log.error("spill segment %s has a bad header: deleted (%d bytes)", path, size)
                self._corrupt_truncations += 1
                self._corrupt_bytes += size
                path.unlink()
                return None, start
            end, records, pos = SEGMENT_HEADER_BYTES, 0, start
            for after, _payload in _frames(fd, SEGMENT_HEADER_BYTES, size, _SCAN_CHUNK):
                end, records = after, records + 1
                if after <= cursor_offset:
                    pos = SpillPosition(seg_id, after, records)
            if end < size:
                log.error(
                    "spill segment %s has a torn or corrupt tail at byte %d: cut %d bytes",
                    path,
                    end,
                    size - end,
                )
                self._corrupt_truncations += 1
                self._corrupt_bytes += size - end
                os.ftruncate(fd, end)
            if cursor_offset not in (pos.offset, 0):
                log.warning(
                    "spill cursor %d in %s is not on a record boundary: using %d",
                    cursor_offset,
                    path,
                    pos.offset,
                )
        except OSError as exc:
            raise SpillError(f"cannot recover spill segment {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if records == 0:
            path.unlink()
            return None, start
        return _Segment(seg_id, path, end, records, end, records), pos
