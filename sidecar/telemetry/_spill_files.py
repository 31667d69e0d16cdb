"""The files in a spill directory: the lock, the cursor and the segments, opened, checked, read
and replaced (see `_spill_format` for their bytes). Synchronous, called by `SpillBuffer` under its
lock; every OS error comes out as a `SpillError` naming the file, except where a caller maps it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sidecar.telemetry._spill_errors import SpillError, SpillLockedError
from sidecar.telemetry._spill_format import (
    CURSOR_NAME,
    CURSOR_TMP_NAME,
    LOCK_NAME,
    SEGMENT_HEADER_BYTES,
    decode_cursor,
    decode_payload,
    encode_cursor,
    iter_frames,
    segment_header,
    segment_header_ok,
    segment_id,
    segment_name,
    write_all,
)
from sidecar.telemetry._spill_models import Segment, SpillPosition, SpillRecord

log = logging.getLogger("sidecar.telemetry._spill")  # the spill logs as one, as before the split

_SCAN_CHUNK: Final = 1024 * 1024


@dataclass(slots=True)
class Recovered:
    """A directory's state as `recover` found it."""

    segments: list[Segment]
    cursor: SpillPosition
    next_id: int
    disk_bytes: int = 0
    pending_records: int = 0
    pending_bytes: int = 0
    corrupt_truncations: int = 0
    corrupt_bytes: int = 0


# ---- the lock -------------------------------------------------------------------------------


def lock_directory(directory: Path) -> int:
    """flock the directory's lock file; return its descriptor. Raises SpillLockedError when
    another buffer holds it, OSError otherwise."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise SpillLockedError(f"spill directory {directory} is in use by another buffer") from exc
        raise
    return fd


def unlock_directory(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the cursor -----------------------------------------------------------------------------


def read_cursor(directory: Path) -> tuple[int, int] | None:
    path = directory / CURSOR_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    cursor = decode_cursor(raw)
    if cursor is None:
        log.warning("spill cursor %s is unreadable: re-reading from the oldest segment", path)
    return cursor


def write_cursor(directory: Path, cursor: SpillPosition, *, fsync: bool) -> None:
    """Replace the cursor file atomically (write a temporary file, rename it)."""
    data = encode_cursor(cursor.segment, cursor.offset)
    tmp = directory / CURSOR_TMP_NAME
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / CURSOR_NAME)
        if fsync:
            fsync_dir(directory)
    except OSError as exc:
        raise SpillError(f"cannot write spill cursor in {directory}: {exc.strerror}") from exc


# ---- segments -------------------------------------------------------------------------------


class SegmentWriter:
    """The segment being appended to: its open file and the frames not yet written to it."""

    def __init__(self, segment: Segment, fd: int, *, fsync: bool) -> None:
        self.segment = segment
        self._fd = fd
        self._fsync = fsync
        self._wbuf = bytearray()

    @classmethod
    def create(cls, directory: Path, seg_id: int, *, fsync: bool) -> SegmentWriter:
        """A new, empty segment file, its header written."""
        path = directory / segment_name(seg_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError as exc:
            raise SpillError(f"cannot create spill segment {path}: {exc.strerror}") from exc
        try:
            write_all(fd, segment_header(seg_id))
            if fsync:
                os.fsync(fd)
                fsync_dir(directory)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise SpillError(f"cannot write spill segment {path}: {exc.strerror}") from exc
        segment = Segment(seg_id, path, SEGMENT_HEADER_BYTES, 0, SEGMENT_HEADER_BYTES, 0)
        return cls(segment, fd, fsync=fsync)

    def add(self, frame: bytes) -> int:
        """Buffer a frame (counted in the segment's size); return the bytes now buffered."""
        self._wbuf += frame
        self.segment.size += len(frame)
        self.segment.records += 1
        return len(self._wbuf)

    def flush(self) -> None:
        """Write what is buffered. On an OS error the file and the segment's figures are put
        back to what is known to be on disk, and SpillError is raised."""
        seg = self.segment
        if not self._wbuf:
            return
        try:
            write_all(self._fd, self._wbuf)
            if self._fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, seg.committed_size)
            seg.size, seg.records = seg.committed_size, seg.committed_records
            self._wbuf.clear()
            raise SpillError(f"cannot write spill segment {seg.path}: {exc.strerror}") from exc
        seg.committed_size, seg.committed_records = seg.size, seg.records
        self._wbuf.clear()

    def fsync(self) -> None:
        os.fsync(self._fd)

    def seal(self) -> None:
        """Close the file (fsynced first with `fsync`); call `flush` before."""
        try:
            if self._fsync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def discard(self) -> None:
        """Close the file, dropping what is buffered."""
        self._wbuf.clear()
        os.close(self._fd)


