"""The spill buffer's values: a record, a position in the files, a batch read, the counters, and
the buffer's figures for one segment file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


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


@dataclass(slots=True)
class Segment:
    id: int
    path: Path
    size: int  # bytes in the file, header included (plus any still in the write buffer)
    records: int
    committed_size: int  # bytes known to be in the file
    committed_records: int


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
