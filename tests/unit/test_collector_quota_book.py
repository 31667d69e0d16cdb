"""QuotaBook: usage reports in, one QuotaGrant per resource and tick out (clock injected)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import ManualClock
from collector._quota import DEFAULT_HEADROOM
from collector._quota_book import QuotaBook, UsageIngest, quota_key
from collector._settings import QuotaSettings
from outrider.v1 import events_pb2

GPT, CLAUDE = "openai/gpt-4o", "anthropic/claude"
TTL = 15.0
_ids = itertools.count()


def usage(
    sidecar: str, demand: float, used: float = 0.0, resource: str = GPT, at: float | None = None
) -> events_pb2.Event:
    event = events_pb2.Event(
        event_id=f"u-{next(_ids)}",
        agent="bot",
        sidecar_id=sidecar,
        time_unix_nano=0 if at is None else int(at * 1e9),
    )
    event.usage.resource = resource
    event.usage.used_tpm = used
    event.usage.demand_tpm = demand
    return event


def book(clock: ManualClock, min_share: float = 0.0) -> QuotaBook:
    quotas = {
        GPT: QuotaSettings(limit_tpm=30_000, min_share_tpm=min_share),
        CLAUDE: QuotaSettings(limit_tpm=1000),
    }
    return QuotaBook(quotas, lease_ttl_s=TTL, grant_ttl_s=20.0, clock=clock)


def test_uneven_demand_is_split_in_proportion_and_the_idle_sidecar_gets_nothing() -> None:
    clock = ManualClock()
    b = book(clock)
    for sidecar, demand in (("a", 30_000), ("b", 10_000), ("c", 0)):
        assert b.observe(usage(sidecar, demand)) is UsageIngest.ACCEPTED
    gpt, claude = b.tick()
    assert gpt.resource == GPT and gpt.limit_tpm == 30_000 and gpt.generation == 1
    assert dict(gpt.grants_tpm) == pytest.approx({"a": 22_500, "b": 7_500, "c": 0})
    assert gpt.issued_at_unix_nano == int(clock.now() * 1e9) and gpt.ttl_s == 20.0
    assert claude.resource == CLAUDE and dict(claude.grants_tpm) == {} and claude.generation == 1
    usage_now = b.usage(GPT)
    assert (usage_now.sidecars, usage_now.demand_tpm) == (3, 40_000)


def test_a_lapsed_lease_moves_its_share_to_the_others() -> None:
    clock = ManualClock()
    b = book(clock, min_share=1000)
    b.observe(usage("a", 30_000))
    b.observe(usage("b", 15_000))
    (gpt, _) = b.tick()
    assert dict(gpt.grants_tpm) == pytest.approx({"a": 1000 + 28_000 * 2 / 3, "b": 1000 + 28_000 / 3})
    clock.advance(TTL - 1)
    b.observe(usage("a", 30_000))  # b stops reporting
    clock.advance(1)
    (gpt, _) = b.tick()
    assert dict(gpt.grants_tpm) == pytest.approx({"a": 30_000})  # b is gone from the map
    clock.advance(TTL)
    (gpt, _) = b.tick()
    assert dict(gpt.grants_tpm) == {} and gpt.generation == 3  # still published: the heartbeat


def test_reports_that_are_not_leases() -> None:
    clock = ManualClock()
    b = book(clock)
    assert b.observe(usage("a", 10, resource="openai/unknown")) is UsageIngest.UNKNOWN_RESOURCE
    assert b.observe(usage("", 10)) is UsageIngest.INVALID
    assert b.observe(usage("a", -1)) is UsageIngest.INVALID
    assert b.observe(usage("a", float("nan"))) is UsageIngest.INVALID
    # replayed from the topic's history: older than a lease
    assert b.observe(usage("a", 10, at=clock.now() - TTL)) is UsageIngest.REJECTED
    assert b.observe(usage("a", 10, at=clock.now() - 1)) is UsageIngest.ACCEPTED
    assert b.observe(usage("a", 99, at=clock.now() - 2)) is UsageIngest.REJECTED  # out of order
    assert b.usage(GPT).demand_tpm == 10
    # use above demand counts as demand
    assert b.observe(usage("a", 5, used=400)) is UsageIngest.ACCEPTED
    assert b.usage(GPT).demand_tpm == 400 and b.usage(GPT).used_tpm == 400


def test_generations_continue_after_restore_and_never_repeat() -> None:
    b = book(ManualClock())
    assert (b.generation(GPT), b.generation(CLAUDE)) == (0, 0)
    b.restore({GPT: 41, "gone/model": 7})
    assert [g.generation for g in b.tick()] == [42, 1]
    b.restore({GPT: 3, CLAUDE: 10})  # lower than what was handed out: ignored
    assert [g.generation for g in b.tick()] == [43, 11]
    assert b.resources == [GPT, CLAUDE]


def test_quota_key() -> None:
    assert quota_key("openai/gpt-4o") == b"quota/openai/gpt-4o"
    with pytest.raises(ValueError, match="resource"):
        quota_key("")


def test_an_empty_book_publishes_nothing() -> None:
    b = QuotaBook({}, lease_ttl_s=1, grant_ttl_s=1, clock=ManualClock())
    assert b.tick() == [] and b.resources == []
    assert b.observe(usage("a", 1)) is UsageIngest.UNKNOWN_RESOURCE
    with pytest.raises(ValueError, match="grant_ttl_s"):
        QuotaBook({}, lease_ttl_s=1, grant_ttl_s=0)


_ops = st.one_of(
    st.tuples(
        st.just("report"),
        st.sampled_from("abcde"),
        st.floats(0, 100_000),
        st.floats(0, 100_000),
        st.floats(0, 2 * TTL),  # how long ago the report was made
    ),
    st.tuples(st.just("advance"), st.floats(0, TTL)),
    st.tuples(st.just("tick")),
    st.tuples(st.just("restore"), st.integers(0, 100)),
)


@settings(max_examples=200, deadline=None)
@given(
    limit=st.floats(1, 100_000),
    min_share=st.floats(0, 1),
    ops=st.lists(_ops, max_size=40),
)
def test_every_tick_is_valid(limit: float, min_share: float, ops: list[tuple[object, ...]]) -> None:
    """Grants never sum above the limit, go only to live leases, never exceed a sidecar's
    want with its headroom, and generations strictly rise per resource whatever happens in between."""
    clock = ManualClock()
    b = QuotaBook(
        {GPT: QuotaSettings(limit_tpm=limit, min_share_tpm=min_share * limit)},
        lease_ttl_s=TTL,
        grant_ttl_s=2 * TTL,
        clock=clock,
    )
    last_report: dict[str, tuple[float, float]] = {}  # sidecar -> (at, want)
    last_generation = 0
    for op in ops:
        if op[0] == "report":
            _, sidecar, used, demand, ago = op
            assert isinstance(sidecar, str) and isinstance(ago, float)
            assert isinstance(used, float) and isinstance(demand, float)
            at = int((clock.now() - ago) * 1e9) / 1e9  # as the event carries it
            result = b.observe(usage(sidecar, demand, used=used, at=at))
            previous = last_report.get(sidecar)
            previous_live = previous is not None and previous[0] + TTL > clock.now()
            expected = at + TTL > clock.now() and not (
                previous_live and previous is not None and at < previous[0]
            )
            assert (result is UsageIngest.ACCEPTED) == expected, (result, at, previous)
            if result is UsageIngest.ACCEPTED:
                last_report[sidecar] = (at, max(used, demand, min_share * limit))
            else:
                assert result is UsageIngest.REJECTED
        elif op[0] == "advance":
            assert isinstance(op[1], float)
            clock.advance(op[1])
        elif op[0] == "restore":
            assert isinstance(op[1], int)
            b.restore({GPT: op[1]})
            last_generation = max(last_generation, op[1])
        else:
            (grant,) = b.tick()
            assert grant.generation == last_generation + 1
            last_generation = grant.generation
            assert sum(grant.grants_tpm.values()) <= limit * (1 + 1e-9)
            for sidecar, tpm in grant.grants_tpm.items():
                at, want = last_report[sidecar]
                assert at + TTL > clock.now(), "a lapsed lease got a share"
                assert 0 <= tpm <= (1 + DEFAULT_HEADROOM) * want * (1 + 1e-9) + 1e-9
            live = {s for s, (at, _) in last_report.items() if at + TTL > clock.now()}
            assert set(grant.grants_tpm) == live
