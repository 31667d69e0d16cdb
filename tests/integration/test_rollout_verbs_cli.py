"""The `outrider rollout` verbs, `start --wait`, `status`, `watch` and webhook notifications,
through the real CLI (click's runner, in a thread) against a real collector on the embedded
broker: real gRPC, a real aiohttp webhook server, every port picked at run time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from collector import Collector
from devstack.broker import EmbeddedBroker
from devstack.cli import main
from outrider.v1 import admin_pb2, control_pb2
from tests.integration.test_collector_service import (
    AGENT,
    CANDIDATE_V,
    admin_client,
    make_event,
    produce_mix,
    producer,
    send,
    settings_for,
    spec_yaml,
    versions_reported,
)
from tests.support import ADMIN_TOKEN

pytestmark = pytest.mark.broker


@pytest.fixture(autouse=True)
def _operator_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI (in-process and in subprocesses) authenticates as the tests' operator, "ci"."""
    monkeypatch.setenv("OUTRIDER_ADMIN_TOKEN", ADMIN_TOKEN)


HOLD = control_pb2.ROLLOUT_PHASE_HOLD
RUNNING = control_pb2.ROLLOUT_PHASE_RUNNING


async def cli(*args: str) -> Result:
    """`outrider ARGS` in a worker thread, so the collector's loop keeps serving meanwhile."""
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), catch_exceptions=False)


def write_spec(tmp_path: Path, **kwargs: Any) -> str:
    path = tmp_path / "rollout.yaml"
    path.write_text(spec_yaml(**kwargs), encoding="utf-8")
    return str(path)


