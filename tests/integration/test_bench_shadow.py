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

    # c=1: "on" calls were mirrored, no "off" call was
    assert latency["off"]["calls"] == latency["on"]["calls"] == 40
    assert latency["off"]["shadow"] == {}
    # (a call's mirror may be shed if the loop is busy: python gRPC costs a few ms of CPU a call)
    on_c1 = latency["on"]["shadow"]
    mirrored_c1 = on_c1.get("calls.ok", 0.0)
    assert mirrored_c1 > 0 and mirrored_c1 + on_c1.get("dropped.overload", 0.0) == 40, on_c1
    assert set(on_c1) <= {"calls.ok", "dropped.overload"}, on_c1
    assert latency["ratio_median"] > 0

    # saturation: "off" mirrors nothing; "on" mirrors each call or drops it, counted: for a full
    # queue, or for a busy loop (the users come first)
    assert saturation["off"]["shadow"] == {} and saturation["off"]["calls_per_s"] > 0
    on = saturation["on"]["shadow"]
    dropped = {k: v for k, v in on.items() if k.startswith("dropped.")}
    assert set(dropped) <= {"dropped.queue_full", "dropped.overload"}, on
    assert 0 < on.get("calls.ok", 0.0) + sum(dropped.values()) <= saturation["on"]["calls"], on
    assert "calls.error" not in on

    # a slow candidate: mirrors beyond what the workers do are dropped and counted, never queued long
    slow = result["saturation_slow_candidate"]["on"]
    assert sum(slow["shadow"].values()) <= slow["calls"], slow
    assert result["saturation_slow_candidate"]["queue_depth_max"] <= 64

    # capacity: the wide queue drops nothing, and everything offered was mirrored once drained
    assert capacity["mirrored_ok_per_s"] > 0 and capacity["drained"]
    assert capacity["shadow_with_drain"] == {"calls.ok": float(capacity["user"]["calls"])}
