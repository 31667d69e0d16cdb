"""`scripts/bench shadow` in small: the bench's three measurements run end to end on a real
sidecar put into its shadow phase by signed control records (`tests.bench.shadow`), and the
counters it reports say that mirroring was on, and off, when it was meant to be."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.shadow import run

pytestmark = pytest.mark.broker


async def test_bench_shadow_measures_each_setting(tmp_path: Path) -> None:
    result = await run(calls=40, block=20, gap_ms=5.0, seconds=0.5, concurrency=4, workdir=tmp_path)
    latency, saturation, capacity = result["latency"], result["saturation"], result["capacity"]

    # c=1: every "on" call was mirrored (nothing is dropped one call at a time), no "off" call was
    assert latency["off"]["calls"] == latency["on"]["calls"] == 40
    assert latency["off"]["shadow"] == {}
    assert latency["on"]["shadow"] == {"calls.ok": 40.0}
    assert latency["ratio_median"] > 0

    # saturation: "off" mirrors nothing; "on" mirrors or drops (and counts) at most one per call
    assert saturation["off"]["shadow"] == {} and saturation["off"]["calls_per_s"] > 0
    on = saturation["on"]
    mirrored = on["shadow"].get("calls.ok", 0.0)
    assert mirrored > 0
    assert mirrored + on["shadow"].get("dropped.queue_full", 0.0) <= on["calls"]
    assert "calls.error" not in on["shadow"]

    # a slow candidate: mirrors beyond what the workers do are dropped and counted, never queued long
    slow = result["saturation_slow_candidate"]["on"]
    assert (
        slow["shadow"].get("calls.ok", 0.0) + slow["shadow"].get("dropped.queue_full", 0.0) <= slow["calls"]
    )
    assert result["saturation_slow_candidate"]["queue_depth_max"] <= 64

    # capacity: the wide queue drops nothing, and everything offered was mirrored once drained
    assert capacity["mirrored_ok_per_s"] > 0 and capacity["drained"]
    assert capacity["shadow_with_drain"] == {"calls.ok": float(capacity["user"]["calls"])}
