"""The on-disk spill buffer, on real files: order, restart, bounds, corruption, concurrency."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sidecar.telemetry._spill import (
    FRAME_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
    SpillBatch,
    SpillBuffer,
    SpillClosedError,
    SpillLockedError,
    SpillPosition,
    SpillRecord,
)


def rec(i: int, size: int = 20, topic: str = "outrider.events") -> SpillRecord:
    value = f"{i:08d}".encode() + b"x" * max(0, size - 8)
    return SpillRecord(topic, f"agent-{i % 3}".encode(), value, [("event-id", f"e{i:08d}".encode())])


def seq(r: SpillRecord) -> int:
    return int(r.value[:8])


def segment_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.seg"))


def disk_total(d: Path) -> int:
    return sum(p.stat().st_size for p in segment_files(d))


def drain(buf: SpillBuffer, max_records: int = 7) -> list[SpillRecord]:
    out: list[SpillRecord] = []
    while True:
        batch = buf.peek(max_records=max_records)
        if not batch.records:
            return out
        out += batch.records
        buf.ack(batch)


def frame_size(r: SpillRecord) -> int:
    """Framed size, computed independently of the module's encoder."""
    payload = 2 + len(r.topic.encode()) + 4 + len(r.key or b"") + 4 + len(r.value) + 2
    payload += sum(2 + len(n.encode()) + 4 + len(v) for n, v in r.headers)
    return FRAME_HEADER_BYTES + payload


def test_round_trip_preserves_order_keys_and_headers(tmp_path: Path) -> None:
    records = [
        SpillRecord("outrider.events", b"agent-a", b"v1", [("event-id", b"1"), ("type", b"call")]),
        SpillRecord("outrider.spans", None, b"", []),
        SpillRecord("t\u00e9l\u00e9", b"", b"\x00\xff" * 100, (("h\u00e9", b""),)),
        *[rec(i) for i in range(50)],
    ]
    with SpillBuffer(tmp_path) as buf:
        written = buf.append(records)
        assert written == sum(frame_size(r) for r in records)
        assert buf.pending_records == len(records)
        assert buf.pending_bytes == written
        got = drain(buf)
        assert got == records
        assert got[0].headers == (("event-id", b"1"), ("type", b"call"))
        assert got[1].key is None and got[2].key == b""
        assert buf.empty and buf.pending_bytes == 0 and buf.pending_records == 0
        # an empty buffer keeps no segment files
        assert segment_files(tmp_path) == [] and buf.disk_bytes == 0


def test_peek_is_bounded_and_repeatable_until_ack(tmp_path: Path) -> None:
    with SpillBuffer(tmp_path) as buf:
        buf.append([rec(i, size=100) for i in range(20)])
        one = frame_size(rec(0, size=100))
        b1 = buf.peek(max_records=5)
        assert [seq(r) for r in b1.records] == [0, 1, 2, 3, 4]
        assert len(b1) == 5 and b1.nbytes == 5 * one
        assert buf.peek(max_records=5) == b1  # peek does not move the cursor
        b2 = buf.peek(max_records=100, max_bytes=3 * one + 1)
        assert [seq(r) for r in b2.records] == [0, 1, 2]
        # a record bigger than max_bytes still comes out alone, so the reader always progresses
        b3 = buf.peek(max_records=100, max_bytes=1)
        assert [seq(r) for r in b3.records] == [0]
        buf.ack(b1)
        assert buf.pending_records == 15
        assert buf.pending_bytes == sum(frame_size(rec(i, size=100)) for i in range(5, 20))
        assert seq(buf.peek(max_records=1).records[0]) == 5
        buf.ack(b2)  # already behind the cursor: no-op
        assert buf.pending_records == 15
        with pytest.raises(ValueError, match="max_records"):
            buf.peek(max_records=0)


@pytest.mark.parametrize("fsync", [False, True])
def test_restart_resumes_from_cursor_without_redelivering(tmp_path: Path, fsync: bool) -> None:
    buf = SpillBuffer(tmp_path, max_bytes=64 * 1024, segment_bytes=1024, fsync=fsync)
    with buf:
        buf.append([rec(i) for i in range(100)])
        batch = buf.peek(max_records=37)
        buf.ack(batch)
    assert not buf.is_open
    with SpillBuffer(tmp_path, max_bytes=64 * 1024, segment_bytes=1024) as again:
        assert again.pending_records == 63
        assert again.pending_bytes == sum(frame_size(rec(i)) for i in range(37, 100))
        again.append([rec(i) for i in range(100, 110)])
        assert [seq(r) for r in drain(again)] == list(range(37, 110))
    with SpillBuffer(tmp_path) as third:
        assert third.empty and third.peek().records == ()


