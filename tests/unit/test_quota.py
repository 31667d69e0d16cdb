"""Global TPM quotas: the sidecar's GlobalQuota and wait queue, the collector's LeaseAllocator."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector._quota import LeaseAllocator, add_headroom, water_fill
from outrider.clock import ManualClock
from outrider.clock import ManualClock as CollectorClock
from sidecar.resilience._quota import BoundedWaitQueue, GlobalQuota, Verdict

EPS = 1e-6


def quota(clock: ManualClock, **kw: float) -> GlobalQuota:
    args: dict[str, float] = {"safe_share_tpm": 600.0, "grant_ttl_s": 30.0, "burst_s": 60.0}
    args.update(kw)
    return GlobalQuota("openai/gpt-x", clock=clock, **args)


# --- grants and fallback ----------------------------------------------------------------


def test_grant_applies_then_falls_back_to_the_safe_share_after_ttl() -> None:
    clock = ManualClock()
    q = quota(clock)
    assert (q.tpm, q.has_fresh_grant) == (600, False)
    assert q.apply_grant(6000, generation=1)
    assert (q.tpm, q.has_fresh_grant) == (6000, True)
    clock.advance(29.9)
    assert q.tpm == 6000
    clock.advance(0.1)
    assert (q.tpm, q.has_fresh_grant) == (600, False)


def test_stale_or_out_of_order_grants_are_ignored() -> None:
    clock = ManualClock()
    q = quota(clock)
    assert q.apply_grant(1000, generation=5)
    assert not q.apply_grant(9000, generation=4)
    assert q.apply_grant(2000, generation=5)  # a republished grant refreshes
    assert not q.apply_grant(9000, issued_at=clock.now() - 31)  # replayed from history
    assert q.apply_grant(3000, issued_at=clock.now() - 20)
    assert q.tpm == 3000
    clock.advance(10)
    assert q.tpm == 600  # fresh for the 10 s left of its ttl
    with pytest.raises(ValueError, match="tpm"):
        q.apply_grant(-1)


def test_a_bigger_grant_does_not_hand_out_a_burst() -> None:
    clock = ManualClock()
    q = quota(clock, burst_s=6.0)  # capacity 60 tokens at 600 tpm
    assert q.admit(60, priority=True).verdict is Verdict.ADMIT
    q.apply_grant(60_000)
    d = q.admit(100, priority=True)
    assert d.verdict is Verdict.REFUSE
    assert d.retry_after_s == pytest.approx(0.1)  # refills at 1000 tokens/s


# --- the 80 % priority rule -------------------------------------------------------------


def test_non_priority_waits_above_80_percent_priority_passes_while_quota_remains() -> None:
    clock = ManualClock()
    q = quota(clock, safe_share_tpm=1000)  # window 60 s, so the share is 1000 tokens
    assert q.admit(700, priority=False).verdict is Verdict.ADMIT
    assert q.utilisation() == pytest.approx(0.7)
    assert q.admit(100, priority=False).verdict is Verdict.ADMIT  # exactly 80 %: allowed
    d = q.admit(10, priority=False)
    assert d.verdict is Verdict.QUEUE and d.utilisation == pytest.approx(0.8)
    assert d.retry_after_s == pytest.approx(60.0)  # when the oldest usage leaves the window
    assert q.admit(200, priority=True).verdict is Verdict.ADMIT
    refused = q.admit(50, priority=True)
    assert refused.verdict is Verdict.REFUSE
    assert refused.retry_after_s == pytest.approx(3.0)  # 50 tokens at 1000/60 per s
    starved = q.admit(50, priority=False)
    assert starved.verdict is Verdict.QUEUE and starved.retry_after_s == pytest.approx(3.0)


def test_the_80_percent_rule_is_of_the_global_limit_when_the_grant_carries_it() -> None:
    clock = ManualClock()
    q = quota(clock)
    # a lone sidecar far under the global limit: its whole grant is open to non-priority work
    assert q.apply_grant(1000, limit_tpm=100_000)
    assert q.admit(590, priority=False).verdict is Verdict.ADMIT  # above 80 % of the bucket
    assert q.utilisation() == pytest.approx(0.0059)
    # ten sidecars with 500 each hand out the whole limit of 5000: ours is a tenth of it,
    # and non-priority work may fill 80 % of that tenth
    q = quota(clock)
    assert q.apply_grant(500, limit_tpm=5000, granted_tpm=5000)
    assert q.admit(400, priority=False).verdict is Verdict.ADMIT
    d = q.admit(10, priority=False)
    assert d.verdict is Verdict.QUEUE and d.utilisation == pytest.approx(0.8)
    assert q.admit(90, priority=True).verdict is Verdict.ADMIT
    # half the limit handed out (spare left): our part of the limit is twice our grant
    q = quota(clock)
    assert q.apply_grant(1000, limit_tpm=10_000, granted_tpm=5_000)
    assert q.admit(590, priority=False).verdict is Verdict.ADMIT
    assert q.utilisation() == pytest.approx(590 / 2000)
    clock.advance(31)  # the grant lapses: the safe share, and the local rule again
    assert q.tpm == 600 and q.utilisation() == pytest.approx(590 / 600)
    with pytest.raises(ValueError, match="limit_tpm"):
        q.apply_grant(10, limit_tpm=0)
    with pytest.raises(ValueError, match="granted_tpm"):
        q.apply_grant(10, limit_tpm=100, granted_tpm=5)


def test_reconcile_refunds_unused_reservations() -> None:
    clock = ManualClock()
    q = quota(clock, safe_share_tpm=1000)
    assert q.admit(800, priority=False).verdict is Verdict.ADMIT
    q.reconcile(reserved=800, actual=300)
    assert q.utilisation() == pytest.approx(0.3)
    assert q.admit(500, priority=False).verdict is Verdict.ADMIT
    q.reconcile(reserved=500, actual=900)  # used more than it reserved
    assert q.usage_report()[0] == pytest.approx(1200)
    assert q.admit(1, priority=True).verdict is Verdict.REFUSE  # the bucket is in debt


def test_oversized_call_passes_when_the_bucket_is_full() -> None:
    clock = ManualClock()
    q = quota(clock, safe_share_tpm=600, burst_s=6.0)  # capacity 60
    assert q.admit(500, priority=True).verdict is Verdict.ADMIT
    d = q.admit(500, priority=True)
    assert d.verdict is Verdict.REFUSE and d.retry_after_s == pytest.approx(50.0)  # debt 440 + 60


def test_zero_grant_refuses_with_a_finite_retry_after() -> None:
    clock = ManualClock()
    q = quota(clock)
    q.apply_grant(0)
    d = q.admit(10, priority=True)
    assert d.verdict is Verdict.REFUSE and math.isfinite(d.retry_after_s) and d.retry_after_s > 0


def test_usage_report_counts_unmet_demand_once() -> None:
    clock = ManualClock()
    q = quota(clock, safe_share_tpm=1000, window_s=30)
    assert q.admit(400, priority=False).verdict is Verdict.ADMIT
    assert q.admit(300, priority=False).verdict is Verdict.QUEUE  # 80 % of 500 is 400
    assert q.admit(300, priority=False, requeued=True).verdict is Verdict.QUEUE
    assert q.admit(2000, priority=True).verdict is Verdict.REFUSE
    used, demand = q.usage_report()
    assert used == pytest.approx(800)  # per minute: 400 tokens in a 30 s window
    assert demand == pytest.approx((400 + 300 + 2000) * 2)
    clock.advance(30)
    assert q.admit(300, priority=False, requeued=True).verdict is Verdict.ADMIT
    clock.advance(29)
    assert q.usage_report() == pytest.approx((600, 600))  # admitted once, not double-counted
    clock.advance(31)
    assert q.usage_report() == (0.0, 0.0)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(0, 3), st.floats(0, 300), st.booleans(), st.floats(0, 1)),
        max_size=80,
    ),
    grant=st.floats(100, 20_000),
)
def test_non_priority_never_lifts_utilisation_above_80_percent_and_bucket_bounds_admission(
    steps: list[tuple[float, float, bool, float]], grant: float
) -> None:
    clock = ManualClock(0.0)
    q = GlobalQuota("r", safe_share_tpm=grant, grant_ttl_s=1e9, clock=clock, burst_s=6.0)
    capacity, rate = grant * 6.0 / 60, grant / 60
    admitted: list[tuple[float, float]] = []
    oversize = 0.0
    for advance, tokens, priority, used_share in steps:
        clock.advance(advance)
        before = q.utilisation()
        d = q.admit(tokens, priority)
        assert d.utilisation == pytest.approx(before)
        assert 0 <= d.retry_after_s <= 60
        if d.verdict is Verdict.ADMIT:
            admitted.append((clock.now(), tokens * used_share))
            oversize = max(oversize, tokens - capacity)
            if not priority:
                assert q.utilisation() <= 0.8 + EPS
            q.reconcile(tokens, tokens * used_share)
        else:
            assert d.verdict is (Verdict.REFUSE if priority else Verdict.QUEUE)
        used, demand = q.usage_report()
        assert 0 <= used <= demand + EPS
    # what admitted calls actually charged stays within one burst, the refill, and the
    # excess of one oversized call (admitted when the bucket was full)
    for i, (start, _) in enumerate(admitted):
        total = 0.0
        for at, n in admitted[i:]:
            total += n
            assert total <= capacity + rate * (at - start) + oversize + EPS * max(1.0, total)


# --- the wait queue ---------------------------------------------------------------------


def test_wait_queue_is_bounded_fifo_with_timeouts() -> None:
    q: BoundedWaitQueue[str] = BoundedWaitQueue(max_len=3, timeout_s=5.0)
    assert q.offer("a", 0.0) and q.offer("b", 1.0) and q.offer("c", 2.0)
    assert not q.offer("d", 2.0)
    assert q.next_deadline() == 5.0
    assert q.expire(5.5) == ["a"]
    assert q.pop_ready(lambda item: item != "c") == ["b"]  # stops at the first not ready
    assert len(q) == 1
    assert q.remove("c") and not q.remove("c")
    assert q.next_deadline() is None and q.expire(100) == []
    with pytest.raises(ValueError, match="max_len"):
        BoundedWaitQueue[str](0, 1.0)


@given(st.lists(st.tuples(st.sampled_from(["offer", "expire", "pop"]), st.floats(0, 3)), max_size=100))
def test_wait_queue_properties(ops: list[tuple[str, float]]) -> None:
    q: BoundedWaitQueue[int] = BoundedWaitQueue(max_len=4, timeout_s=2.0)
    now, seq, offered_at, out = 0.0, 0, {}, []
    for op, dt in ops:
        now += dt
        if op == "offer":
            if q.offer(seq, now):
                offered_at[seq] = now
            seq += 1
        elif op == "expire":
            for item in q.expire(now):
                assert now >= offered_at[item] + 2.0  # its deadline (`now - offered` can round below)
        else:
            q.expire(now)
            popped = q.pop_ready(lambda _: True)
            for item in popped:
                assert now < offered_at[item] + 2.0  # nothing timed out is handed out
            out.extend(popped)
        assert len(q) <= 4
    assert out == sorted(out)  # FIFO


# --- the collector's allocator ----------------------------------------------------------


def test_grants_proportional_to_demand_and_capped_by_it() -> None:
    clock = CollectorClock()
    a = LeaseAllocator(limit_tpm=1000, lease_ttl_s=10, clock=clock, headroom=0)
    a.report("s1", 100, 300)
    a.report("s2", 100, 900)
    assert a.grants() == pytest.approx({"s1": 250, "s2": 750})
    a.report("s1", 100, 100)
    a.report("s2", 100, 200)
    assert a.grants() == pytest.approx({"s1": 100, "s2": 200})  # spare stays unassigned


def test_water_filling_redistributes_what_a_capped_sidecar_leaves() -> None:
    # floors of 100 each, then 600 left by demand: s1's part (600 * 120 / 2120) is more
    # than the 20 it still wants, so it is capped and the other two split the remaining 580
    got = water_fill(900, {"s1": 120, "s2": 1000, "s3": 1000}, min_share=100)
    assert got == pytest.approx({"s1": 120, "s2": 390, "s3": 390})
    assert sum(got.values()) <= 900


def test_idle_sidecar_gets_min_share_and_expired_leases_move_their_share() -> None:
    clock = CollectorClock()
    a = LeaseAllocator(limit_tpm=1000, lease_ttl_s=10, min_share_tpm=50, clock=clock)
    a.report("busy1", 400, 2000)
    a.report("busy2", 400, 2000)
    a.report("idle", 0, 0)
    assert a.grants() == pytest.approx({"busy1": 475, "busy2": 475, "idle": 50})
    clock.advance(6)
    a.report("busy1", 400, 2000)
    a.report("busy2", 400, 2000)
    clock.advance(4)  # idle's lease (at t=0) is now 10 s old: gone
    assert a.grants() == pytest.approx({"busy1": 500, "busy2": 500})
    assert not a.report("late", 1, 1, at=clock.now() - 10)  # stale on arrival
    assert not a.report("busy1", 1, 1, at=clock.now() - 5)  # older than its last report
    assert {x.sidecar_id for x in a.leases()} == {"busy1", "busy2"}
    clock.advance(10)
    assert a.grants() == {}


def test_demand_is_at_least_use_and_validation_names_fields() -> None:
    a = LeaseAllocator(limit_tpm=1000, lease_ttl_s=10, clock=CollectorClock(), headroom=0)
    a.report("s", used_tpm=300, demand_tpm=0)
    assert a.grants() == {"s": 300}
    with pytest.raises(ValueError, match="demand_tpm"):
        a.report("s", 1, -1)
    with pytest.raises(ValueError, match="limit_tpm"):
        LeaseAllocator(limit_tpm=math.inf, lease_ttl_s=1)
    with pytest.raises(ValueError, match="lease_ttl_s"):
        LeaseAllocator(limit_tpm=1, lease_ttl_s=0)


def test_spare_capacity_is_handed_out_as_headroom() -> None:
    clock = CollectorClock()
    a = LeaseAllocator(limit_tpm=1000, lease_ttl_s=10, clock=clock)
    a.report("s1", 100, 100)
    a.report("s2", 100, 200)
    assert a.grants() == pytest.approx({"s1": 200, "s2": 400})  # twice the want: room to grow
    a.report("s1", 100, 300)
    a.report("s2", 100, 400)
    # wants 700, 300 spare split in proportion to the wants
    assert a.grants() == pytest.approx({"s1": 300 + 300 * 3 / 7, "s2": 400 + 300 * 4 / 7})
    assert sum(a.grants().values()) <= 1000
    lone = LeaseAllocator(limit_tpm=600_000, lease_ttl_s=10, min_share_tpm=1000, clock=clock)
    lone.report("s", 20_000, 20_000)
    assert lone.grants() == pytest.approx({"s": 40_000})
    with pytest.raises(ValueError, match="headroom"):
        LeaseAllocator(limit_tpm=1, lease_ttl_s=1, headroom=-1)


@settings(max_examples=200)
@given(
    limit=st.floats(0, 1e6),
    demands=st.dictionaries(st.text(min_size=1, max_size=3), st.floats(0, 1e6), max_size=12),
    min_share=st.floats(0, 1e4),
)
def test_allocation_properties(limit: float, demands: dict[str, float], min_share: float) -> None:
    got = water_fill(limit, demands, min_share)
    assert set(got) == set(demands)
    assert sum(got.values()) <= limit + EPS * max(1.0, limit) * 1e-3
    for k, g in got.items():
        assert 0 <= g <= max(demands[k], min_share) * (1 + 1e-9)
    wants = {k: max(d, min_share) for k, d in demands.items()}
    if sum(wants.values()) <= limit:
        assert got == pytest.approx(wants)
    elif demands and any(d > min_share for d in demands.values()):
        assert sum(got.values()) == pytest.approx(limit, rel=1e-6)  # nothing wasted while hungry
    roomy = add_headroom(limit, got, demands, min_share, 1.0)
    assert sum(roomy.values()) <= limit + EPS * max(1.0, limit) * 1e-3
    assert all(roomy[k] >= got[k] for k in got)


@settings(max_examples=100)
@given(busy=st.lists(st.floats(1, 1e5), min_size=1, max_size=5), limit=st.floats(1, 1e5))
def test_idle_share_goes_to_busy_sidecars(busy: list[float], limit: float) -> None:
    demands = {f"b{i}": d for i, d in enumerate(busy)}
    with_idle = water_fill(limit, {**demands, "idle": 0.0}, min_share=0.0)
    assert with_idle["idle"] == 0.0
    assert sum(with_idle.values()) == pytest.approx(min(limit, sum(busy)), rel=1e-6)


# --- three sidecars, one limit (pure simulation with shared manual time) -----------------


def test_three_sidecars_share_one_limit_within_five_percent() -> None:
    limit, period, tick = 60_000.0, 5.0, 0.1
    sclock, cclock = ManualClock(0.0), CollectorClock(0.0)
    alloc = LeaseAllocator(limit, lease_ttl_s=3 * period, min_share_tpm=0, clock=cclock)
    sidecars = {
        name: GlobalQuota(
            name, safe_share_tpm=limit / 3, grant_ttl_s=3 * period, clock=sclock, window_s=10, burst_s=1
        )
        for name in ("a", "b", "idle")
    }
    per_tick = {"a": 3000.0, "b": 1000.0, "idle": 0.0}  # offered tokens per tick: uneven
    admitted = dict.fromkeys(sidecars, 0.0)
    last_grants: dict[str, float] = {}
    steps = int(180 / tick)
    for step in range(1, steps + 1):
        sclock.advance(tick)
        cclock.advance(tick)
        for name, q in sidecars.items():
            if per_tick[name] and q.admit(per_tick[name], priority=True).verdict is Verdict.ADMIT:
                admitted[name] += per_tick[name]
        if step % int(period / tick) == 0:
            for name, q in sidecars.items():
                alloc.report(name, *q.usage_report())
            last_grants = alloc.grants()
            for name, tpm in last_grants.items():
                sidecars[name].apply_grant(tpm, generation=step)
    total = sum(admitted.values())
    allowed = limit * 180 / 60
    assert total <= allowed * 1.05
    assert total >= allowed * 0.90
    assert last_grants["idle"] == 0.0
    assert last_grants["a"] + last_grants["b"] == pytest.approx(limit, rel=1e-6)
    assert last_grants["a"] > last_grants["b"]
