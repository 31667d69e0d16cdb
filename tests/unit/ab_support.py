"""Helpers for the A/B test tests: specs, and users' events per variant on a manual clock."""

from __future__ import annotations

import itertools
import random

from outrider.v1 import common_pb2, events_pb2, sidecar_pb2

AGENT = "bot"
VERSIONS = ("1a2b3c4d5e6f", "9f8e7d6c5b4a", "5e5e5e5e5e5e")
_ids = itertools.count()


def ab_spec(
    *,
    variants: int = 2,
    weights: tuple[float, ...] | None = None,
    analysis: str = "fixed",
    on_decision: str = "promote_winner",
    gates: str = "",
    extra: str = "",
    mde: float = 0.05,
) -> str:
    weights = weights or tuple(100 / variants for _ in range(variants))
    lines = "\n".join(
        f"    - {{name: {'ABC'[i]}, version: {VERSIONS[i]}, weight: {weights[i]:g}}}" for i in range(variants)
    )
    return (
        f"agent: {AGENT}\nstrategy: ab_test\nlook_interval: 1s\nalpha: 0.05\n{extra}"
        f"ab:\n  variants:\n{lines}\n"
        f"  primary: {{metric: task_success, min_detectable_effect: {mde}, power: 0.8, baseline: 0.85}}\n"
        f"  analysis: {analysis}\n  on_decision: {on_decision}\n  max_duration: 1d\n"
        + (f"gates:\n{gates}" if gates else "")
    )


def user_events(
    rollout_id: str,
    variant: int,
    t: float,
    rng: random.Random,
    *,
    success: float,
    error_rate: float = 0.0,
) -> list[events_pb2.Event]:
    """One user of `variant`: a model call (an error with `error_rate`) and a task feedback."""
    unit = f"u{next(_ids)}"
    base = {
        "time_unix_nano": round(t * 1e9),
        "agent": AGENT,
        "version_id": VERSIONS[variant],
        "role": common_pb2.ROLE_STABLE if variant == 0 else common_pb2.ROLE_VARIANT,
        "session_id": "s" + unit,
        "unit_id": unit,
        "rollout_id": rollout_id,
    }
    call = events_pb2.Event(event_id=f"e{next(_ids)}", **base)
    failed = rng.random() < error_rate
    call.call.operation, call.call.latency_ms, call.call.cost_usd = "chat", 100.0 * (1 + rng.random()), 0.003
    call.call.outcome = events_pb2.OUTCOME_ERROR if failed else events_pb2.OUTCOME_OK
    call.call.error_class = "provider_5xx" if failed else ""
    task = events_pb2.Event(event_id=f"e{next(_ids)}", **base)
    task.feedback.kind = (
        sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS
        if rng.random() < success
        else sidecar_pb2.FEEDBACK_KIND_TASK_FAILURE
    )
    return [call, task]
