"""What a call costs: a per-model price table and bounded per-session totals.

Prices are USD per million tokens. Cached input tokens are part of ``input_tokens`` (that
is how OpenAI-compatible usage reports them) and are billed at the cached rate, which
defaults to the input rate. A model missing from the table costs 0.0 and is reported as
unpriced (`Quote.priced`), so the caller can count it rather than guess.

    table = build_price_table({"gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10}})
    table.cost("gpt-4o", input_tokens=1000, output_tokens=0)   # 0.0025
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cachetools import TTLCache

from outrider.clock import Clock, SystemClock

TOKENS_PER_PRICE_UNIT = 1_000_000
DEFAULT_MAX_SESSIONS = 100_000
DEFAULT_SESSION_COST_TTL_S = 3600.0
_PRICE_FIELDS = ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok")


class PriceConfigError(ValueError):
    """A price table that cannot be used; the message names the field."""


def _check_price(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PriceConfigError(f"{field}: must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise PriceConfigError(f"{field}: must be finite")
    if number < 0:
        raise PriceConfigError(f"{field}: must be >= 0")
    return number


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None

    def __post_init__(self) -> None:
        for name in _PRICE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _check_price(value, name))

    @property
    def cached_rate(self) -> float:
        return self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        _check_tokens(input_tokens, output_tokens, cached_input_tokens)
        fresh = input_tokens - cached_input_tokens
        total = fresh * self.input_per_mtok + cached_input_tokens * self.cached_rate
        total += output_tokens * self.output_per_mtok
        return total / TOKENS_PER_PRICE_UNIT


def _check_tokens(input_tokens: int, output_tokens: int, cached_input_tokens: int) -> None:
    for name, value in (
        ("input_tokens", input_tokens),
        ("output_tokens", output_tokens),
        ("cached_input_tokens", cached_input_tokens),
    ):
        if value < 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")
    if cached_input_tokens > input_tokens:
        raise ValueError(
            f"cached_input_tokens: must not exceed input_tokens ({cached_input_tokens} > {input_tokens})"
        )


@dataclass(frozen=True, slots=True)
class Quote:
    """A call's cost, and whether its model had a price (False: ``usd`` is 0.0)."""

    usd: float
    priced: bool


class PriceTable(Mapping[str, Price]):
    """An immutable mapping of model name to `Price`."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self._prices = dict(prices or {})

    def __getitem__(self, model: str) -> Price:
        return self._prices[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def __repr__(self) -> str:
        return f"PriceTable({self._prices!r})"

    def quote(self, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> Quote:
        price = self._prices.get(model)
        if price is None:
            _check_tokens(input_tokens, output_tokens, cached_input_tokens)
            return Quote(0.0, False)
        return Quote(price.cost(input_tokens, output_tokens, cached_input_tokens), True)

    def cost(self, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        """USD for one call; 0.0 for a model without a price (see `quote` to tell)."""
        return self.quote(model, input_tokens, output_tokens, cached_input_tokens).usd


def build_price_table(mapping: Mapping[str, object] | None, *, field: str = "prices") -> PriceTable:
    """A `PriceTable` from config: ``{model: {input_per_mtok, output_per_mtok,
    cached_input_per_mtok?}}``. Errors name the field, e.g.
    ``prices.gpt-4o.input_per_mtok: must be >= 0``."""
    if mapping is None:
        return PriceTable()
    if not isinstance(mapping, Mapping):
        raise PriceConfigError(f"{field}: expected a mapping of model name to prices")
    prices: dict[str, Price] = {}
    for model, spec in mapping.items():
        if not isinstance(model, str) or not model:
            raise PriceConfigError(f"{field}: model names must be non-empty strings, got {model!r}")
        where = f"{field}.{model}"
        if not isinstance(spec, Mapping):
            raise PriceConfigError(f"{where}: expected a mapping with input_per_mtok and output_per_mtok")
        unknown = sorted(str(key) for key in spec if key not in _PRICE_FIELDS)
        if unknown:
            raise PriceConfigError(
                f"{where}.{unknown[0]}: unknown field (expected {', '.join(_PRICE_FIELDS)})"
            )
        values: dict[str, float | None] = {}
        for name in _PRICE_FIELDS:
            if name not in spec or spec[name] is None:
                if name != "cached_input_per_mtok":
                    raise PriceConfigError(f"{where}.{name}: required")
                values[name] = None
            else:
                values[name] = _check_price(spec[name], f"{where}.{name}")
        input_price, output_price = values["input_per_mtok"], values["output_per_mtok"]
        assert input_price is not None and output_price is not None
        prices[model] = Price(input_price, output_price, values["cached_input_per_mtok"])
    return PriceTable(prices)


class SessionCostTracker:
    """Running USD totals per session, bounded in count (least recently used go first)
    and in time (a session idle for ``ttl_s`` is forgotten)."""

    def __init__(
        self,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        ttl_s: float = DEFAULT_SESSION_COST_TTL_S,
        *,
        clock: Clock | None = None,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions: must be >= 1")
        if not ttl_s > 0:
            raise ValueError("ttl_s: must be > 0")
        self._clock = clock or SystemClock()
        self._totals: TTLCache[str, float] = TTLCache(maxsize=max_sessions, ttl=ttl_s, timer=self._clock.now)

    def add(self, session_id: str, cost: float) -> float:
        """Add one call's cost; the session's new total. Refreshes the session's TTL."""
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"cost: must be a finite number >= 0, got {cost!r}")
        total = self._totals.get(session_id, 0.0) + cost
        self._totals[session_id] = total
        return total

    def total(self, session_id: str) -> float:
        """The session's total so far; 0.0 for an unknown or expired session."""
        return self._totals.get(session_id, 0.0)

    def forget(self, session_id: str) -> None:
        self._totals.pop(session_id, None)

    def __len__(self) -> int:
        self._totals.expire()
        return len(self._totals)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._totals


__all__ = [
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_SESSION_COST_TTL_S",
    "Price",
    "PriceConfigError",
    "PriceTable",
    "Quote",
    "SessionCostTracker",
    "build_price_table",
]