@contextlib.asynccontextmanager
async def webhook() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback webhook server: /ok takes every body, /flaky answers 503 once then 200, /gone
    always 404. Yields its base URL and the bodies /ok and /flaky took."""
    received: list[dict[str, Any]] = []
    flaky_calls = 0

    async def ok(request: web.Request) -> web.Response:
        received.append({"path": "ok", **(await request.json())})
        return web.json_response({"ok": True})

    async def flaky(request: web.Request) -> web.Response:
        nonlocal flaky_calls
        flaky_calls += 1
        if flaky_calls == 1:
            return web.Response(status=503)
        received.append({"path": "flaky", **(await request.json())})
        return web.Response(text="ok")

    async def gone(request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.add_routes([web.post("/ok", ok), web.post("/flaky", flaky), web.post("/gone", gone)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


async def until(predicate: Any, within: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def notification_count(collector: Collector, result: str) -> float:
    return collector.metrics.notifications.labels(result)._value.get()


async def test_verbs_record_who_and_why_refuse_wrong_states_and_notify(
    broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USER", "alice")
    async with webhook() as (base, received):
        targets = [{"url": f"{base}/ok"}, {"url": f"{base}/flaky", "timeout": "2s"}, {"url": f"{base}/gone"}]
        async with Collector(settings_for(broker, notify=targets)) as collector:
            admin = ["--admin", collector.admin_address]
            spec = write_spec(tmp_path, min_duration="10m")
            missing = await cli("rollout", "pause", AGENT, "--reason", "x", *admin)
            assert missing.exit_code == 5 and "NOT_FOUND" in missing.output
            await versions_reported(broker, collector)
            started = await cli("rollout", "start", spec, *admin)
            assert started.exit_code == 0, started.output
            assert "(by token:ci)" in started.output

            paused = await cli("rollout", "pause", AGENT, "--reason", "ticket 42", *admin)
            assert paused.exit_code == 0, paused.output
            assert "phase       on hold" in paused.output
            assert "paused by token:ci: ticket 42" in paused.output
            assert "released by an operator's resume" in paused.output
            again = await cli("rollout", "pause", AGENT, "--reason", "twice", *admin)
            assert again.exit_code == 5 and "FAILED_PRECONDITION" in again.output

            resumed = await cli("rollout", "resume", AGENT, "--reason", "false alarm", *admin)
            assert resumed.exit_code == 0 and "resumed by token:ci: false alarm" in resumed.output
            not_held = await cli("rollout", "resume", AGENT, "--reason", "twice", *admin)
            assert not_held.exit_code == 5 and "not on HOLD" in not_held.output
            no_reason = await cli("rollout", "promote", AGENT, *admin)
            assert no_reason.exit_code == 2 and "--reason" in no_reason.output

            promoted = await cli("rollout", "promote", AGENT, "--reason", "ship it", "--json", *admin)
            assert promoted.exit_code == 0, promoted.output
            state = json.loads(promoted.output)["state"]
            assert state["phase"] == "ROLLOUT_PHASE_PROMOTED" and state["decided_by"] == "token:ci"
            assert "operator override" in state["reason"] and "ship it" in state["reason"]
            late = await cli("rollout", "abort", AGENT, "--reason", "too late", *admin)
            assert (
                late.exit_code == 5
                and "FAILED_PRECONDITION" in late.output
                and "already ended" in late.output
            )

            # a new rollout, aborted: ABORTED is told too
            assert (await cli("rollout", "start", spec, *admin)).exit_code == 0
            aborted = await cli("rollout", "abort", AGENT, "--reason", "wrong candidate", *admin)
            assert aborted.exit_code == 0 and "phase       aborted" in aborted.output

            # HOLD, PROMOTED, ABORTED to /ok and (after one 503) to /flaky; /gone counts as failed
            await until(lambda: len(received) == 6 and notification_count(collector, "failed") == 3)
            assert notification_count(collector, "sent") == 6
    by_path = {p: [b for b in received if b["path"] == p] for p in ("ok", "flaky")}
    for bodies in by_path.values():
        assert [b["phase"] for b in bodies] == ["hold", "promoted", "aborted"]
    hold, promote, abort = by_path["ok"]
    assert hold["agent"] == AGENT and hold["decided_by"] == "token:ci" and "ticket 42" in hold["reason"]
    assert (
        hold["release"] == "an operator's resume" and "HOLD" in hold["text"] and hold["text"].count("\n") == 0
    )
    assert promote["weight"] == 1.0 and promote["generation"] > hold["generation"]
    assert abort["rollout_id"] != promote["rollout_id"] and abort["weight"] == 0
    assert {g["name"] for g in hold["gates"]} >= {"errors", "latency"}


async def test_notify_a_controller_rollback_with_gate_verdicts(broker: EmbeddedBroker) -> None:
    async with (
        webhook() as (base, received),
        producer(broker) as p,
        Collector(settings_for(broker, notify=[{"url": f"{base}/ok"}])) as collector,
        admin_client(collector) as admin,
    ):
        await versions_reported(broker, collector)
        started = await admin.StartRollout(
            admin_pb2.StartRolloutRequest(spec_yaml=spec_yaml(min_duration="10m"), requested_by="test")
        )
        await produce_mix(p, 150, candidate_error_every=3, rollout_id=started.state.rollout_id)
        await until(lambda: len(received) == 1)
    body = received[0]
    assert body["phase"] == "rolled_back" and body["decided_by"] == "controller"
    assert "rolled back" in body["text"].lower().replace("_", " ")
    errors = next(g for g in body["gates"] if g["name"] == "errors")
    assert errors["verdict"] == "harm" and errors["lower"] > 0 and errors["candidate_samples"] > 0


async def test_wait_exit_codes(broker: EmbeddedBroker, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent: support-bot\nsteps: nope\n", encoding="utf-8")
    async with (
        producer(broker) as p,
        Collector(settings_for(broker)) as collector,
        admin_client(collector) as admin,
    ):
        admin_flag = ["--admin", collector.admin_address]
        await versions_reported(broker, collector)
        spec = write_spec(tmp_path, min_duration="10m")
        wait = ["rollout", "start", spec, "--wait", "--poll-interval", "100ms", *admin_flag]

        # 4: bad input, from the collector (the spec) or the command line
        invalid = await cli("rollout", "start", str(bad), "--wait", *admin_flag)
        assert invalid.exit_code == 4 and "INVALID_ARGUMENT" in invalid.output
        assert (await cli(*wait, "--timeout", "soon")).exit_code == 4
        assert (await cli(*wait, "--no-such-flag")).exit_code == 4
        assert (await cli("rollout", "start", str(tmp_path / "none.yaml"), "--wait")).exit_code == 4

        # 3: still running when the timeout ran out; then still on HOLD
        timed_out = await cli(*wait, "--timeout", "1s")
        assert timed_out.exit_code == 3 and "still running" in timed_out.output
        await admin.PauseRollout(admin_pb2.PauseRolloutRequest(agent=AGENT, reason="x", requested_by="t"))
        await admin.AbortRollout(admin_pb2.AbortRolloutRequest(agent=AGENT, reason="next", requested_by="t"))

        async def waiting_for(verb: str, *extra: str) -> Result:
            task = asyncio.create_task(cli(*wait, "--timeout", "60s", *extra))
            await until(lambda: (ctl := collector.rollouts.get(AGENT)) is not None and ctl.running)
            request = {"agent": AGENT, "reason": "test", "requested_by": "t"}
            if verb == "promote":
                await admin.PromoteRollout(admin_pb2.PromoteRolloutRequest(**request))
            elif verb == "abort":
                await admin.AbortRollout(admin_pb2.AbortRolloutRequest(**request))
            else:  # a candidate that fails every third call: the controller rolls it back
                ctl = collector.rollouts.get(AGENT)
                assert ctl is not None and ctl.state is not None
                await produce_mix(p, 150, candidate_error_every=3, rollout_id=ctl.state.rollout_id)
            return await task

        promoted = await waiting_for("promote", "--json")
        assert promoted.exit_code == 0, promoted.output
        outcome = json.loads(promoted.stdout)  # one document: the outcome
        assert (
            outcome["state"]["phase"] == "ROLLOUT_PHASE_PROMOTED" and outcome["view"]["phase"] == "promoted"
        )
        aborted = await waiting_for("abort")
        assert aborted.exit_code == 2 and "phase       aborted" in aborted.output
        assert "waiting: support-bot aborted" in aborted.stderr and "phase" not in aborted.stderr
        rolled_back = await waiting_for("rollback")
        assert rolled_back.exit_code == 1, rolled_back.output
        assert "phase       rolled back" in rolled_back.output


async def test_status_and_watch_show_the_live_evaluation(broker: EmbeddedBroker, tmp_path: Path) -> None:
    async with producer(broker) as p, Collector(settings_for(broker)) as collector:
        admin = ["--admin", collector.admin_address]
        await versions_reported(broker, collector)
        assert (
            await cli("rollout", "start", write_spec(tmp_path, min_duration="10m"), *admin)
        ).exit_code == 0
        ctl = collector.rollouts.get(AGENT)
        assert ctl is not None and ctl.state is not None
        rollout_id = ctl.state.rollout_id

        fresh = await cli("rollout", "status", AGENT, *admin)
        assert fresh.exit_code == 0
        assert "WARNING     no sidecar has reported serving the candidate version" in fresh.output
        assert "WAITING" in fresh.output and "window: since the rollout started" in fresh.output

        for _ in range(60):  # healthy traffic that names its model
            for canary in (False, True):
                event = make_event(canary=canary, error=False, rollout_id=rollout_id)
                event.call.model = "sim-bad" if canary else "sim-good"
                await send(p, event)
        await until(lambda: (collector.rollouts.sightings.get(AGENT, CANDIDATE_V) or None) is not None)
        await asyncio.sleep(0.5)  # a look of the controller on that evidence

        live = await cli("rollout", "status", AGENT, *admin)
        text = live.output
        assert "phase       running" in text and "(sim-bad; last event" in text and "WARNING" not in text
        assert "% points, margin 5.00 % points" in text and "candidate" in text and "(n=" in text
        assert "window: the last 5m" in text  # the error-rate trigger's default window
        assert "rolled back" not in text.lower() and "promoted" not in text.lower()
        as_json = json.loads((await cli("rollout", "status", AGENT, "--json", *admin)).output)
        assert as_json["view"]["phase"] == "running" and as_json["view"]["versions"][1]["models"] == [
            "sim-bad"
        ]
        assert {g["name"] for g in as_json["view"]["gates"]} >= {"errors", "latency", "trigger:error_rate"}

        # watch until the controller rolls the failing candidate back
        watching = asyncio.create_task(cli("rollout", "watch", AGENT, "--interval", "200ms", *admin))
        await asyncio.sleep(1.0)
        assert not watching.done()
        await produce_mix(p, 150, candidate_error_every=3, rollout_id=rollout_id)
        watched = await asyncio.wait_for(watching, 30)
        assert watched.exit_code == 0, watched.output
        frames = watched.output.split("bounds over time")
        assert len(frames) >= 3  # refreshed, not printed once
        assert "errors" in frames[-1] and "upper" in frames[-1] and "lower" in frames[-1]
        # each frame's status text comes before its chart: the first ran, the last rolled back
        assert "phase       running" in frames[0] and "phase       rolled back" in frames[-2]
        assert "rolled back" not in "".join(frames[:-2]).lower()
        print(watched.output[-3000:])

        ended = await cli("rollout", "status", AGENT, *admin)
        assert "phase       rolled back" in ended.output and "HARM" in ended.output


async def test_notify_never_blocks_and_stop_is_bounded_with_a_hanging_webhook() -> None:
    """A webhook that never answers: the listener returns at once, stop() returns within its
    grace and counts what never went out; stop twice is fine."""
    from collector._metrics import CollectorMetrics
    from collector._notify import Notifier
    from collector._settings import NotifySettings
    from tests.unit.test_rollout_verbs import started

    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    app = web.Application()
    app.add_routes([web.post("/hang", hang)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        metrics = CollectorMetrics()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hang"
        notifier = Notifier([NotifySettings(url=url, timeout=30.0)], metrics)
        await notifier.start()
        ctl = started()
        running = ctl.state
        held = ctl.propose_pause("x", 101.0, "y")
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(3):
            notifier(held, running)
        assert loop.time() - began < 0.05
        await asyncio.sleep(0.2)  # the first body is in flight, two queued
        began = loop.time()
        await notifier.stop(grace_s=0.5)
        assert loop.time() - began < 3.0
        await notifier.stop()
        assert metrics.notifications.labels("dropped")._value.get() == 3  # in flight and queued
    finally:
        release.set()
        await runner.cleanup()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
async def test_watch_in_a_real_terminal_under_tmux(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """`watch` on a real tty (a detached tmux pane): it redraws in place with rich's Live and
    exits when the rollout ends."""
    socket = f"outrider-test-{os.getpid()}-{id(tmp_path)}"  # a tmux server of this test's own
    tmux = ["tmux", "-L", socket]

    async def pane() -> str:
        out = await asyncio.to_thread(
            subprocess.run,
            [*tmux, "capture-pane", "-p", "-t", "w"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    async with Collector(settings_for(broker)) as collector, admin_client(collector) as admin:
        await versions_reported(broker, collector)
        await admin.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=spec_yaml(min_duration="10m")))
        # the pane's own size, not the test runner's COLUMNS and LINES
        command = [
            "env",
            "-u",
            "COLUMNS",
            "-u",
            "LINES",
            sys.executable,
            "-m",
            "devstack",
            "rollout",
            "watch",
        ]
        command += [AGENT, "--interval", "300ms"]
        command += ["--admin", collector.admin_address]
        await asyncio.to_thread(
            subprocess.run,
            [*tmux, "new-session", "-d", "-s", "w", "-x", "160", "-y", "60", shlex.join(command)],
            check=True,
        )
        try:
            await asyncio.to_thread(subprocess.run, [*tmux, "set-option", "-t", "w", "remain-on-exit", "on"])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while "bounds over time" not in (screen := await pane()):
                assert loop.time() < deadline, screen
                await asyncio.sleep(0.2)
            assert "phase       running" in screen and screen.count("phase ") == 1  # redrawn, not appended
            await admin.AbortRollout(
                admin_pb2.AbortRolloutRequest(agent=AGENT, reason="done", requested_by="t")
            )
            while "phase       aborted" not in (screen := await pane()):
                assert loop.time() < deadline, screen
                await asyncio.sleep(0.2)
            dead = await asyncio.to_thread(
                subprocess.run,
                [*tmux, "display-message", "-p", "-t", "w", "#{pane_dead}"],
                capture_output=True,
                text=True,
            )
            while dead.stdout.strip() != "1":  # watch exited with the rollout
                assert loop.time() < deadline, dead.stdout
                await asyncio.sleep(0.2)
                dead = await asyncio.to_thread(
                    subprocess.run,
                    [*tmux, "display-message", "-p", "-t", "w", "#{pane_dead}"],
                    capture_output=True,
                    text=True,
                )
        finally:
            await asyncio.to_thread(subprocess.run, [*tmux, "kill-server"], capture_output=True)