def test_unacked_records_are_redelivered_after_reopen(tmp_path: Path) -> None:
    with SpillBuffer(tmp_path) as buf:
        buf.append([rec(i) for i in range(10)])
        buf.ack(buf.peek(max_records=3))
        delivered_not_acked = buf.peek(max_records=4)
        assert [seq(r) for r in delivered_not_acked.records] == [3, 4, 5, 6]
    # the same object reopens too
    buf.open()
    try:
        assert [seq(r) for r in drain(buf)] == list(range(3, 10))
    finally:
        buf.close()


def test_full_buffer_drops_oldest_segments_and_counts(tmp_path: Path) -> None:
    one = frame_size(rec(0, size=100))
    seg_bytes = SEGMENT_HEADER_BYTES + 4 * one  # four records per segment
    max_bytes = 3 * seg_bytes
    with SpillBuffer(tmp_path, max_bytes=max_bytes, segment_bytes=seg_bytes) as buf:
        buf.append([rec(i, size=100) for i in range(12)])  # exactly full: 3 segments
        assert buf.dropped_records == 0 and buf.disk_bytes == max_bytes
        buf.ack(buf.peek(max_records=1))  # one of the oldest segment delivered
        buf.append([rec(12, size=100)])  # needs a new segment: the oldest goes
        assert buf.dropped_records == 3 and buf.dropped_bytes == 3 * one
        assert buf.disk_bytes <= max_bytes and buf.disk_bytes == disk_total(tmp_path)
        # one oversized call drops its own earliest records, never the newest
        buf.append([rec(i, size=100) for i in range(100, 130)])
        assert buf.disk_bytes <= max_bytes and buf.disk_bytes == disk_total(tmp_path)
        got = [seq(r) for r in drain(buf, max_records=100)]
        assert got[-1] == 129 and got == sorted(got)
        assert got == list(range(130 - len(got), 130))
        assert buf.dropped_records == 43 - 1 - len(got)  # all appended, less acked and delivered
        stats = buf.stats()
        assert stats.dropped_records == buf.dropped_records and stats.pending_records == 0


def test_record_too_large_or_malformed_is_refused_and_nothing_written(tmp_path: Path) -> None:
    with SpillBuffer(tmp_path, max_bytes=4096, segment_bytes=1024) as buf:
        with pytest.raises(ValueError, match=r"records\[1\]"):
            buf.append([rec(0), rec(1, size=5000)])
        assert buf.empty and segment_files(tmp_path) == []
        # bigger than a segment but within max_bytes: stored alone in its own segment
        buf.append([rec(2, size=2000)])
        assert [seq(r) for r in drain(buf)] == [2]
    with pytest.raises(TypeError, match="value"):
        SpillRecord("t", None, "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="headers"):
        SpillRecord("t", None, b"", [("h", "text")])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="topic"):
        SpillRecord("", None, b"")
    with pytest.raises(ValueError, match="max_bytes"):
        SpillBuffer(tmp_path, max_bytes=100, segment_bytes=1024)
    with pytest.raises(ValueError, match="segment_bytes"):
        SpillBuffer(tmp_path, segment_bytes=10)


def test_lifecycle_is_idempotent_and_guarded(tmp_path: Path) -> None:
    buf = SpillBuffer(tmp_path)
    with pytest.raises(SpillClosedError):
        buf.append([rec(0)])
    buf.open()
    buf.open()
    with pytest.raises(SpillLockedError):
        SpillBuffer(tmp_path).open()
    buf.append([rec(0)])
    buf.sync()
    buf.close()
    buf.close()
    with pytest.raises(SpillClosedError):
        buf.peek()
    with SpillBuffer(tmp_path) as other:  # the lock was released
        assert other.pending_records == 1


def test_ack_of_foreign_batch_is_refused(tmp_path: Path) -> None:
    with SpillBuffer(tmp_path) as buf:
        buf.append([rec(0)])
        bogus = SpillBatch((rec(0),), 10, SpillPosition(9999, 100, 1))
        with pytest.raises(ValueError, match="does not belong"):
            buf.ack(bogus)
        assert buf.pending_records == 1


