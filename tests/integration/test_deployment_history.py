"""Deployment history: the record of every ended rollout, on `outrider.deployments` and in the
collector's state_dir, through the real CLI (`outrider rollout history | show`) against real
collectors on the embedded broker (ports picked at run time). Time-dependent parts (the
baseline after a promotion) run on the collector's injectable clock."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaConsumer
from google.protobuf import json_format

import outrider
from collector import Collector
from collector._deployments import sign_record
from devstack.broker import EmbeddedBroker
from outrider.clock import ManualClock
from outrider.v1 import admin_pb2, control_pb2, deployment_pb2
from tests.integration.test_collector_service import (
    AGENT,
    CANDIDATE_V,
    STABLE_V,
    admin_client,
    make_event,
    produce_mix,
    producer,
    send,
    settings_for,
    spec_yaml,
    versions_reported,
)
from tests.integration.test_rollout_verbs_cli import cli
from tests.support import ADMIN_TOKEN, TEST_SIGNER

pytestmark = pytest.mark.broker

PROMOTED = control_pb2.ROLLOUT_PHASE_PROMOTED
ROLLED_BACK = control_pb2.ROLLOUT_PHASE_ROLLED_BACK
ABORTED = control_pb2.ROLLOUT_PHASE_ABORTED


@pytest.fixture(autouse=True)
def _operator_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTRIDER_ADMIN_TOKEN", ADMIN_TOKEN)


def with_baseline(text: str, baseline: str) -> str:
    spec = yaml.safe_load(text)
    spec["baseline"] = baseline
    return yaml.safe_dump(spec)


async def until(predicate: Callable[[], object], within: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        await asyncio.sleep(0.05)


async def topic_records(
    bootstrap: str, until_: Callable[[list[outrider.SignedRecord]], bool], within: float = 20.0
) -> list[outrider.SignedRecord]:
    """Every record on `outrider.deployments`, read from the beginning until `until_` holds."""
    consumer = AIOKafkaConsumer(
        outrider.DEPLOYMENTS_TOPIC, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    found: list[outrider.SignedRecord] = []
    await consumer.start()
    try:
        deadline = time.monotonic() + within
        while not until_(found):
            assert time.monotonic() < deadline, f"timed out; the topic had {len(found)} records"
            for records in (await consumer.getmany(timeout_ms=200)).values():
                found += [outrider.SignedRecord(r.key, r.value, tuple(r.headers or ())) for r in records]
    finally:
        await consumer.stop()
    return found


def decoded(records: list[outrider.SignedRecord]) -> list[deployment_pb2.DeploymentRecord]:
    verifier = outrider.Verifier([TEST_SIGNER.public])
    out = []
    for signed in records:
        verdict = verifier.verify(signed.key, signed.value, signed.headers)
        assert verdict.ok and verdict.signed, verdict
        out.append(deployment_pb2.DeploymentRecord.FromString(signed.value))
    return out


async def test_history_after_rollback_records_spec_stages_gates_and_show_json_round_trips(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    spec = spec_yaml(min_duration="10m")
    async with (
        producer(broker) as p,
        Collector(settings_for(broker, state_dir=tmp_path)) as collector,
        admin_client(collector) as admin,
    ):
        await versions_reported(broker, collector)
        started = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=spec, requested_by="t"))
        rollout_id = started.state.rollout_id
        await produce_mix(p, 150, candidate_error_every=3, rollout_id=rollout_id)
        await until(lambda: collector.history.get(rollout_id) is not None, what="the record")
        addr = ["--admin", collector.admin_address]

        listed = await cli("rollout", "history", AGENT, *addr)
        assert listed.exit_code == 0, listed.output
        header, row = listed.output.splitlines()[:2]
        assert header.split()[:3] == ["ROLLOUT", "STABLE", "->"]
        assert row.startswith(rollout_id) and f"{STABLE_V} -> {CANDIDATE_V}" in row
        assert "rolled back" in row and row.rstrip().endswith("controller")

        shown = await cli("rollout", "show", rollout_id, "--json", *addr)
        assert shown.exit_code == 0, shown.output
        record = json_format.ParseDict(json.loads(shown.output), deployment_pb2.DeploymentRecord())
        assert record == await admin.GetDeployment(admin_pb2.GetDeploymentRequest(rollout_id=rollout_id))

        assert record.outcome == ROLLED_BACK and record.agent == AGENT and record.spec_yaml == spec
        assert record.decided_by == "controller" and "gate errors found harm" in record.reason
        assert [d.phase for d in record.decisions] == [control_pb2.ROLLOUT_PHASE_RUNNING, ROLLED_BACK]
        assert record.decisions[0].decided_by == "token:ci"
        harm = next(g for g in record.decisions[-1].gate_results if g.name == "errors")
        assert harm.verdict == "harm" and 0 < harm.lower <= harm.estimate <= harm.upper
        assert harm.margin == pytest.approx(0.05) and harm.candidate_samples > 0
        (stage,) = record.stages
        assert stage.step_index == 0 and stage.candidate_weight == pytest.approx(0.1)
        assert stage.ended == "rolled_back" and stage.decided_by == "controller"
        assert stage.entered_at_unix_nano == record.started_at_unix_nano
        assert stage.left_at_unix_nano == record.ended_at_unix_nano
        assert record.duration_s > 0 and stage.duration_s == pytest.approx(record.duration_s)
        assert not record.baseline_s  # no baseline after a rollback

        text = await cli("rollout", "show", rollout_id, *addr)
        assert text.exit_code == 0, text.output
        assert f"rollout     {rollout_id}  (agent {AGENT})" in text.output
        assert "outcome     rolled back" in text.output and "gate errors: harm" in text.output
        assert "% points" in text.output and "baseline    none" in text.output
        assert "  agent: support-bot" in text.output  # the spec, as submitted

        missing = await cli("rollout", "show", "feedfacecafe", *addr)
        assert missing.exit_code == 5 and "NOT_FOUND" in missing.output
        assert "no deployment record for rollout 'feedfacecafe'" in missing.output
        none = await cli("rollout", "history", "nobody", *addr)
        assert none.exit_code == 0 and "no ended rollouts of nobody" in none.output

        on_topic = decoded(await topic_records(broker.bootstrap_servers, lambda found: bool(found)))
        assert on_topic[-1].rollout_id == rollout_id and on_topic[-1] == record
        saved = json.loads((tmp_path / "deployments" / f"{rollout_id}.json").read_text())
        assert saved["readable"]["rollout_id"] == rollout_id


async def test_history_after_abort_and_promote_newest_first(broker: EmbeddedBroker) -> None:
    async with Collector(settings_for(broker)) as collector, admin_client(collector) as admin:
        addr = ["--admin", collector.admin_address]
        slow = spec_yaml(min_duration="10m", gate_samples=10_000)
        await versions_reported(broker, collector)
        first = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=slow))
        aborted = await cli("rollout", "abort", AGENT, "--reason", "wrong build", *addr)
        assert aborted.exit_code == 0, aborted.output
        second = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=slow))
        promoted = await cli("rollout", "promote", AGENT, "--reason", "urgent fix", *addr)
        assert promoted.exit_code == 0, promoted.output

        listed = await cli("rollout", "history", AGENT, "--json", *addr)
        assert listed.exit_code == 0, listed.output
        rows = json.loads(listed.output)["deployments"]
        assert [r["rollout_id"] for r in rows] == [second.state.rollout_id, first.state.rollout_id]
        assert [r["outcome"] for r in rows] == ["ROLLOUT_PHASE_PROMOTED", "ROLLOUT_PHASE_ABORTED"]
        assert {r["decided_by"] for r in rows} == {"token:ci"}

        abort = await admin.GetDeployment(admin_pb2.GetDeploymentRequest(rollout_id=first.state.rollout_id))
        assert abort.outcome == ABORTED and abort.reason == "aborted: wrong build"
        assert [s.ended for s in abort.stages] == ["aborted"] and abort.stages[0].decided_by == "token:ci"
        assert abort.decisions[-1].gate_results  # what the gates said when it was stopped
        promote = await admin.GetDeployment(
            admin_pb2.GetDeploymentRequest(rollout_id=second.state.rollout_id)
        )
        assert promote.outcome == PROMOTED and "operator override at step 1" in promote.reason
        assert [s.ended for s in promote.stages] == ["promoted"]
        # the default baseline (10m) is capped at what this collector keeps (retention_s 120)
        assert promote.baseline_s == 120 and not promote.HasField("baseline")
        assert promote.baseline_due_unix_nano == promote.ended_at_unix_nano + 120 * 10**9
        text = await cli("rollout", "show", second.state.rollout_id, *addr)
        assert "baseline    pending: 2m at full traffic" in text.output

        records = await topic_records(broker.bootstrap_servers, lambda found: len(found) >= 2)
        assert {r.rollout_id for r in decoded(records)} == {first.state.rollout_id, second.state.rollout_id}


async def test_history_refuses_a_baseline_longer_than_retention(broker: EmbeddedBroker) -> None:
    async with Collector(settings_for(broker)) as collector, admin_client(collector) as admin:
        import grpc

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.StartRollout(
                admin_pb2.StartRolloutRequest(
                    spec_yaml=with_baseline(spec_yaml(), "10m"), source_name="r.yaml"
                )
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "r.yaml: baseline: 600s exceeds what this collector keeps (retention_s 120s)" in (
            refused.value.details() or ""
        )


async def test_history_forged_records_are_not_shown(broker: EmbeddedBroker) -> None:
    async with (
        producer(broker) as p,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        await versions_reported(broker, collector)
        started = await admin.StartRollout(
            admin_pb2.StartRolloutRequest(spec_yaml=spec_yaml(min_duration="10m", gate_samples=10_000))
        )
        await admin.AbortRollout(admin_pb2.AbortRolloutRequest(agent=AGENT, reason="real"))
        genuine = started.state.rollout_id
        await until(lambda: collector.history.get(genuine) is not None)

        def forged(rollout_id: str, reason: str) -> deployment_pb2.DeploymentRecord:
            return deployment_pb2.DeploymentRecord(
                rollout_id=rollout_id,
                agent=AGENT,
                outcome=PROMOTED,
                reason=reason,
                decided_by="controller",
                revision=9,  # would win over the genuine one if it were believed
                started_at_unix_nano=time.time_ns(),
            )

        intruder = outrider.SigningKey.generate()
        unsigned = forged("f0f0f0f0f0f0", "unsigned")
        other_key = sign_record(forged(genuine, "other key"), intruder)
        # genuinely signed, but under another rollout's key than the record names
        value = forged("a1a1a1a1a1a1", "keyed as another rollout").SerializeToString()
        wrong_key = outrider.SignedRecord(
            b"b2b2b2b2b2b2", value, tuple(TEST_SIGNER.sign(b"b2b2b2b2b2b2", value))
        )
        await p.send_and_wait(outrider.DEPLOYMENTS_TOPIC, unsigned.SerializeToString(), key=b"f0f0f0f0f0f0")
        await p.send_and_wait(
            outrider.DEPLOYMENTS_TOPIC, other_key.value, key=other_key.key, headers=list(other_key.headers)
        )
        await p.send_and_wait(
            outrider.DEPLOYMENTS_TOPIC, wrong_key.value, key=b"b2b2b2b2b2b2", headers=list(wrong_key.headers)
        )
        rejected = collector.metrics.deployment_records.labels("rejected")
        await until(lambda: rejected._value.get() >= 3, what="three rejections")

        listed = await cli("rollout", "history", AGENT, "--json", "--admin", collector.admin_address)
        rows = json.loads(listed.output)["deployments"]
        assert [(r["rollout_id"], r["reason"]) for r in rows] == [(genuine, "aborted: real")]
        for rollout_id in ("f0f0f0f0f0f0", "a1a1a1a1a1a1", "b2b2b2b2b2b2"):
            shown = await cli("rollout", "show", rollout_id, "--admin", collector.admin_address)
            assert shown.exit_code == 5 and "NOT_FOUND" in shown.output


async def test_history_survives_a_restart_and_an_empty_new_broker(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    clock = ManualClock(time.time())
    async with (
        Collector(settings_for(broker, state_dir=tmp_path), clock=clock) as first,
        admin_client(first) as admin,
    ):
        slow = with_baseline(spec_yaml(min_duration="10m", gate_samples=10_000), "30s")
        await versions_reported(broker, first)
        aborted = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=slow))
        await admin.AbortRollout(admin_pb2.AbortRolloutRequest(agent=AGENT, reason="first"))
        promoted = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=slow))
        await admin.PromoteRollout(admin_pb2.PromoteRolloutRequest(agent=AGENT, reason="ship"))
        ids = {aborted.state.rollout_id, promoted.state.rollout_id}
        await topic_records(broker.bootstrap_servers, lambda found: {r.key.decode() for r in found} >= ids)
    files = {p.stem for p in (tmp_path / "deployments").glob("*.json")}
    assert files == ids
    pending = promoted.state.rollout_id

    # a new, empty broker: the records come back from state_dir, are served and written again,
    # and the promotion's baseline, due while the collector was down, is taken at once
    clock.advance(31)
    with EmbeddedBroker() as fresh:
        async with (
            Collector(settings_for(fresh, state_dir=tmp_path, group_id="second"), clock=clock) as second,
            admin_client(second) as admin,
        ):
            listed = await admin.ListDeployments(admin_pb2.ListDeploymentsRequest(agent=AGENT))
            assert [d.rollout_id for d in listed.deployments] == [pending, aborted.state.rollout_id]
            await until(lambda: second.history.get(pending).HasField("baseline"), what="the baseline")  # type: ignore[union-attr]
            records = await topic_records(
                fresh.bootstrap_servers,
                lambda found: (
                    any(d.rollout_id == pending and d.HasField("baseline") for d in decoded(found))
                    and aborted.state.rollout_id in {r.key.decode() for r in found if r.key}
                ),
            )
            assert records
            # another replica without a state_dir learns the history from the topic alone
            async with (
                Collector(settings_for(fresh, group_id="third")) as third,
                admin_client(third) as viewer,
            ):
                await until(lambda: len(third.history) == 2, what="the replica's tail")
                record = await viewer.GetDeployment(admin_pb2.GetDeploymentRequest(rollout_id=pending))
                assert record.HasField("baseline") and record.revision == 2
                assert not third.history.mine  # it wrote nothing: it ended no rollout


async def test_history_baseline_snapshot_after_promotion_on_a_virtual_clock(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    clock = ManualClock(time.time())
    async with (
        producer(broker) as p,
        Collector(settings_for(broker, state_dir=tmp_path), clock=clock) as collector,
        admin_client(collector) as admin,
    ):
        spec = with_baseline(spec_yaml(min_duration="10m", gate_samples=10_000), "60s")
        await versions_reported(broker, collector)
        started = await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=spec))
        rollout_id = started.state.rollout_id
        await admin.PromoteRollout(admin_pb2.PromoteRolloutRequest(agent=AGENT, reason="go"))
        await until(lambda: collector.history.get(rollout_id) is not None)
        record = collector.history.get(rollout_id)
        assert record is not None and record.baseline_s == 60 and not record.HasField("baseline")

        # the new stable at full traffic: 40 calls, every 4th failing, 100 ms each
        for i in range(40):
            event = make_event(canary=True, error=i % 4 == 0, latency_ms=100.0, rollout_id=rollout_id)
            await send(p, event)

        def counted() -> int:
            return collector.windows.snapshot(AGENT, CANDIDATE_V, None, 60, clock.now()).requests

        await until(lambda: counted() == 40, what="the events in the windows")
        clock.advance(30)
        await asyncio.sleep(0.5)  # ticks run; the baseline is not due yet
        assert not collector.history.get(rollout_id).HasField("baseline")  # type: ignore[union-attr]
        clock.advance(31)
        await until(lambda: collector.history.get(rollout_id).HasField("baseline"), what="the baseline")  # type: ignore[union-attr]
        taken = collector.history.get(rollout_id)
        assert taken is not None and taken.revision == 2
        baseline = taken.baseline
        assert baseline.version_id == CANDIDATE_V and baseline.requests == 40 and baseline.errors == 10
        assert baseline.error_rate == pytest.approx(0.25) and not baseline.partial
        assert baseline.latency_p95_ms == pytest.approx(100, rel=0.05)
        assert baseline.to_unix_nano - baseline.from_unix_nano == 60 * 10**9

        shown = await cli("rollout", "show", rollout_id, "--admin", collector.admin_address)
        assert shown.exit_code == 0, shown.output
        assert f"baseline    {CANDIDATE_V} over 1m" in shown.output
        assert "40 requests, 10 errors (25.00%)" in shown.output
        on_topic = await topic_records(
            broker.bootstrap_servers, lambda found: any(d.HasField("baseline") for d in decoded(found))
        )
        assert decoded(on_topic)[-1] == taken  # the last record of the key wins under compaction


async def test_history_rpcs_need_a_credential_and_a_viewer_may_read(broker: EmbeddedBroker) -> None:
    import grpc

    from tests.integration.test_admin_auth import raw_call
    from tests.support import VIEWER_TOKEN, admin_channel, bearer

    async with (
        Collector(settings_for(broker)) as collector,
        admin_channel(collector.admin_address, None) as ch,
    ):
        listing = admin_pb2.ListDeploymentsRequest(agent=AGENT).SerializeToString()
        getting = admin_pb2.GetDeploymentRequest(rollout_id="feedfacecafe").SerializeToString()
        for method, payload in (("ListDeployments", listing), ("GetDeployment", getting)):
            assert await raw_call(ch, method, payload) == grpc.StatusCode.UNAUTHENTICATED
            assert await raw_call(ch, method, payload, bearer("wrong")) == grpc.StatusCode.UNAUTHENTICATED
            # a viewer gets in; an empty request is judged, and named
            assert await raw_call(ch, method, b"", bearer(VIEWER_TOKEN)) == grpc.StatusCode.INVALID_ARGUMENT
        assert await raw_call(ch, "ListDeployments", listing, bearer(VIEWER_TOKEN)) == grpc.StatusCode.OK
        assert await raw_call(ch, "GetDeployment", getting, bearer(VIEWER_TOKEN)) == grpc.StatusCode.NOT_FOUND
        bad_limit = admin_pb2.ListDeploymentsRequest(agent=AGENT, limit=-1).SerializeToString()
        assert await raw_call(ch, "ListDeployments", bad_limit, bearer(VIEWER_TOKEN)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
