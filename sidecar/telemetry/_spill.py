"""A bounded, ordered, on-disk FIFO of Kafka records: where telemetry waits while Kafka is away.

The produce path appends here when the broker is unreachable (and at shutdown, for whatever is
still pending); a drain task reads in order with `peek`, delivers, then `ack`s. All calls are
synchronous file I/O, each bounded in time and memory, so the async layer runs them with
`asyncio.to_thread`. One lock serialises them, so a writer and a reader may share an instance
from different threads.

Here the buffer's bookkeeping (the segments in use, the cursor, the counters, the bound);
the files and their bytes are `_spill_files` and `_spill_format`. Everything public is
importable from here.

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

Errors: see `_spill_errors` (`SpillError`, `SpillClosedError`, `SpillLockedError`). Bad input
(a record of the wrong type or too large, bad limits) raises TypeError or ValueError naming the
field.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from sidecar.telemetry import _spill_files as files
from sidecar.telemetry._spill_errors import SpillClosedError, SpillError, SpillLockedError
from sidecar.telemetry._spill_format import (
    FRAME_HEADER_BYTES,
    MIN_PAYLOAD,
    SEGMENT_HEADER_BYTES,
    encode_frame,
)
from sidecar.telemetry._spill_models import Segment, SpillBatch, SpillPosition, SpillRecord, SpillStats

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

_MIN_READ_CHUNK: Final = 16 * 1024
_PEEK_CHUNK: Final = 256 * 1024
_WRITE_CHUNK: Final = 1024 * 1024


class SpillBuffer:
    """A bounded on-disk FIFO of `SpillRecord`s; see the module docstring for format and guarantees."""

    def __init__(
        self,
        directory: Path | str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = False,
    ) -> None:
        min_segment = SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + MIN_PAYLOAD
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
        self._segments: deque[Segment] = deque()
        self._writer: files.SegmentWriter | None = None  # the newest segment, being appended to
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
                self._lock_fd = files.lock_directory(self._dir)
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
        frames = [encode_frame(r) for r in records]
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
        active = self._writer.segment if self._writer is not None else None
        roll = active is None or (active.records > 0 and active.size + size > self._segment_bytes)
        need = size + (SEGMENT_HEADER_BYTES if roll else 0)
        while self._disk_bytes + need > self._max_bytes:
            self._drop_oldest()
            if not roll and self._writer is None:
                roll = True
                need += SEGMENT_HEADER_BYTES
        if roll:
            self._seal_active()
            self._start_segment()
        assert self._writer is not None
        buffered = self._writer.add(frame)
        self._disk_bytes += size
        self._pending_bytes += size
        self._pending_records += 1
        if buffered >= _WRITE_CHUNK:
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
        self._writer = files.SegmentWriter.create(self._dir, self._next_id, fsync=self._fsync)
        seg = self._writer.segment
        self._next_id += 1
        self._segments.append(seg)
        self._disk_bytes += SEGMENT_HEADER_BYTES
        if len(self._segments) == 1:
            self._cursor = SpillPosition(seg.id, SEGMENT_HEADER_BYTES, 0)

    def _flush_active(self) -> None:
        writer = self._writer
        if writer is None:
            return
        seg = writer.segment
        size, records = seg.size, seg.records
        try:
            writer.flush()
        except SpillError:
            # the counters back to what is known to be on disk, like the segment's
            self._disk_bytes -= size - seg.size
            self._pending_bytes -= size - seg.size
            self._pending_records -= records - seg.records
            raise

    def _seal_active(self) -> None:
        """Finish the segment being written: later appends go to a new one."""
        self._flush_active()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.seal()

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
                taken = len(records)
                offset, full = files.read_records(
                    seg.path, start, seg.size, chunk, records, max_records, max_bytes - nbytes
                )
                nbytes += offset - start
                index += len(records) - taken
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

    def _release_files(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.discard()
        self._segments.clear()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            files.unlock_directory(fd)

    def _sync_locked(self) -> None:
        try:
            self._flush_active()
            if self._writer is not None:
                self._writer.fsync()
            files.fsync_dir(self._dir)
        except OSError as exc:
            raise SpillError(f"cannot sync spill directory {self._dir}: {exc.strerror}") from exc

    def _remove_oldest(self) -> None:
        seg = self._segments.popleft()
        if self._writer is not None and seg is self._writer.segment:
            writer, self._writer = self._writer, None
            writer.discard()
        self._disk_bytes -= seg.size
        files.delete_segment(seg)

    def _reset_cursor_to_oldest(self) -> None:
        seg_id = self._segments[0].id if self._segments else self._next_id
        self._cursor = SpillPosition(seg_id, SEGMENT_HEADER_BYTES, 0)

    def _skip_finished(self) -> None:
        """Delete segments the cursor has read to the end (the active one too: empty buffer)."""
        while self._segments and self._cursor.offset >= self._segments[0].size:
            self._remove_oldest()
            self._reset_cursor_to_oldest()

    def _truncate_segment(self, seg: Segment, offset: int, index: int) -> None:
        lost_bytes, lost_records = seg.size - offset, seg.records - index
        log.error(
            "spill segment %s is corrupt at byte %d: cut %d bytes (%d records)",
            seg.path,
            offset,
            lost_bytes,
            lost_records,
        )
        if self._writer is not None and seg is self._writer.segment:
            self._flush_active()
        files.truncate_segment(seg, offset)
        seg.size = seg.committed_size = offset
        seg.records = seg.committed_records = index
        self._disk_bytes -= lost_bytes
        self._corrupt_truncations += 1
        self._corrupt_bytes += lost_bytes
        # what was cut was after the cursor (peek reads from it), so it was pending
        self._pending_bytes -= lost_bytes
        self._pending_records -= lost_records

    def _write_cursor(self) -> None:
        files.write_cursor(self._dir, self._cursor, fsync=self._fsync)

    def _recover(self) -> None:
        """Rebuild the in-memory state from the directory (called by open() under the lock)."""
        state = files.recover(self._dir)
        self._segments = deque(state.segments)
        self._cursor, self._next_id = state.cursor, state.next_id
        self._disk_bytes = state.disk_bytes
        self._pending_records, self._pending_bytes = state.pending_records, state.pending_bytes
        self._corrupt_truncations += state.corrupt_truncations
        self._corrupt_bytes += state.corrupt_bytes
        # every recovered segment stays sealed; appends start a new one
        self._skip_finished()
        self._write_cursor()