def test_torn_tail_is_truncated_and_counted_on_open(tmp_path: Path) -> None:
    with SpillBuffer(tmp_path) as buf:
        buf.append([rec(i) for i in range(5)])
    (seg,) = segment_files(tmp_path)
    good = seg.stat().st_size
    # a crash in the middle of a write: the frame header promises more than was written
    whole = seg.read_bytes()[SEGMENT_HEADER_BYTES : SEGMENT_HEADER_BYTES + frame_size(rec(0))]
    with seg.open("ab") as f:
        f.write(whole[: len(whole) // 2])
    with SpillBuffer(tmp_path) as buf:
        assert buf.corrupt_truncations == 1
        assert buf.corrupt_bytes == len(whole) // 2
        assert seg.stat().st_size == good
        assert [seq(r) for r in drain(buf)] == [0, 1, 2, 3, 4]


def test_corrupt_frame_in_sealed_segment_cuts_that_segment_only(tmp_path: Path) -> None:
    one = frame_size(rec(0))
    seg_bytes = SEGMENT_HEADER_BYTES + 4 * one
    with SpillBuffer(tmp_path, max_bytes=100 * seg_bytes, segment_bytes=seg_bytes) as buf:
        buf.append([rec(i) for i in range(12)])
    _first, second, third = segment_files(tmp_path)
    data = bytearray(second.read_bytes())
    data[SEGMENT_HEADER_BYTES + one + FRAME_HEADER_BYTES + 20] ^= 0xFF  # flip a byte in record 5
    second.write_bytes(bytes(data))
    third.write_bytes(b"garbage, not a segment")
    with SpillBuffer(tmp_path, max_bytes=100 * seg_bytes, segment_bytes=seg_bytes) as buf:
        assert buf.corrupt_truncations == 2
        assert buf.corrupt_bytes == 3 * one + len(b"garbage, not a segment")
        assert buf.pending_records == 5
        assert [seq(r) for r in drain(buf)] == [0, 1, 2, 3, 4]


def test_damage_after_open_is_cut_by_peek_without_crashing(tmp_path: Path) -> None:
    with SpillBuffer(tmp_path) as buf:
        buf.append([rec(i) for i in range(6)])
        (seg,) = segment_files(tmp_path)
        with seg.open("r+b") as f:
            f.seek(SEGMENT_HEADER_BYTES + 3 * frame_size(rec(0)) + FRAME_HEADER_BYTES + 5)
            f.write(b"\x00\x01\x02")
        assert [seq(r) for r in drain(buf)] == [0, 1, 2]
        assert buf.corrupt_truncations == 1 and buf.pending_records == 0
        buf.append([rec(6)])  # and it keeps working
        assert [seq(r) for r in drain(buf)] == [6]


def test_bad_cursor_falls_back_to_redelivery(tmp_path: Path) -> None:
    with SpillBuffer(tmp_path) as buf:
        buf.append([rec(i) for i in range(4)])
        buf.ack(buf.peek(max_records=2))
    (tmp_path / "cursor").write_bytes(b"\x00" * 5)
    with SpillBuffer(tmp_path) as buf:
        assert [seq(r) for r in drain(buf)] == [0, 1, 2, 3]  # at least once, never lost


def test_cursor_not_on_a_boundary_rewinds_to_the_previous_record(tmp_path: Path) -> None:
    with SpillBuffer(tmp_path) as buf:
        buf.append([rec(i) for i in range(4)])
        buf.ack(buf.peek(max_records=2))
    import struct
    import zlib

    raw = (tmp_path / "cursor").read_bytes()
    magic, version, seg_id, offset = struct.unpack_from(">4sB3xQQ", raw)
    body = struct.pack(">4sB3xQQ", magic, version, seg_id, offset + 3)
    (tmp_path / "cursor").write_bytes(body + struct.pack(">I", zlib.crc32(body)))
    with SpillBuffer(tmp_path) as buf:
        assert [seq(r) for r in drain(buf)] == [2, 3]


def test_segments_roll_and_are_deleted_after_ack(tmp_path: Path) -> None:
    one = frame_size(rec(0))
    seg_bytes = SEGMENT_HEADER_BYTES + 10 * one
    with SpillBuffer(tmp_path, max_bytes=1000 * seg_bytes, segment_bytes=seg_bytes) as buf:
        buf.append([rec(i) for i in range(95)])
        assert len(segment_files(tmp_path)) == 10
        assert buf.disk_bytes == disk_total(tmp_path) == 10 * SEGMENT_HEADER_BYTES + 95 * one
        buf.ack(buf.peek(max_records=25))
        assert len(segment_files(tmp_path)) == 8  # two whole segments acked and deleted
        assert buf.disk_bytes == disk_total(tmp_path)
        assert buf.pending_bytes == 70 * one
        # a segment left behind by a crash between cursor write and unlink is not re-sent
        leftover = segment_files(tmp_path)[0]
        saved = leftover.read_bytes()
        buf.ack(buf.peek(max_records=10))
        assert not leftover.exists()
    leftover.write_bytes(saved)
    with SpillBuffer(tmp_path, max_bytes=1000 * seg_bytes, segment_bytes=seg_bytes) as buf:
        assert not leftover.exists()
        assert [seq(r) for r in drain(buf, max_records=33)] == list(range(35, 95))
    assert segment_files(tmp_path) == []


def test_writer_and_reader_threads_share_the_buffer(tmp_path: Path) -> None:
    total = 3000
    got: list[int] = []
    with SpillBuffer(tmp_path, segment_bytes=4096) as buf:

        def writer() -> None:
            for start in range(0, total, 10):
                buf.append([rec(i) for i in range(start, start + 10)])

        t = threading.Thread(target=writer)
        t.start()
        while len(got) < total:
            batch = buf.peek(max_records=64)
            got += [seq(r) for r in batch.records]
            buf.ack(batch)
        t.join()
        assert buf.empty
    assert got == list(range(total))


_CHILD = """
import sys
from sidecar.telemetry._spill import SpillBuffer, SpillRecord
buf = SpillBuffer(sys.argv[1], segment_bytes=64 * 1024)
buf.open()
i = 0
while True:
    buf.append([SpillRecord("t", None, f"{n:08d}".encode() + b"y" * 300) for n in range(i, i + 50)])
    i += 50
    if i == 500:
        print("ready", flush=True)
"""


def test_sigkilled_writer_leaves_an_ordered_readable_prefix(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, cwd=Path.cwd()
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    with SpillBuffer(tmp_path, segment_bytes=64 * 1024) as buf:
        got = [seq(r) for r in drain(buf, max_records=500)]
    assert len(got) >= 500 and got == list(range(len(got)))


# ---- a stateful model check -------------------------------------------------------------------

ONE = frame_size(rec(0, size=30))
SEGMENT = SEGMENT_HEADER_BYTES + 3 * ONE


class SpillMachine(RuleBasedStateMachine):
    """Compare the buffer with a list: every record not dropped is acked once, in order.

    Drops are oldest-first, so each increase of `dropped_records` removes that many records from
    the front of the model's pending list; every peek must then return the model's front.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spill-"))
        self.max_bytes = SEGMENT * 4
        self.buf = SpillBuffer(self.dir, max_bytes=self.max_bytes, segment_bytes=SEGMENT)
        self.buf.open()
        self.next_seq = 0
        self.pending: deque[int] = deque()
        self.delivered: list[int] = []
        self.dropped: list[int] = []
        self.dropped_seen = 0
        self.batch: SpillBatch | None = None

    def sync_drops(self) -> None:
        new = self.buf.dropped_records - self.dropped_seen
        assert 0 <= new <= len(self.pending)
        for _ in range(new):
            self.dropped.append(self.pending.popleft())
        self.dropped_seen = self.buf.dropped_records

    @rule(n=st.integers(1, 12), size=st.sampled_from([30, 30, 30, 200]))
    def append(self, n: int, size: int) -> None:
        records = [rec(self.next_seq + i, size=size) for i in range(n)]
        self.buf.append(records)
        self.pending.extend(range(self.next_seq, self.next_seq + n))
        self.next_seq += n
        self.sync_drops()

    @rule(max_records=st.integers(1, 10), max_bytes=st.sampled_from([1, ONE * 2, 1 << 20]))
    def peek(self, max_records: int, max_bytes: int) -> None:
        batch = self.buf.peek(max_records=max_records, max_bytes=max_bytes)
        got = [seq(r) for r in batch.records]
        assert got == list(self.pending)[: len(got)]
        assert len(got) <= max_records
        if self.pending:
            assert got
        self.batch = batch

    @precondition(lambda self: self.batch is not None)
    @rule()
    def ack(self) -> None:
        assert self.batch is not None
        last = seq(self.batch.records[-1]) if self.batch.records else -1
        self.buf.ack(self.batch)
        while self.pending and self.pending[0] <= last:
            self.delivered.append(self.pending.popleft())
        self.batch = None

    @rule()
    def reopen(self) -> None:
        self.buf.close()
        self.buf.open()
        self.batch = None  # un-acked: will be re-delivered

    @invariant()
    def counts_match(self) -> None:
        assert self.buf.pending_records == len(self.pending)
        assert self.buf.disk_bytes <= self.max_bytes
        assert self.buf.disk_bytes == disk_total(self.dir)
        assert self.buf.empty == (not self.pending)

    def teardown(self) -> None:
        try:
            if self.buf.is_open:
                got = [seq(r) for r in drain(self.buf)]
                assert got == list(self.pending)
                self.delivered += got
                every = sorted(self.delivered + self.dropped)
                assert every == list(range(self.next_seq))  # each exactly once: delivered or dropped
                assert self.delivered == sorted(self.delivered)
                assert self.buf.dropped_records == len(self.dropped)
        finally:
            self.buf.close()
            shutil.rmtree(self.dir, ignore_errors=True)


SpillMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSpillMachine = SpillMachine.TestCase


def test_module_exports() -> None:
    import sidecar.telemetry._spill as mod

    assert set(mod.__all__) >= {"SpillBuffer", "SpillRecord", "SpillBatch", "SpillStats", "SpillError"}
    assert all(hasattr(mod, name) for name in mod.__all__)