def read_records(
    path: Path,
    start: int,
    end: int,
    chunk: int,
    records: list[SpillRecord],
    max_records: int,
    room_bytes: int,
) -> tuple[int, bool]:
    """Decode the frames of `path` in [start, end) onto `records` until it holds `max_records` or
    the next frame would take the bytes read past `room_bytes` (one record is always taken into
    an empty list). Return the offset after the last record taken and whether a limit stopped
    it; a frame that does not decode stops it too (a good CRC over bad content)."""
    offset = start
    full = False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SpillError(f"cannot read spill segment {path}: {exc.strerror}") from exc
    try:
        for after, payload in iter_frames(fd, start, end, chunk):
            size = after - offset
            if records and (len(records) >= max_records or offset - start + size > room_bytes):
                full = True
                break
            try:
                record = decode_payload(payload)
            except (ValueError, struct.error):
                break  # a good CRC over bad content: treat it as corruption
            records.append(record)
            offset = after
    except OSError as exc:
        raise SpillError(f"cannot read spill segment {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return offset, full


def truncate_segment(seg: Segment, offset: int) -> None:
    try:
        os.truncate(seg.path, offset)
    except OSError as exc:
        raise SpillError(f"cannot truncate spill segment {seg.path}: {exc.strerror}") from exc


def delete_segment(seg: Segment) -> None:
    try:
        seg.path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SpillError(f"cannot delete spill segment {seg.path}: {exc.strerror}") from exc


# ---- recovery -------------------------------------------------------------------------------


def recover(directory: Path) -> Recovered:
    """Read a directory's segments and cursor back (at open): delete fully acked segments, check
    every frame of the rest and cut a torn or corrupt tail, put the cursor on a record boundary."""
    with contextlib.suppress(FileNotFoundError):
        (directory / CURSOR_TMP_NAME).unlink()
    found: list[tuple[int, Path]] = []
    for path in directory.iterdir():
        seg_id = segment_id(path.name)
        if seg_id is not None:
            found.append((seg_id, path))
    found.sort()
    cursor = read_cursor(directory)
    cur_seg, cur_off = cursor if cursor is not None else (found[0][0] if found else 0, 0)
    state = Recovered(
        [], SpillPosition(0, SEGMENT_HEADER_BYTES, 0), max([cur_seg] + [s + 1 for s, _ in found])
    )
    cursor_pos: SpillPosition | None = None
    for seg_id, path in found:
        if seg_id < cur_seg:
            path.unlink()  # fully acked; the crash came between the cursor write and the unlink
            continue
        offset = cur_off if seg_id == cur_seg else SEGMENT_HEADER_BYTES
        seg, pos = _scan_segment(seg_id, path, offset, state)
        if seg is None:
            continue
        if cursor_pos is None:
            cursor_pos = pos if seg_id == cur_seg else SpillPosition(seg_id, SEGMENT_HEADER_BYTES, 0)
        state.segments.append(seg)
        state.disk_bytes += seg.size
        state.pending_records += seg.records - (cursor_pos.index if seg_id == cursor_pos.segment else 0)
        state.pending_bytes += seg.size - (
            cursor_pos.offset if seg_id == cursor_pos.segment else SEGMENT_HEADER_BYTES
        )
    state.cursor = cursor_pos or SpillPosition(state.next_id, SEGMENT_HEADER_BYTES, 0)
    return state


def _scan_segment(
    seg_id: int, path: Path, cursor_offset: int, state: Recovered
) -> tuple[Segment | None, SpillPosition]:
    """Check a segment's frames, cut a bad tail; return it (None if unusable) and the cursor in it."""
    start = SpillPosition(seg_id, SEGMENT_HEADER_BYTES, 0)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise SpillError(f"cannot open spill segment {path}: {exc.strerror}") from exc
    try:
        size = os.fstat(fd).st_size
        if not segment_header_ok(os.pread(fd, SEGMENT_HEADER_BYTES, 0), seg_id):
            log.error("spill segment %s has a bad header: deleted (%d bytes)", path, size)
            state.corrupt_truncations += 1
            state.corrupt_bytes += size
            path.unlink()
            return None, start
        end, records, pos = SEGMENT_HEADER_BYTES, 0, start
        for after, _payload in iter_frames(fd, SEGMENT_HEADER_BYTES, size, _SCAN_CHUNK):
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
            state.corrupt_truncations += 1
            state.corrupt_bytes += size - end
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
    return Segment(seg_id, path, end, records, end, records), pos
