"""The collector's inlined DDSketch add is `DDSketch.add`, bit for bit: same bins, same counts,
same sum, min and max, for any finite latency, in any order, across bin growth, however the
values are cut into the lists it adds at a time. Both of its loops: the C one
(collector/_fastsketch.c) and the Python one (`OUTRIDER_NATIVE=0`)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import _buckets
from collector._buckets import _dump_sketch, _sketch, sketch_add_many

LOOPS = ["c", "python"]

latencies = st.one_of(
    st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, sys.float_info.min, 5e-324, 1e-300, 1.0, 1.01, 250.0, 1e308]),
)


def _state(sketch: object) -> tuple[object, ...]:
    s = sketch
    store = s._store  # type: ignore[attr-defined]
    return (
        s._count,  # type: ignore[attr-defined]
        s._sum,  # type: ignore[attr-defined]
        s._min,  # type: ignore[attr-defined]
        s._max,  # type: ignore[attr-defined]
        s._zero_count,  # type: ignore[attr-defined]
        list(store.bins),
        store.offset,
        store.min_key,
        store.max_key,
        store.count,
    )


@contextlib.contextmanager
def loop(which: str) -> Iterator[None]:
    """The C loop (it must be built, unless OUTRIDER_NATIVE=0 turned it off) or the Python one."""
    native = _buckets._fastsketch
    if which == "c" and native is None:
        pytest.skip("collector._fastsketch is off (OUTRIDER_NATIVE=0)")
    _buckets._fastsketch = native if which == "c" else None
    try:
        yield
    finally:
        _buckets._fastsketch = native


def test_the_c_loop_is_built() -> None:
    if os.environ.get("OUTRIDER_NATIVE") != "0":
        assert _buckets._fastsketch is not None


@pytest.mark.parametrize("which", LOOPS)
@settings(max_examples=300, deadline=None)
@given(st.lists(latencies, max_size=200), st.lists(st.integers(0, 40), min_size=1, max_size=6).filter(any))
def test_inlined_add_is_the_librarys_add(which: str, values: list[float], cuts: list[int]) -> None:
    with loop(which):
        _inlined_add_is_the_librarys_add(values, cuts)


def _inlined_add_is_the_librarys_add(values: list[float], cuts: list[int]) -> None:
    ours, theirs = _sketch(), _sketch()
    start, k = 0, 0
    while start < len(values):  # in lists of the sizes drawn; 0 adds an empty list
        size = cuts[k % len(cuts)]
        sketch_add_many(ours, values[start : start + size])
        start, k = start + size, k + 1
    for value in values:
        theirs.add(value)
    assert _state(ours) == _state(theirs)
    assert _dump_sketch(ours) == _dump_sketch(theirs)
    for q in (0.0, 0.5, 0.95, 0.99, 1.0):
        assert ours.get_quantile_value(q) == theirs.get_quantile_value(q)


@pytest.mark.parametrize("which", LOOPS)
def test_it_reaches_the_bins_already_there_and_grows_them(which: str) -> None:
    ours, theirs = _sketch(), _sketch()
    values = [100.0, 101.0, 99.5, 1e-3, 1e6, 100.0, 0.0]  # in range, below it, above it, zero
    with loop(which):
        sketch_add_many(ours, values)
    for value in values:
        theirs.add(value)
    assert _state(ours) == _state(theirs)
    assert ours.count == len(values) and ours._zero_count == 1.0  # type: ignore[attr-defined]
    assert math.isclose(ours.get_quantile_value(0.5) or 0.0, 100.0, rel_tol=0.02)
