"""Cost: price arithmetic, cached tokens, unknown models, config errors, session totals."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outrider.clock import ManualClock
from sidecar.upstream._cost import (
    Price,
    PriceConfigError,
    PriceTable,
    Quote,
    SessionCostTracker,
    build_price_table,
)

TABLE = build_price_table(
    {
        "gpt-4o": {"input_per_mtok": 2.50, "output_per_mtok": 10.0, "cached_input_per_mtok": 1.25},
        "gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.60},
    }
)


def test_input_tokens_at_the_input_price() -> None:
    assert TABLE.cost("gpt-4o", input_tokens=1000, output_tokens=0) == pytest.approx(0.0025)


def test_input_and_output_add_up() -> None:
    # 1M in at $2.50 + 500k out at $10 = $7.50
    assert TABLE.cost("gpt-4o", 1_000_000, 500_000) == pytest.approx(7.5)
    assert TABLE.cost("gpt-4o-mini", 2000, 1000) == pytest.approx(0.0003 + 0.0006)


def test_cached_tokens_are_part_of_input_and_billed_at_the_cached_rate() -> None:
    # 1000 input of which 400 cached: 600 * 2.50 + 400 * 1.25 per million
    assert TABLE.cost("gpt-4o", 1000, 0, cached_input_tokens=400) == pytest.approx(
        (600 * 2.5 + 400 * 1.25) / 1e6
    )


def test_cached_rate_defaults_to_the_input_rate() -> None:
    mini = TABLE["gpt-4o-mini"]
    assert mini.cached_rate == 0.15
    assert TABLE.cost("gpt-4o-mini", 1000, 0, cached_input_tokens=1000) == TABLE.cost("gpt-4o-mini", 1000, 0)


def test_unknown_model_costs_nothing_and_says_so() -> None:
    assert TABLE.cost("mystery-model", 1000, 1000) == 0.0
    assert TABLE.quote("mystery-model", 1000, 1000) == Quote(0.0, False)
    assert TABLE.quote("gpt-4o", 1000, 0) == Quote(pytest.approx(0.0025), True)  # type: ignore[arg-type]
    assert "mystery-model" not in TABLE and "gpt-4o" in TABLE and len(TABLE) == 2


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((-1, 0, 0), "input_tokens"),
        ((0, -1, 0), "output_tokens"),
        ((10, 0, -1), "cached_input_tokens"),
        ((10, 0, 11), "cached_input_tokens: must not exceed input_tokens"),
    ],
)
def test_bad_token_counts_are_refused_even_for_unknown_models(args: tuple[int, int, int], field: str) -> None:
    for model in ("gpt-4o", "mystery-model"):
        with pytest.raises(ValueError, match=field):
            TABLE.cost(model, *args)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"gpt-4o": {"input_per_mtok": -1, "output_per_mtok": 1}},
            "prices.gpt-4o.input_per_mtok: must be >= 0",
        ),
        ({"gpt-4o": {"input_per_mtok": 1}}, "prices.gpt-4o.output_per_mtok: required"),
        (
            {"gpt-4o": {"input_per_mtok": "2.5", "output_per_mtok": 1}},
            "prices.gpt-4o.input_per_mtok: must be a num",
        ),
        (
            {"gpt-4o": {"input_per_mtok": True, "output_per_mtok": 1}},
            "prices.gpt-4o.input_per_mtok: must be a num",
        ),
        (
            {"m": {"input_per_mtok": 1, "output_per_mtok": math.inf}},
            "prices.m.output_per_mtok: must be finite",
        ),
        (
            {"m": {"input_per_mtok": 1, "output_per_mtok": 1, "cached_input_per_mtok": -0.5}},
            "cached_input_per_mtok",
        ),
        ({"m": {"input_per_mtok": 1, "output_per_mtok": 1, "input": 2}}, "prices.m.input: unknown field"),
        ({"m": 3}, "prices.m: expected a mapping"),
        ({"": {"input_per_mtok": 1, "output_per_mtok": 1}}, "prices: model names must be non-empty"),
        ([1, 2], "prices: expected a mapping"),
    ],
)
def test_price_table_errors_name_the_field(spec: object, message: str) -> None:
    with pytest.raises(PriceConfigError) as caught:
        build_price_table(spec)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_price_table_field_prefix_and_empty_config() -> None:
    with pytest.raises(PriceConfigError, match=r"^versions\.v2\.prices\.x\.input_per_mtok: required$"):
        build_price_table({"x": {"output_per_mtok": 1}}, field="versions.v2.prices")
    assert len(build_price_table(None)) == 0
    assert PriceTable().cost("any", 10, 10) == 0.0


def test_price_validates_direct_construction() -> None:
    with pytest.raises(PriceConfigError, match="output_per_mtok: must be >= 0"):
        Price(1.0, -2.0)
    assert Price(3, 4).input_per_mtok == 3.0


@given(
    input_tokens=st.integers(0, 10**9),
    output_tokens=st.integers(0, 10**9),
    cached_share=st.floats(0, 1),
    prices=st.tuples(*[st.floats(0, 1000)] * 3),
)
def test_cost_is_non_negative_and_cached_never_costs_more_when_cheaper(
    input_tokens: int, output_tokens: int, cached_share: float, prices: tuple[float, float, float]
) -> None:
    price = Price(prices[0], prices[1], min(prices[2], prices[0]))
    cached = int(input_tokens * cached_share)
    with_cache = price.cost(input_tokens, output_tokens, cached)
    assert 0 <= with_cache <= price.cost(input_tokens, output_tokens) * (1 + 1e-12) + 1e-12


def test_session_totals_accumulate_per_session() -> None:
    tracker = SessionCostTracker(ttl_s=60, clock=ManualClock())
    assert tracker.add("s1", 0.01) == pytest.approx(0.01)
    assert tracker.add("s1", 0.02) == pytest.approx(0.03)
    assert tracker.add("s2", 0.5) == pytest.approx(0.5)
    assert tracker.total("s1") == pytest.approx(0.03)
    assert tracker.total("nobody") == 0.0
    tracker.forget("s1")
    assert tracker.total("s1") == 0.0 and "s2" in tracker


def test_session_totals_are_bounded_in_count() -> None:
    tracker = SessionCostTracker(max_sessions=3, ttl_s=60, clock=ManualClock())
    for index in range(10):
        tracker.add(f"s{index}", 1.0)
    assert len(tracker) == 3
    assert tracker.total("s0") == 0.0 and tracker.total("s9") == 1.0


def test_idle_sessions_expire_and_activity_keeps_them() -> None:
    clock = ManualClock()
    tracker = SessionCostTracker(ttl_s=60, clock=clock)
    tracker.add("busy", 1.0)
    tracker.add("idle", 1.0)
    for _ in range(3):
        clock.advance(40)
        tracker.add("busy", 1.0)
    assert tracker.total("busy") == pytest.approx(4.0)
    assert tracker.total("idle") == 0.0
    assert len(tracker) == 1


@pytest.mark.parametrize("cost", [-0.01, math.nan, math.inf])
def test_session_tracker_refuses_bad_costs(cost: float) -> None:
    with pytest.raises(ValueError, match="cost: must be a finite number >= 0"):
        SessionCostTracker().add("s", cost)


def test_session_tracker_refuses_bad_bounds() -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        SessionCostTracker(max_sessions=0)
    with pytest.raises(ValueError, match="ttl_s"):
        SessionCostTracker(ttl_s=0)
