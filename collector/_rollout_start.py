"""The first state of a rollout, for every strategy: the canary's fields, then the shadow
phase's, a blue-green's (collector._bluegreen_phase) or an A/B test's (collector._ab_phase)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from collector import _bluegreen_phase as bluegreen
from collector._ab_phase import start_ab
from collector._rollout_state import RUNNING, SHADOW, STICKY, retired_after
from collector._rollout_state import ns as _ns
from collector._shadow_phase import shadow_start_reason, shadow_waiting, waiting_result
from collector._spec import RolloutSpec
from outrider.v1 import control_pb2


def start_state(
    agent: str,
    spec: RolloutSpec,
    spec_yaml: str,
    now: float,
    decided_by: str,
    generation: int,
    previous_retired: Sequence[control_pb2.RetiredVersion],
) -> control_pb2.RolloutState:
    """The state that starts `spec` at `now` with `generation`; versions the previous rollout
    retired ride along (their sessions may still be draining)."""
    rollout_id = hashlib.sha256(f"{agent}|{_ns(now)}|{generation}|{spec_yaml}".encode()).hexdigest()[:12]
    gate_alpha, _ = spec.test_alphas()
    shadow = spec.shadow
    if shadow is not None:
        reason = shadow_start_reason(spec)
    elif spec.steps:  # (a blue-green has none: bluegreen.to_smoke_test words its start)
        reason = f"started: step 1 of {len(spec.steps)} at {spec.steps[0].weight:g}%"
    else:
        reason = "started"  # an A/B test's and a blue-green's own start words it
    state = control_pb2.RolloutState(
        agent=agent,
        generation=generation,
        rollout_id=rollout_id,
        stable_version_id=spec.stable,
        candidate_version_id=spec.candidate,
        candidate_weight=0.0 if shadow is not None else spec.effective_weight(0),
        phase=SHADOW if shadow is not None else RUNNING,
        shadow_sample=shadow.sample / 100 if shadow is not None else 0.0,
        alpha=spec.alpha,
        step_index=0,
        step_count=len(spec.steps),
        sticky_by=STICKY[spec.sticky_by],
        reason=reason,
        decided_by=decided_by,
        decided_at_unix_nano=_ns(now),
        step_started_at_unix_nano=_ns(now),
        spec_yaml=spec_yaml,
        started_at_unix_nano=_ns(now),
        drain_timeout_s=spec.drain_timeout,
        # per-tenant canaries (sidecar.routing._tenants) and a demo's scale, on every state
        opt_in_tenants=spec.opt_in_tenants,
        exclude_tenants=spec.exclude_tenants,
        time_scale=spec.time_scale,
        # the previous rollout's candidate may still be draining: its sessions stay refused
        retired=retired_after(previous_retired, now),
        gate_results=[
            waiting_result(g, gate_alpha, "gate") for g in ([] if shadow is not None else spec.gates)
        ]
        + shadow_waiting(spec, gate_alpha),
    )
    if spec.blue_green is not None:  # SMOKE_TEST: green serves only the smoke tests
        bluegreen.to_smoke_test(state, spec)
    if spec.ab is not None:
        start_ab(state, spec)  # an A/B test: its variants and plan (collector._ab_phase)
    return state
