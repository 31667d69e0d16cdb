"""A bounded, time-expiring set of event ids: how the collector drops redeliveries.

Pure and clock-driven (`now` is passed in). An id is remembered for `ttl_s` or until
`maxsize` newer ids push it out, whichever comes first. Serializable, so a checkpoint can
carry it across a restart.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class SeenIds:
    def __init__(self, maxsize: int, ttl_s: float) -> None:
        if maxsize < 1:
            raise ValueError("dedupe_size must be at least 1")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.maxsize, self.ttl_s = maxsize, ttl_s
        self._ids: OrderedDict[str, float] = OrderedDict()  # id -> when first seen, oldest first

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str, now: float) -> bool:
        """Remember `event_id`; False if it was already remembered (a duplicate)."""
        ids = self._ids
        if event_id in ids:
            return False
        ids[event_id] = now
        if len(ids) > self.maxsize:
            ids.popitem(last=False)  # one in, one out: the cap holds after every add
        return True

    def expire(self, now: float) -> int:
        """Forget ids older than the TTL; the number forgotten."""
        horizon = now - self.ttl_s
        dropped = 0
        while self._ids:
            first = next(iter(self._ids.items()))
            if first[1] > horizon:
                break
            self._ids.popitem(last=False)
            dropped += 1
        return dropped

    def to_state(self, keep: Callable[[str], bool] | None = None) -> list[Any]:
        return [[k, v] for k, v in self._ids.items() if keep is None or keep(k)]

    def to_state_by_prefix(self, keep: Callable[[str], bool], sep: str) -> list[Any]:
        """`to_state` of the ids whose part before `sep` `keep` selects: it is asked once per
        distinct part (a checkpoint holds every id; few agents own them)."""
        kept: dict[str, bool] = {}
        state: list[Any] = []
        for key, seen in self._ids.items():
            prefix = key.partition(sep)[0]
            mine = kept.get(prefix)
            if mine is None:
                mine = kept[prefix] = keep(prefix)
            if mine:
                state.append([key, seen])
        return state

    def load_state(self, state: list[Any]) -> None:
        self._ids = OrderedDict((str(k), float(v)) for k, v in state)
        while len(self._ids) > self.maxsize:
            self._ids.popitem(last=False)

    def discard(self, which: Callable[[str], bool]) -> None:
        """Forget every id `which` selects."""
        for key in [k for k in self._ids if which(k)]:
            del self._ids[key]

    def merge(self, other: SeenIds, which: Callable[[str], bool]) -> None:
        """Take the ids `which` selects from `other`, keeping oldest-first order (expiry relies on it)."""
        merged = [*self._ids.items(), *((k, t) for k, t in other._ids.items() if which(k))]
        merged.sort(key=lambda item: item[1])
        self._ids = OrderedDict(merged)
        while len(self._ids) > self.maxsize:
            self._ids.popitem(last=False)
