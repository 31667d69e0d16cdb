"""Replica ownership in pieces: the partition of an agent, one partition's share of the state,
the order of a revoke, and a manager that decides only what it owns."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.partitioner import DefaultPartitioner

from collector import EvidenceBook, ManualClock, RollingWindows, load_spec_text
from collector._errors import NotOwner
from collector._gaps import GapTracker
from collector._manager import RolloutManager
from collector._metrics import CollectorMetrics
from collector._ownership import Ownership, partition_for
from collector._totals import AgentTotals
from outrider.v1 import common_pb2, control_pb2, events_pb2

AGENTS = [f"agent-{i}" for i in range(40)] + ["support-bot", "ünïcode", "a/b"]


def test_replica_partition_for_matches_the_kafka_default_partitioner() -> None:
    for partitions in (1, 2, 3, 4, 12):
        every = list(range(partitions))
        for agent in AGENTS:
            assert partition_for(agent, partitions) == DefaultPartitioner()(agent.encode(), every, every)
    assert len({partition_for(a, 4) for a in AGENTS}) == 4  # they spread
    with pytest.raises(ValueError, match="at least 1"):
        partition_for("x", 0)


def call(agent: str, i: int, version: str = "v1", role: int = common_pb2.ROLE_STABLE) -> events_pb2.Event:
    e = events_pb2.Event(
        event_id=f"{agent}-{i}",
        agent=agent,
        version_id=version,
        role=role,
        session_id=f"{agent}-s{i}",
        time_unix_nano=int((1000 + i) * 1e9),
        sequence=i + 1,
        sidecar_id=f"sc-{agent}",
    )
    e.call.latency_ms = 10.0 + i
    e.call.outcome = events_pb2.OUTCOME_OK
    return e


def test_replica_partial_state_moves_one_partitions_agents_and_leaves_the_rest() -> None:
    ours, theirs = RollingWindows(1, 600), RollingWindows(1, 600)
    ours_totals, theirs_totals = AgentTotals(), AgentTotals()
    ours_gaps, theirs_gaps = GapTracker(), GapTracker()
    for i in range(10):
        for agent in ("a", "b"):
            ours.add_event(call(agent, i), 1010)
            ours_totals.add_event(call(agent, i))
            ours_gaps.observe(f"sc-{agent}", agent, i + 1)
        theirs.add_event(call("b", 100 + i), 1010)  # what the other side holds of b stays
        theirs_totals.add_event(call("b", 100 + i))
    only_a = {"a"}.__contains__
    theirs.load_state(ours.to_state(only_a), only_a)
    theirs_totals.load_state(ours_totals.to_state(only_a), only_a)
    theirs_gaps.load_state(ours_gaps.to_state(only_a), only_a)
    assert theirs.snapshot("a", "v1", None, 600, 1010).requests == 10
    assert theirs.snapshot("b", "v1", None, 600, 1010).requests == 10  # its own b, not ours
    # a's seen ids came along: a redelivery is a duplicate there too; b's did not
    assert theirs.add_event(call("a", 3), 1010).name == "DUPLICATE"
    assert theirs.add_event(call("b", 3), 1010).name == "COUNTED"
    assert theirs_gaps.observe("sc-a", "a", 12) == 1  # a's sequence continued from 10
    requests = dict(theirs_totals.to_state()["counters"])["outrider_requests_total"]
    assert sorted((k[0], v) for k, v in requests) == [("a", 10.0), ("b", 10.0)]
    theirs.forget(only_a)
    theirs_totals.forget(only_a)
    assert theirs.snapshot("a", "v1", None, 600, 1010).requests == 0
    assert theirs.add_event(call("a", 3), 1010).name == "COUNTED"
    assert [k[0] for k, _ in dict(theirs_totals.to_state()["counters"])["outrider_requests_total"]] == ["b"]


def test_replica_evidence_book_moves_by_agent() -> None:
    spec = load_spec_text(
        "agent: a\nstable: s\ncandidate: c\nsteps: [{weight: 10}]\n"
        "gates: [{name: errors, metric: error_rate, max_increase: 0.05}]\n",
        "s.yaml",
    )
    book = EvidenceBook()
    for agent in ("a", "b"):
        state = control_pb2.RolloutState(
            agent=agent, rollout_id=f"r-{agent}", stable_version_id="s", candidate_version_id="c"
        )
        book.sync(state, spec)
    other = EvidenceBook()
    other.load_state(book.to_state({"b"}.__contains__), {"b"}.__contains__)
    assert other.get("b") is not None and other.get("b").rollout_id == "r-b"  # type: ignore[union-attr]
    assert other.get("a") is None
    book.forget({"a"}.__contains__)
    assert book.get("a") is None and book.get("b") is not None


async def test_replica_ownership_revoke_stops_deciding_at_once() -> None:
    ownership = Ownership()
    assert not ownership.settled and not ownership.owns("support-bot")
    mine = partition_for("support-bot", 4)
    ownership.assigning({mine}, 4)
    assert ownership.restoring("support-bot") and not ownership.owns("support-bot")
    waiting = asyncio.create_task(ownership.wait_restored("support-bot", 5.0))
    await asyncio.sleep(0.1)
    ownership.mark_ready({mine})
    assert await waiting is True and ownership.settled and ownership.since("support-bot") is not None
    ownership.revoke({mine})
    assert not ownership.owns("support-bot") and ownership.since("support-bot") is None
    ownership.mark_ready({mine})  # a restore that finishes after its revoke changes nothing
    assert not ownership.owns("support-bot")
    assert ownership.agents_of({mine})("support-bot") and not ownership.agents_of({(mine + 1) % 4})(
        "support-bot"
    )


class Publisher:
    def __init__(self) -> None:
        self.written: list[control_pb2.RolloutState] = []
        self.latest: dict[str, object] = {}

    async def publish(self, state: control_pb2.RolloutState) -> None:
        self.written.append(state)


async def test_replica_manager_decides_and_commands_only_what_it_owns() -> None:
    ownership = Ownership()
    publisher = Publisher()
    manager = RolloutManager(
        publisher, RollingWindows(1, 600), CollectorMetrics(), ManualClock(), ownership=ownership
    )  # type: ignore[arg-type]
    text = (
        "agent: {a}\nstable: s\ncandidate: c\nsteps: [{{weight: 10, min_duration: 0s}}]\n"
        "gates: [{{name: errors, metric: error_rate, max_increase: 0.05}}]\n"
    )
    spec = load_spec_text(text.format(a="support-bot"), "s.yaml")
    ownership.assigning({partition_for("support-bot", 4)}, 4)  # restoring: not decided yet
    with pytest.raises(NotOwner, match="does not own agent 'support-bot'"):
        await manager.start(spec, text, "ops")
    ownership.mark_ready({partition_for("support-bot", 4)})
    await manager.start(spec, text, "ops")
    assert [s.generation for s in publisher.written] == [1]
    ownership.revoke({partition_for("support-bot", 4)})
    assert await manager.tick() == []  # no look for an agent handed back
    with pytest.raises(NotOwner):
        await manager.abort("support-bot", "late", "ops")
    manager.release(ownership.agents_of({partition_for("support-bot", 4)}))
    assert manager.get("support-bot") is None and len(publisher.written) == 1
