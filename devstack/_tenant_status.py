"""What `outrider rollout status` and `show` add for per-tenant canaries and scaled demos.

- `groups`: each group's figures apart (opt-in tenants, the randomized split, excluded
  tenants), per version, since the rollout started. The gates compare the split alone.
- `time_scale`: a rollout whose durations are scaled says so first, so nobody reads a demo as
  a real rollout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from outrider.v1 import admin_pb2, control_pb2

GROUP_NAMES = {"opt_in": "opt-in", "split": "split", "excluded": "excluded"}
SHOWN_TENANTS = 5  # per list; the rest are counted


def _tenants(ids: Sequence[str]) -> str:
    if not ids:
        return "-"
    more = len(ids) - SHOWN_TENANTS
    return ", ".join(ids[:SHOWN_TENANTS]) + (f" and {more} more" if more > 0 else "")


def scale_of(value: float) -> float:
    """A state's or record's time_scale as it reads (0, from before the field, is 1)."""
    return value if value > 0 else 1.0


def time_scale_line(time_scale: float) -> str | None:
    """The warning line of a scaled rollout; None for a real one."""
    scale = scale_of(time_scale)
    if scale == 1.0:
        return None
    factor = f"1/{1 / scale:.0f}" if abs(1 / scale - round(1 / scale)) < 1e-6 else f"x{scale:g}"
    return f"time_scale {scale:g}: a scaled demo, durations are {factor} of the plan"


def groups_view(status: admin_pb2.RolloutStatus) -> list[dict[str, Any]]:
    return [
        {
            "cohort": g.cohort,
            "version_id": g.version_id,
            "requests": g.requests,
            "errors": g.errors,
            "error_rate": g.error_rate,
            "latency_p95_ms": g.latency_p95_ms,
        }
        for g in status.groups
    ]


def tenant_lines(state: control_pb2.RolloutState, groups: list[dict[str, Any]]) -> list[str]:
    """The tenant lists and the groups' figures (nothing for a rollout without lists)."""
    if not state.opt_in_tenants and not state.exclude_tenants:
        return []
    lines = [
        f"tenants     opt-in {_tenants(state.opt_in_tenants)} (always the candidate); "
        f"excluded {_tenants(state.exclude_tenants)} (never); gates compare the split only"
    ]
    for g in groups:
        role = "candidate" if g["version_id"] == state.candidate_version_id else "stable"
        name = GROUP_NAMES.get(g["cohort"], g["cohort"])
        lines.append(
            f"group       {name:<9} {role:<9} {g['version_id']}  {g['requests']} requests, "
            f"{g['error_rate']:.2%} errors, p95 {g['latency_p95_ms']:.0f} ms (since start)"
        )
    return lines
