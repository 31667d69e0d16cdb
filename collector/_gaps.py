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
from collections.abc import Callable, Sequence
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

    def observe_all(self, seen: Sequence[tuple[str, str, int]]) -> list[tuple[str, str, int, int]]:
        """`observe` each (sidecar, agent, sequence) in order, with the same result; the ones
        that show events missing, as (sidecar, agent, sequence, missing).

        A batch moves each sidecar it updates to the end once, in the order of its last update,
        as updating them one by one leaves them; when the batch could push a sidecar out (past
        the cap), one by one."""
        highest = self._highest
        if len(highest) + len(seen) > self._max:
            return [(s, a, q, missing) for s, a, q in seen if (missing := self.observe(s, a, q))]
        gaps: list[tuple[str, str, int, int]] = []
        latest: dict[str, tuple[str, str, int]] = {}  # sidecar -> its last update, in that order
        for item in seen:
            sidecar, agent, sequence = item
            if not sidecar or sequence <= 0:
                continue
            if (last := latest.get(sidecar)) is not None:
                if sequence <= (top := last[2]):
                    continue
                del latest[sidecar]  # to the end, as move_to_end would
            elif (known := highest.get(sidecar)) is not None:
                if sequence <= (top := known[1]):
                    continue
            else:  # the first seen: its baseline
                latest[sidecar] = item
                continue
            latest[sidecar] = item
            if missing := sequence - top - 1:
                self.missing_by_agent[agent] = self.missing_by_agent.get(agent, 0) + missing
                gaps.append((sidecar, agent, sequence, missing))
        for sidecar, (_, agent, sequence) in latest.items():
            highest[sidecar] = (agent, sequence)
            highest.move_to_end(sidecar)
        return gaps

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
