"""Checkpoint files, one per events partition: atomic replace, round trip, other bootstraps
ignored, corrupt files refused, an earlier release's single file read when a partition has none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from collector._checkpoint import Checkpoint, CheckpointError, CheckpointStore, decode, encode


def sample(offset: int = 42) -> Checkpoint:
    return Checkpoint(
        offsets={("outrider.events", 0): offset, ("outrider.events", 3): 7},
        windows={"format": 1, "series": []},
        totals={"format": 1},
        bootstrap="127.0.0.1:9092",
        written_at=1.5,
    )


def test_round_trip_and_replace(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state", "outrider collector/1")
    assert store.load("127.0.0.1:9092", 0) is None
    store.write(0, encode(sample(42)))
    store.write(0, encode(sample(43)))
    store.write(3, encode(sample(9)))
    assert store.path(0) == tmp_path / "state" / "outrider_collector_1" / "events-0.ckpt"
    loaded = store.load("127.0.0.1:9092", 0)
    assert loaded is not None and loaded.offsets == {("outrider.events", 0): 43, ("outrider.events", 3): 7}
    assert loaded.windows == {"format": 1, "series": []} and loaded.written_at == 1.5
    other = store.load("127.0.0.1:9092", 3)
    assert other is not None and other.offsets[("outrider.events", 0)] == 9
    assert store.load("127.0.0.1:9092", 1) is None
    # no temporary files left
    assert sorted(os.listdir(store.directory)) == [store.path(0).name, store.path(3).name]


def test_an_earlier_single_file_checkpoint_is_read_for_partitions_without_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "g")
    store.legacy_path.write_bytes(encode(sample(5)))
    legacy = store.load("127.0.0.1:9092", 3)
    assert legacy is not None and legacy.offsets[("outrider.events", 3)] == 7
    store.write(3, encode(sample(8)))
    newer = store.load("127.0.0.1:9092", 3)
    assert newer is not None and newer.offsets[("outrider.events", 0)] == 8


def test_other_bootstrap_is_ignored_and_corrupt_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "g")
    store.write(0, encode(sample()))
    assert store.load("10.0.0.1:9092", 0) is None
    store.path(0).write_bytes(encode(sample())[:-5])
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        store.load("127.0.0.1:9092", 0)
    with pytest.raises(CheckpointError, match="format"):
        decode(__import__("zlib").compress(b'{"format": 99}'))


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, "g")
    store.write(0, encode(sample(1)))

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.write(0, encode(sample(2)))
    monkeypatch.undo()
    loaded = store.load("127.0.0.1:9092", 0)
    assert loaded is not None and loaded.offsets[("outrider.events", 0)] == 1
    assert sorted(os.listdir(store.directory)) == [store.path(0).name]


def test_what_orjson_cannot_write_as_the_stdlib_does_still_round_trips() -> None:
    """The windows and totals go through orjson, the rest through the stdlib: a NaN in the
    evidence stays a NaN (orjson would write null), a count past 64 bits (which orjson will not
    write) is written and reads back as a float, as the totals hold counts, and a checkpoint the
    stdlib wrote whole (an earlier release, NaN included) still reads."""
    import json
    import math
    import zlib

    checkpoint = sample()
    counters = {"outrider_requests_total": [[["a", "v", "stable"], 2**70 + 1]]}
    checkpoint.totals = {"format": 1, "counters": counters}
    checkpoint.extra = {"evidence": {"score": math.nan, "ids": ["x"]}}
    back = decode(encode(checkpoint))
    assert back.offsets == checkpoint.offsets and back.windows == checkpoint.windows
    assert back.totals["counters"]["outrider_requests_total"][0][1] == pytest.approx(2**70 + 1)
    assert math.isnan(back.extra["evidence"]["score"]) and back.extra["evidence"]["ids"] == ["x"]
    earlier = {
        "format": 1,
        "bootstrap": "b:1",
        "written_at": 2.0,
        "offsets": [["outrider.events", 0, 5]],
        "windows": {"format": 1},
        "totals": {"format": 1},
        "extra": {"gaps": {"x": math.inf}},
    }
    old = decode(zlib.compress(json.dumps(earlier).encode(), 1))
    assert old.offsets == {("outrider.events", 0): 5} and old.extra["gaps"]["x"] == math.inf
