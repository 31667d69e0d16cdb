"""A/B tests' split of new sessions: the sticky hash over the variants' cumulative weights.

While an `ROLLOUT_STRATEGY_AB_TEST` state is RUNNING (or held: HOLD and NO_DATA keep the split),
a new session's sticky fraction in [0, 1) falls in one variant's slice of the cumulative
weights, in the order the state lists them. The first variant is the control and the state's
stable version: its sessions get ROLE_STABLE; every other variant's get ROLE_VARIANT. The
same rollout id and key always give the same variant, so a user keeps theirs.

A sidecar lacking any variant's version serves the config's stable (the router's usual rule
for versions it does not have), so a partial fleet never skews the split toward the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from outrider.v1 import common_pb2, control_pb2

AB_TEST = control_pb2.ROLLOUT_STRATEGY_AB_TEST


def is_ab_test(state: control_pb2.RolloutState) -> bool:
    return state.strategy == AB_TEST and len(state.variants) >= 2


def variant_versions(state: control_pb2.RolloutState) -> tuple[str, ...]:
    return tuple(v.version_id for v in state.variants)


def pick_variant(variants: Sequence[control_pb2.Variant], fraction: float) -> int:
    """The index of the variant whose slice of the cumulative weights holds `fraction`.

    Weights are normalized (they should sum to 1; a NaN or negative weight counts 0), and a
    fraction past the last edge by rounding falls in the last variant.
    """
    weights = [w if math.isfinite(w) and w > 0 else 0.0 for w in (v.weight for v in variants)]
    total = math.fsum(weights)
    if total <= 0:
        return 0
    edge = 0.0
    for i, weight in enumerate(weights):
        edge += weight / total
        if fraction < edge:
            return i
    return len(weights) - 1


def variant_role(index: int) -> int:
    """ROLE_STABLE for the control (index 0), ROLE_VARIANT for the others."""
    return common_pb2.ROLE_STABLE if index == 0 else common_pb2.ROLE_VARIANT
