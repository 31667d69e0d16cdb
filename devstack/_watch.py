"""`outrider rollout watch`: the status view refreshed live, with each gate's bounds over time.

The chart is a pair of sparklines per gate (lower and upper confidence bound, one column per
refresh the watcher saw), on a scale shared by both rows and the gate's margin, so a band
closing in below the margin or lifting above zero is visible at a glance. On a terminal the
view redraws in place (rich's Live); anywhere else each refresh prints a new frame, so logs and
tests read the same content.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping

from rich.console import Console, Group
from rich.live import Live
from rich.rule import Rule
from rich.text import Text

from devstack._status import ENDED, render_status
from outrider.v1 import admin_pb2

BLOCKS = "▁▂▃▄▅▆▇█"
HISTORY = 48  # refreshes kept per gate: the chart's width


def sparkline(values: list[float], low: float, high: float) -> str:
    """One block character per value on the scale [low, high]; a gap for a missing value."""
    span = high - low
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(" ")
            continue
        frac = 0.5 if span <= 0 else (v - low) / span
        out.append(BLOCKS[min(len(BLOCKS) - 1, max(0, int(frac * (len(BLOCKS) - 1) + 0.5)))])
    return "".join(out)


class BoundsHistory:
    """Per gate, the (lower, upper) bounds of each refresh, the newest last."""

    def __init__(self, size: int = HISTORY) -> None:
        self._size = size
        self._by_gate: dict[str, deque[tuple[float, float]]] = {}
        self._margin: dict[str, float] = {}

    def add(self, status: admin_pb2.RolloutStatus) -> None:
        for g in status.state.gate_results:
            if g.kind == "smoke":  # a blue-green's smoke test: passed or failed, no bounds
                continue
            ready = g.verdict not in ("waiting", "") and g.unit in ("pts", "ratio", "score")
            point = (g.lower, g.upper) if ready else (math.nan, math.nan)
            self._by_gate.setdefault(g.name, deque(maxlen=self._size)).append(point)
            if g.kind != "trigger":
                self._margin[g.name] = g.margin

    def chart(self) -> list[str]:
        lines = []
        for name, points in self._by_gate.items():
            lows = [p[0] for p in points]
            highs = [p[1] for p in points]
            finite = [v for v in lows + highs if math.isfinite(v)]
            if not finite:
                lines.append(f"{name.removeprefix('trigger:'):<18} waiting for data")
                continue
            margin = self._margin.get(name)
            scale = finite + ([margin] if margin is not None and math.isfinite(margin) else [])
            low, high = min(scale), max(scale)
            label = name.removeprefix("trigger:")
            lines.append(f"{label:<18} upper {sparkline(highs, low, high)}  {highs[-1]:.4g}")
            lines.append(f"{'':<18} lower {sparkline(lows, low, high)}  {lows[-1]:.4g}")
            if margin is not None:
                lines.append(f"{'':<18} scale {low:.4g} .. {high:.4g}, margin {margin:.4g}")
        return lines


def frame(
    status: admin_pb2.RolloutStatus, history: BoundsHistory, labels: Mapping[str, str] | None = None
) -> Group:
    lines = render_status(status, timeline=False, labels=labels)
    # the chart right under the phase and versions, the gates' detail below it: on a short
    # terminal what gets cut is the detail
    cut = next((i for i, line in enumerate(lines) if line.startswith(("gate ", "trigger "))), len(lines))
    return Group(
        Text("\n".join(lines[:cut])),
        Rule("bounds over time", style="dim"),
        Text("\n".join(history.chart())),
        Rule(style="dim"),
        Text("\n".join(lines[cut:])),
    )


def watch(
    fetch: Callable[[], admin_pb2.RolloutStatus],
    console: Console,
    interval_s: float,
    sleep: Callable[[float], None] = time.sleep,
    labels: Mapping[str, str] | None = None,
) -> admin_pb2.RolloutStatus:
    """Refresh until the rollout ends (or KeyboardInterrupt reaches the caller); the last status."""
    history = BoundsHistory()
    status = fetch()
    history.add(status)
    if not console.is_terminal:
        while True:
            console.print(frame(status, history, labels))
            if status.state.phase in ENDED:
                return status
            console.print(Rule("next refresh", style="dim"))
            sleep(interval_s)
            status = fetch()
            history.add(status)
    live = Live(frame(status, history, labels), console=console, auto_refresh=False, vertical_overflow="crop")
    with live:
        while status.state.phase not in ENDED:
            sleep(interval_s)
            status = fetch()
            history.add(status)
            live.update(frame(status, history, labels), refresh=True)
    return status
