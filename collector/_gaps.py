"""End-to-end loss detection: gaps in each sidecar's event sequence numbers.

Every sidecar numbers the events it emits 1, 2, 3, ... (`Event.sequence`, per sidecar id).
The first event seen from a sidecar sets its baseline (a collector that starts late does
not call the earlier ones missing); after that, a jump from n to n + k + 1 means k events
never arrived: dropped by a full queue, lost by a broker, or expired. Duplicates and late
arrivals (at or below the highest seen) change nothing. The state is checkpointed with the
windows, so a restart neither forgets a sidecar nor counts its gap again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

MAX_SIDECARS = 10_000  # the oldest-seen sidecar is forgotten past this


class GapTracker:
    def __init__(self, max_sidecars: int = MAX_SIDECARS) -> None:
        self._highest: OrderedDict[str, tuple[str, int]] = OrderedDict()  # sidecar -> (agent, seq)
        self._max = max_sidecars
        self.missing_by_agent: dict[str, int] = {}

    def observe(self, sidecar: str, agent: str, sequence: int) -> int:
        """How many events this one shows to be missing (0 for most)."""
        if not sidecar or sequence <= 0:
            return 0
        seen = self._highest
        known = seen.get(sidecar)
        if known is None:
            seen[sidecar] = (agent, sequence)
            if len(seen) > self._max:
                seen.popitem(last=False)
            return 0
        highest = known[1]
        if sequence <= highest:
            return 0
        seen[sidecar] = (agent, sequence)
        seen.move_to_end(sidecar)
        missing = sequence - highest - 1
        if missing:
            self.missing_by_agent[agent] = self.missing_by_agent.get(agent, 0) + missing
        return missing

    def to_state(self, agents: Callable[[str], bool] | None = None) -> dict[str, Any]:
        def mine(agent: str) -> bool:
            return agents is None or agents(agent)

        return {
            "highest": [[s, a, q] for s, (a, q) in self._highest.items() if mine(a)],
            "missing_by_agent": {a: n for a, n in self.missing_by_agent.items() if mine(a)},
        }

    def load_state(self, state: dict[str, Any], agents: Callable[[str], bool] | None = None) -> None:
        highest = OrderedDict(
            (str(s), (str(a), int(q)))
            for s, a, q in state.get("highest", [])
            if agents is None or agents(str(a))
        )
        missing = {
            str(k): int(v)
            for k, v in (state.get("missing_by_agent") or {}).items()
            if agents is None or agents(str(k))
        }
        if agents is None:
            self._highest, self.missing_by_agent = highest, missing
            return
        self.forget(agents)
        self._highest.update(highest)
        self.missing_by_agent.update(missing)

    def forget(self, agents: Callable[[str], bool]) -> None:
        for sidecar in [s for s, (a, _) in self._highest.items() if agents(a)]:
            del self._highest[sidecar]
        for agent in [a for a in self.missing_by_agent if agents(a)]:
            del self.missing_by_agent[agent]
