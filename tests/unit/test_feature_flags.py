"""Feature flags, the pure parts: the config model and its errors, sticky assignment, the flag
book's ordering, what flags do to a session's version, signed records on the sidecar's control
tailer, and the collector's flag registry and on-against-off figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaError

import outrider
from collector._config_errors import SpecError
from collector._control import ControlHistory, add_record
from collector._flag_metrics import FlagMetrics
from collector._flags import FlagRegistry
from collector._manager import PublishError
from devstack._flag_cli import parse_share as cli_share
from outrider.clock import ManualClock
from outrider.v1 import admin_pb2, common_pb2, control_pb2, events_pb2
from sidecar._config import ConfigError, SidecarConfig, parse_config
from sidecar.flags._book import FlagBook
from sidecar.flags._effects import SessionFlags
from sidecar.routing._control import ControlTailer
from sidecar.routing._router import Router
from sidecar.routing._session import Session
from sidecar.routing._versions import build_versions
from sidecar.telemetry._metrics import SidecarMetrics
from tests.support import TEST_SIGNER, signed_control

AGENT = "support-bot"
TOOL = {"name": "issue_refund", "endpoint": "http://127.0.0.1:9/tools/refund", "timeout": "1s"}
LOOKUP = {"name": "lookup_order", "endpoint": "http://127.0.0.1:9/tools/lookup", "timeout": "1s"}


def config_data(flags: list[dict[str, Any]]) -> dict[str, Any]:
    version = {
        "provider": {"base_url": "http://127.0.0.1:9/v1"},
        "model": "sim-good",
        "system_prompt": "You are a support agent.",
        "parameters": {"temperature": 0.2},
        "tools": [LOOKUP, TOOL],
        "guards": [{"guard": "pii", "action": "redact"}, {"guard": "secret", "action": "block"}],
        "fallback": [{"provider": {"base_url": "http://127.0.0.1:9/v1"}, "model": "sim-fast"}],
    }
    return {"agent": AGENT, "stable": "v1", "versions": {"v1": version}, "flags": flags}


FLAGS = [
    {"name": "refunds", "kind": "tool", "target": "issue_refund", "default": {"share": "10%"}},
    {"name": "concise", "kind": "prompt", "prompt": "Be brief.", "default": {"tenants": ["acme"]}},
    {"name": "cold", "kind": "parameters", "parameters": {"temperature": 0.0}, "default": {"share": 100}},
    {"name": "secrets", "kind": "guard", "target": "secret", "default": {"share": 0}},
]


def config(flags: list[dict[str, Any]] = FLAGS) -> SidecarConfig:
    return parse_config(config_data(flags), source="sidecar.yaml")


def session(tenant: str = "", user: str = "", nonce: str = "n1") -> Session:
    return Session(nonce, "vid", common_pb2.ROLE_STABLE, "", 0.0, user, tenant)


def flag_state(
    name: str = "refunds", generation: int = 1, epoch: int = 1, **fields: Any
) -> control_pb2.FlagState:
    return control_pb2.FlagState(agent=AGENT, name=name, generation=generation, epoch=epoch, **fields)


# -- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "error"),
    [
        ({"name": "x", "kind": "tool", "target": "nope"}, "flags[0].target: unknown tool 'nope'"),
        ({"name": "x", "kind": "guard", "target": "toxicity"}, "flags[0].target: unknown guard 'toxicity'"),
        ({"name": "x", "kind": "tool"}, "flags[0].target: required for a tool flag"),
        ({"name": "x", "kind": "prompt"}, "flags[0].prompt: required for a prompt flag"),
        (
            {"name": "x", "kind": "prompt", "prompt": "p", "target": "t"},
            "flags[0].target: a prompt flag takes no",
        ),
        (
            {"name": "x", "kind": "parameters", "parameters": {"model": "m"}},
            "flags[0].parameters.model: set by",
        ),
        ({"name": "x", "kind": "banner"}, "flags[0].kind"),
        ({"name": "x y", "kind": "prompt", "prompt": "p"}, "flags[0].name"),
        ({"name": "x", "kind": "prompt", "prompt": "p", "default": {"share": "120%"}}, "default.share"),
        ({"name": "x", "kind": "prompt", "prompt": "p", "default": {"sticky_by": "session"}}, "sticky_by"),
    ],
)
def test_feature_flag_config_errors_name_the_field(flag: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config([flag])
    assert str(caught.value).startswith("sidecar.yaml: ") and error in str(caught.value), caught.value


def test_feature_flag_config_defaults_and_duplicates() -> None:
    flags = {f.name: f for f in config().flags}
    assert flags["refunds"].default.share == pytest.approx(0.1)
    assert flags["refunds"].default.sticky_by == "tenant"
    assert flags["cold"].default.share == 1.0 and flags["concise"].default.tenants == ("acme",)
    with pytest.raises(ConfigError, match=r"flags\[1\].name: duplicate flag name 'refunds'"):
        config([FLAGS[0], FLAGS[0]])
    # flags are no part of a version's content: its id does not move
    assert config().version_ids() == config([]).version_ids()
    assert config([{"name": "p", "kind": "guard", "target": "pii"}]).flags[0].target == "pii"  # a group


# -- assignment ---------------------------------------------------------------------------


def test_feature_flag_sticky_assignment_proportions_and_tenant_list() -> None:
    book = FlagBook(AGENT, config().flags)
    tenants = [f"tenant-{i}" for i in range(4000)]
    on = [t for t in tenants if book.assignments(session(t, nonce=t + "-a"))["refunds"]]
    assert 0.085 < len(on) / len(tenants) < 0.115, len(on)
    # sticky: every session of a tenant gets the same answer, whoever the user
    for tenant in tenants[:300]:
        first = book.assignments(session(tenant, user="u1", nonce="s1"))["refunds"]
        assert book.assignments(session(tenant, user="u2", nonce="s2"))["refunds"] == first
    # the tenant list wins; other flags hash independently of this one
    assert book.assignments(session("acme"))["concise"] and not book.assignments(session("zeta"))["concise"]
    assert all(book.assignments(session(t))["cold"] for t in tenants[:50])
    assert not any(book.assignments(session(t))["secrets"] for t in tenants[:50])
    # by user: a user keeps it across tenants and sessions
    book.apply(flag_state(share=0.5, sticky_by=common_pb2.STICKY_BY_USER))
    users = [f"user-{i}" for i in range(2000)]
    by_user = {u: book.assignments(session("t1", user=u, nonce=u + "1"))["refunds"] for u in users}
    assert 0.45 < sum(by_user.values()) / len(users) < 0.55
    assert all(book.assignments(session("t2", user=u, nonce="x"))["refunds"] == v for u, v in by_user.items())


def test_feature_flag_book_orders_states_and_ignores_unknown_flags() -> None:
    book = FlagBook(AGENT, config().flags)
    acme = session("acme")
    assert book.apply(flag_state(generation=2, share=0.0, tenants=["acme"]))
    assert book.assignments(acme)["refunds"]
    assert not book.apply(flag_state(generation=1, share=1.0))  # older: ignored
    assert not book.apply(flag_state(generation=2, share=1.0))  # same: ignored
    assert book.apply(flag_state(generation=1, epoch=2, share=0.0))  # a newer epoch wins
    assert not book.assignments(acme)["refunds"]
    assert book.apply(flag_state(generation=2, epoch=2, cleared=True))  # back to the config's 10 %
    assert book.setting("refunds").share == pytest.approx(0.1)
    assert not book.apply(flag_state(name="ghost", generation=9)) and book.unknown == 1
    other = control_pb2.FlagState(agent="other-bot", name="refunds", generation=99, epoch=99, share=1.0)
    assert not book.apply(other) and book.unknown == 1


# -- effects on the version ---------------------------------------------------------------


def test_feature_flag_effects_on_tools_prompt_parameters_and_guards() -> None:
    cfg = config()
    version = next(iter(build_versions(cfg).values()))
    flags = SessionFlags(FlagBook(AGENT, cfg.flags))
    flags.book.apply(flag_state(share=0.0, tenants=["acme"]))
    off = flags.version_for(session("zeta"), version)
    on = flags.version_for(session("acme"), version)
    assert off.version_id == on.version_id == version.version_id
    names = lambda v: [t["function"]["name"] for t in v.base_payload["tools"]]  # noqa: E731
    assert names(off) == ["lookup_order"] and "issue_refund" not in off.tools
    assert names(on) == ["lookup_order", "issue_refund"] and "issue_refund" in on.tools
    fallback = off.tiers[1].target
    assert fallback is not None and [t["function"]["name"] for t in fallback.base_payload["tools"]] == [
        "lookup_order"
    ]
    # the parameters flag is on for everyone, the guard flag for no one
    assert off.base_payload["temperature"] == 0.0 and off.config.parameters["temperature"] == 0.0
    assert [r.guard.name for r in off.guards.rules if r.guard.name == "secret"] == []
    assert any(r.guard.name.startswith("pii.") for r in off.guards.rules)
    assert [r.guard.name for r in version.guards.rules if r.guard.name == "secret"] == ["secret"]
    # the prompt flag: acme's tenant list
    acme_prompt = flags.version_for(session("acme"), version).config.system_prompt
    assert (
        acme_prompt == "You are a support agent.\n\nBe brief."
        and off.config.system_prompt == version.config.system_prompt
    )
    # GetVersion's view of the session
    info = {f.name: (f.on, f.kind, f.target) for f in on.info.flags}
    assert info == {
        "refunds": (True, "tool", "issue_refund"),
        "concise": (True, "prompt", ""),
        "cold": (True, "parameters", ""),
        "secrets": (False, "guard", "secret"),
    }
    assert [t.name for t in off.info.tools] == ["lookup_order"] and json.loads(
        off.info.parameters_json["temperature"]
    ) == 0.0
    assert flags.version_for(session("acme", nonce="other"), version) is on  # built once per combination
    assert flags.off_tool_flag(session("zeta"), "issue_refund") == "refunds"
    assert flags.off_tool_flag(session("acme"), "issue_refund") is None
    assert flags.off_tool_flag(session("zeta"), "lookup_order") is None
    # an agent without flags: the version as it is
    assert SessionFlags(FlagBook(AGENT, ())).version_for(session("zeta"), version) is version


# -- signed records on the sidecar ---------------------------------------------------------


def tailer(book: FlagBook, state_path: Path | None = None) -> tuple[ControlTailer, SidecarMetrics]:
    """A control tailer that is never started: records are handed to it (no Kafka)."""
    metrics = SidecarMetrics()
    router = Router(AGENT, "stable-id", ["stable-id"])
    verifier = outrider.Verifier([TEST_SIGNER.public])
    return ControlTailer(
        "127.0.0.1:1", router, metrics, verifier=verifier, flags=book, state_path=state_path
    ), metrics


def record(
    state: control_pb2.FlagState, signer: outrider.SigningKey | None = TEST_SIGNER, key: bytes | None = None
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return signed_control(control_pb2.ControlMessage(flag=state), signer, key=key)


def test_feature_flag_signed_records_are_applied_and_forged_or_unsigned_refused() -> None:
    book = FlagBook(AGENT, config().flags)
    control, metrics = tailer(book)
    key, value, headers = record(flag_state(generation=1, share=1.0))
    assert control.handle(value, headers, key=key)
    assert book.setting("refunds").share == 1.0
    forged = [
        record(flag_state(generation=2, share=0.0), signer=outrider.SigningKey.generate()),  # unknown key
        record(flag_state(generation=3, share=0.0), signer=None),  # unsigned
        record(flag_state(generation=4, share=0.0), key=outrider.flag_key(AGENT, "concise")),  # another key
    ]
    tampered_key, _, tampered_headers = record(flag_state(generation=5, share=0.0))
    forged.append((tampered_key, flag_state(generation=6, share=0.0).SerializeToString(), tampered_headers))
    for k, v, h in forged:
        assert not control.handle(v, h, key=k)
    assert book.setting("refunds").share == 1.0 and control.rejected == 4
    reasons = {s.labels["reason"] for m in metrics.control_rejected.collect() for s in m.samples if s.value}
    assert {"unsigned", "unknown_key", "bad_key", "bad_signature"} <= reasons, reasons
    # a flag this config lacks: ignored and counted
    key, value, headers = record(flag_state(name="ghost"))
    assert not control.handle(value, headers, key=key)
    assert metrics.flag_unknown.labels(AGENT)._value.get() == 1


# -- the collector --------------------------------------------------------------------------


class _Publisher:
    def __init__(self) -> None:
        self.epoch, self.sent, self.fail = 7, [], False

    async def publish_flag(self, state: control_pb2.FlagState) -> None:
        if self.fail:
            raise KafkaError("down")
        state.epoch = self.epoch
        self.sent.append(state)


def event(
    flags: dict[str, bool], *, latency: float = 10.0, error: bool = False, session_id: str = "s"
) -> events_pb2.Event:
    e = events_pb2.Event(agent=AGENT, session_id=session_id)
    e.flags.update(flags)
    e.call.latency_ms = latency
    e.call.outcome = events_pb2.OUTCOME_ERROR if error else events_pb2.OUTCOME_OK
    return e


async def test_feature_flag_registry_publishes_generations_and_figures() -> None:
    publisher = _Publisher()
    registry = FlagRegistry(publisher, FlagMetrics(), ManualClock(1000.0))
    registry.restore([flag_state(generation=4, epoch=3), flag_state(generation=9, epoch=1)])
    request = admin_pb2.SetFlagRequest(
        agent=AGENT, name="refunds", share=0.1, sticky_by=common_pb2.STICKY_BY_TENANT, tenants=["b", "a", "a"]
    )
    status = await registry.set(request, "ci")
    state = publisher.sent[-1]
    assert (state.generation, state.epoch, list(state.tenants), state.set_by) == (5, 7, ["a", "b"], "ci")
    assert status.state == state and state.set_at_unix_nano == 1000 * 10**9
    registry.metrics.observe_all(
        [
            event({"refunds": True}, latency=100.0, session_id="a"),
            event({"refunds": False}, error=True, session_id="b"),
        ]
        + [event({"refunds": False}, latency=float(i), session_id=f"c{i % 3}") for i in range(1, 21)]
    )
    listed = registry.listing(AGENT).flags
    assert [f.state.name for f in listed] == ["refunds"]
    on, off = listed[0].arms
    assert (on.on, on.requests, on.errors, on.latency_p95_ms, on.sessions) == (True, 1, 0, 100.0, 1)
    assert (off.on, off.requests, off.errors, off.sessions) == (False, 21, 1, 4)
    assert off.error_rate == pytest.approx(1 / 21) and off.latency_p95_ms == 19.0
    cleared = await registry.clear(admin_pb2.ClearFlagRequest(agent=AGENT, name="refunds"), "ci")
    assert cleared.state.cleared and cleared.state.generation == 6 and cleared.arms[0].requests == 0
    publisher.fail = True
    with pytest.raises(PublishError):
        await registry.set(request, "ci")
    assert registry.status(AGENT, "refunds").state.generation == 6  # a failed write changed nothing
    for bad in (
        admin_pb2.SetFlagRequest(
            agent=AGENT, name="refunds", share=1.5, sticky_by=common_pb2.STICKY_BY_TENANT
        ),
        admin_pb2.SetFlagRequest(agent=AGENT, name="refunds", share=0.5),
        admin_pb2.SetFlagRequest(agent=AGENT, name="", share=0.5, sticky_by=common_pb2.STICKY_BY_USER),
    ):
        with pytest.raises(SpecError):
            await registry.set(bad, "ci")


def test_feature_flag_records_are_read_back_from_the_control_topic() -> None:
    verifier = outrider.Verifier([TEST_SIGNER.public])
    history = ControlHistory()
    for state, signer in ((flag_state(generation=3, epoch=5), TEST_SIGNER), (flag_state(generation=8), None)):
        key, value, headers = record(state, signer)
        add_record(history, verifier, outrider.SignedRecord(key, value, tuple(headers)))
    assert [(s.generation, s.epoch) for s in history.flags] == [(3, 5)] and history.max_epoch == 5


def test_feature_flag_cli_share_is_a_percentage() -> None:
    assert cli_share("10%") == pytest.approx(0.1) and cli_share("25") == 0.25 and cli_share("0%") == 0.0
    with pytest.raises(Exception, match="--share"):
        cli_share("lots")
    with pytest.raises(Exception, match="--share"):
        cli_share("150%")


async def test_feature_flag_states_are_persisted_with_the_control_state(tmp_path: Path) -> None:
    path = tmp_path / "control.json"
    book = FlagBook(AGENT, config().flags)
    control, _ = tailer(book, path)
    for state in (
        flag_state(generation=1, share=1.0),
        flag_state(generation=2, share=0.5),
        flag_state("cold"),
    ):
        key, value, headers = record(state)
        assert control.handle(value, headers, key=key)
    await control.persist()
    saved, _ = outrider.load_records(path)
    assert sorted(r.key for r in saved) == [
        outrider.flag_key(AGENT, "cold"),
        outrider.flag_key(AGENT, "refunds"),
    ]
    # a restart with Kafka away: the flags come back from disk, verified again
    fresh = FlagBook(AGENT, config().flags)
    again, _ = tailer(fresh, path)
    await again._load_persisted()
    assert fresh.setting("refunds").share == 0.5 and fresh.state("refunds").generation == 2  # type: ignore[union-attr]


async def test_feature_flag_verbs_relayed_to_the_owner_replica() -> None:
    from collector._admin import AdminService
    from collector._commands import NOT_OWNER

    class _Manager:
        ownership = None
        owner = True

        def owns(self, agent: str) -> bool:
            return self.owner

    manager = _Manager()
    publisher = _Publisher()
    service = AdminService(manager, flags=FlagRegistry(publisher, FlagMetrics(), ManualClock(5.0)))  # type: ignore[arg-type]
    request = admin_pb2.SetFlagRequest(
        agent=AGENT, name="refunds", share=0.25, sticky_by=common_pb2.STICKY_BY_USER
    )
    code, message, data = await service.handle_relayed("SetFlag", request.SerializeToString(), "token:ci")
    assert (code, message) == (0, "") and admin_pb2.FlagStatus.FromString(data).state.set_by == "token:ci"
    code, _, data = await service.handle_relayed(
        "ListFlags", admin_pb2.ListFlagsRequest(agent=AGENT).SerializeToString(), "token:watcher"
    )
    assert [f.state.generation for f in admin_pb2.ListFlagsResponse.FromString(data).flags] == [1]
    bad = admin_pb2.SetFlagRequest(
        agent=AGENT, name="refunds", share=2.0, sticky_by=common_pb2.STICKY_BY_USER
    )
    code, message, _ = await service.handle_relayed("SetFlag", bad.SerializeToString(), "token:ci")
    assert code == 3 and "share: must be in [0, 1]" in message  # INVALID_ARGUMENT naming the field
    manager.owner = False
    clear = admin_pb2.ClearFlagRequest(agent=AGENT, name="refunds")
    code, _, _ = await service.handle_relayed("ClearFlag", clear.SerializeToString(), "token:ci")
    assert code == NOT_OWNER and len(publisher.sent) == 1
