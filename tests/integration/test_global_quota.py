"""Three real sidecars share one global tokens-per-minute limit through a real collector
and the embedded broker, under uneven demand (the scenario is `tests.bench.global_quota`;
`scripts/bench global-quota --seconds 60` runs it longer).

A and B are busy from the start (4 closed-loop callers each, demand far above the limit),
C is idle; after ``PHASE_S`` C gets callers too; after another, A's callers stop. Half the
callers use ``priority=True``, so the whole share may be used (non-priority work is held
below 80 % of the share): the limit is a fair target and we can ask that it be used, not
just respected.
"""

from __future__ import annotations

import pytest

from collector._quota import DEFAULT_HEADROOM
from devstack.broker import EmbeddedBroker
from tests.bench.global_quota import GRANT_INTERVAL_S, LIMIT_TPM, MIN_SHARE_TPM, SIDECARS, run_scenario

pytestmark = pytest.mark.broker

PHASE_S = 5.0  # each phase: its first grant period settles, the other four are measured
MAX_OVERSHOOT = 0.05  # the issue: admitted tokens within 5 % of the limit
MIN_USE = 0.6  # and the limit is used: at least 60 % of it (typically ~99 %)


async def test_three_sidecars_share_one_limit_and_an_idle_share_moves(broker: EmbeddedBroker) -> None:
    result = await run_scenario(broker.bootstrap_servers, PHASE_S)
    idle, busy, a_idle = result.phases
    summary = result.summary()
    print(f"\nglobal-quota overshoot (admitted/limit - 1): {summary['overshoot']:+.4f}")
    for name, phase in summary["phases"].items():
        print(f"  {name}: overshoot {phase['overshoot']:+.4f}, tokens/s {phase['admitted_tokens_per_s']}")
    for grant in summary["grants"]:
        print(f"  grant {grant}")

    # the grants: every one sums to at most the limit, and there is one per grant period
    assert result.grants, "no grant read from outrider.control"
    generations = [g.generation for _, g in result.grants]
    assert generations == sorted(set(generations))
    for _, grant in result.grants:
        assert sum(grant.grants_tpm.values()) <= LIMIT_TPM * (1 + 1e-9), grant
    for phase in (idle, busy):
        seen = result.grants_in(phase)
        start, end = phase.measured()
        assert len(seen) >= int((end - start) / GRANT_INTERVAL_S) - 1, (phase.name, len(seen))

    # C idle: its share is the minimum (plus at most its headroom, handed out only when A's or
    # B's reported demand dips below the limit, as it may on a busy machine), A and B hold
    # the rest of the limit
    for grant in result.grants_in(idle):
        assert set(grant.grants_tpm) == set(SIDECARS), grant
        assert grant.grants_tpm["sc-c"] <= (1 + DEFAULT_HEADROOM) * MIN_SHARE_TPM + 1e-6, grant
        assert grant.grants_tpm["sc-a"] + grant.grants_tpm["sc-b"] >= 0.95 * LIMIT_TPM, grant
    assert result.rate_per_s(idle, "sc-c") == 0
    # C busy: its share grows out of A's and B's
    last = result.grants_in(busy)[-1]
    assert last.grants_tpm["sc-c"] > 1.5 * MIN_SHARE_TPM, last
    assert result.rate_per_s(busy, "sc-c") > 0
    # A idle: within the usage window its share falls to the minimum and moves to B and C
    last = result.grants_in(a_idle)[-1]
    assert last.grants_tpm["sc-a"] <= MIN_SHARE_TPM + 1e-6, last
    assert last.grants_tpm["sc-b"] + last.grants_tpm["sc-c"] >= 0.95 * LIMIT_TPM, last

    # the tokens admitted across all three, in steady state: within 5 % of the limit, and used
    for phase in (idle, busy, a_idle):
        use = 1.0 + result.overshoot(phase)
        assert use <= 1.0 + MAX_OVERSHOOT, (phase.name, summary["phases"][phase.name])
        assert use >= MIN_USE, (phase.name, summary["phases"][phase.name])
