"""GlobalQuota.admit_shadow: mirrored calls are admitted only within their share of the limit,
below the priority threshold and when the bucket covers them now; refused otherwise, never
queued; `reconcile(shadow=True)` settles their budget. GlobalQuotas.admit(shadow=True) likewise."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.clock import ManualClock
from sidecar._config import GlobalQuotaConfig
from sidecar.resilience._global_quota import GlobalQuotas, QuotaRefusal, QuotaTicket
from sidecar.resilience._quota import GlobalQuota, Verdict
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.telemetry._producer import TelemetryProducer

RESOURCE = "openai/sim-divergent"
ADMIT, REFUSE = Verdict.ADMIT, Verdict.REFUSE


def quota(clock: ManualClock, **kw: float) -> GlobalQuota:
    """600 tpm over a 60 s window: a part of 600 tokens, non-priority room 480, bucket 600."""
    args: dict[str, float] = {"safe_share_tpm": 600.0, "grant_ttl_s": 30.0, "burst_s": 60.0}
    args.update(kw)
    return GlobalQuota(RESOURCE, clock=clock, **args)


def test_shadow_admission_is_capped_at_its_share_of_the_part() -> None:
    clock = ManualClock()
    q = quota(clock)
    assert q.admit_shadow(100, 0.2).verdict is ADMIT
    assert q.admit_shadow(30, 0.2).verdict is REFUSE  # 130 > 0.2 * 600
    assert q.admit_shadow(20, 0.2).verdict is ADMIT  # exactly 120
    assert q.admit_shadow(1, 0.2).verdict is REFUSE
    # user calls still have the rest of the non-priority room
    assert q.admit(300, priority=False).verdict is ADMIT
    clock.advance(61.0)  # the window forgets
    assert q.admit_shadow(120, 0.2).verdict is ADMIT


def test_shadow_admission_follows_a_grants_part_of_the_global_limit() -> None:
    clock = ManualClock()
    q = quota(clock)
    # our grant is a quarter of all grants on a 2400 tpm limit: our part is 600 tpm
    assert q.apply_grant(600.0, limit_tpm=2400.0, granted_tpm=2400.0)
    assert q.admit_shadow(120, 0.2).verdict is ADMIT
    assert q.admit_shadow(1, 0.2).verdict is REFUSE
    # a grant twice as big (half of all grants): twice the part, twice the shadow budget
    assert q.apply_grant(1200.0, limit_tpm=2400.0, granted_tpm=2400.0)
    assert q.admit_shadow(120, 0.2).verdict is ADMIT
    assert q.admit_shadow(1, 0.2).verdict is REFUSE


def test_shadow_admission_is_refused_first_above_the_priority_threshold() -> None:
    clock = ManualClock()
    q = quota(clock)
    assert q.admit(470, priority=False).verdict is ADMIT
    # 490 would pass the 80 % threshold (480): refused at once, even with a share of 1.0
    decision = q.admit_shadow(20, 1.0)
    assert decision.verdict is REFUSE and decision.retry_after_s == 0.0
    assert decision.utilisation == pytest.approx(470 / 600)
    assert q.admit_shadow(10, 1.0).verdict is ADMIT  # 480 fits
    # a user's non-priority call waits (QUEUE) where a mirrored one is refused; priority passes
    assert q.admit(10, priority=False).verdict is Verdict.QUEUE
    assert q.admit(10, priority=True).verdict is ADMIT


def test_shadow_admission_needs_the_bucket_now_and_never_puts_it_in_debt() -> None:
    clock = ManualClock()
    q = quota(clock, priority_threshold=1.0)
    assert q.admit_shadow(601, 1.0).verdict is REFUSE  # more than the bucket holds
    assert q.admit(601, priority=True).verdict is ADMIT  # a user's big call goes into debt
    assert q.admit_shadow(1, 1.0).verdict is REFUSE  # the bucket is empty
    fresh = quota(ManualClock(), priority_threshold=1.0)
    assert fresh.admit(590, priority=True).verdict is ADMIT
    assert fresh.admit_shadow(20, 1.0).verdict is REFUSE  # 10 left in the bucket
    assert fresh.admit_shadow(10, 1.0).verdict is ADMIT


def test_shadow_admission_never_queues_and_reports_no_unmet_demand() -> None:
    clock = ManualClock()
    q = quota(clock)
    verdicts = {q.admit_shadow(50, 0.2).verdict for _ in range(10)}
    assert verdicts == {ADMIT, REFUSE}
    used, demand = q.usage_report()
    assert used == pytest.approx(100.0) and demand == pytest.approx(used)  # refusals are not demand
    assert q.utilisation() == pytest.approx(100 / 600)


def test_shadow_reconcile_settles_the_shadow_budget() -> None:
    clock = ManualClock()
    q = quota(clock)
    assert q.admit_shadow(100, 0.2).verdict is ADMIT
    q.reconcile(100, 10, shadow=True)  # it used 10 of the 100 reserved
    assert q.admit_shadow(110, 0.2).verdict is ADMIT  # 10 + 110 = 120
    assert q.admit_shadow(1, 0.2).verdict is REFUSE
    used, _ = q.usage_report()
    assert used == pytest.approx(120.0)

    over = quota(ManualClock())
    assert over.admit_shadow(100, 0.2).verdict is ADMIT
    over.reconcile(100, 130, shadow=True)  # it used more than reserved: the excess counts
    assert over.admit_shadow(1, 0.2).verdict is REFUSE

    plain = quota(ManualClock())
    assert plain.admit_shadow(100, 0.2).verdict is ADMIT
    plain.reconcile(100, 10)  # settled as a user call: the shadow budget keeps the reservation
    assert plain.admit_shadow(30, 0.2).verdict is REFUSE


@pytest.mark.parametrize("tokens", [-1.0, math.nan, math.inf])
def test_shadow_admission_rejects_bad_estimates(tokens: float) -> None:
    with pytest.raises(ValueError, match="estimated_tokens"):
        quota(ManualClock()).admit_shadow(tokens, 0.2)


@settings(max_examples=200, deadline=None)
@given(
    share=st.floats(min_value=0.01, max_value=1.0),
    calls=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=400.0), st.floats(min_value=0.0, max_value=20.0)),
        max_size=40,
    ),
)
def test_shadow_admission_never_exceeds_its_share_nor_the_threshold(
    share: float, calls: list[tuple[float, float]]
) -> None:
    clock = ManualClock()
    q = quota(clock, window_s=60.0)
    admitted: list[tuple[float, float]] = []  # (time, tokens)
    for tokens, wait in calls:
        clock.advance(wait)
        decision = q.admit_shadow(tokens, share)
        assert decision.verdict in (ADMIT, REFUSE)
        if decision.verdict is ADMIT:
            admitted.append((clock.now(), tokens))
        # whatever the window still holds of the admitted calls is within both bounds
        recent = sum(t for at, t in admitted if at > clock.now() - 55.0)
        assert recent <= share * 600.0 + 1e-6
        assert recent <= 0.8 * 600.0 + 1e-6


class _Telemetry(TelemetryProducer):
    def __init__(self) -> None:
        super().__init__("127.0.0.1:1", 8, SidecarMetrics(), enabled=False)


async def test_global_quotas_admit_shadow_refuses_at_once_and_reconciles_its_budget() -> None:
    clock = ManualClock()
    configs = {RESOURCE: GlobalQuotaConfig(safe_share_tpm=600.0, queue_timeout=5.0, usage_window=60.0)}
    quotas = GlobalQuotas(
        configs,
        sidecar_id="sc-1",
        agent="support-bot",
        clock=clock,
        metrics=SidecarMetrics(),
        telemetry=_Telemetry(),
        report_interval_s=10.0,
        shadow_max_share=0.2,
    )
    deadline = time.monotonic() + 30.0
    # 600 tpm over 60 s: a shadow budget of 120 tokens; the 6 s bucket holds 60, refilling 10/s
    ticket = await quotas.admit(RESOURCE, 50, False, deadline, shadow=True)
    assert isinstance(ticket, QuotaTicket) and ticket.shadow and ticket.waited_s == 0.0
    clock.advance(6.0)
    assert isinstance(await quotas.admit(RESOURCE, 60, False, deadline, shadow=True), QuotaTicket)
    clock.advance(6.0)
    began = time.monotonic()
    refused = await quotas.admit(RESOURCE, 20, False, deadline, shadow=True)  # 130 > 120
    assert isinstance(refused, QuotaRefusal) and "mirrored" in refused.reason
    assert time.monotonic() - began < 1.0  # not queued for the 5 s queue_timeout
    quotas.reconcile(ticket, 0)  # the first used nothing: its part of the budget is back
    again = await quotas.admit(RESOURCE, 20, False, deadline, shadow=True)
    assert isinstance(again, QuotaTicket)
