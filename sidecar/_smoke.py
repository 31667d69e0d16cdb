"""Blue-green smoke tests: the sidecar runs a rollout's scripted conversations against green.

While the newest rollout state is a blue-green in SMOKE_TEST (green serves no user), the runner
takes each test of its `smoke` plan, once per rollout id, when this sidecar has green: it opens
a session pinned to green, sends the test's messages through the call pipeline (guards, quotas,
breakers, retries, fallback: what a user's call would meet), and checks the answer's tool calls,
its text against the pattern and the latency. Each test gives one SmokeTestRecord event with
the real rollout id; the collector switches on one sidecar's complete passing set.

The smoke sessions carry the rollout id prefixed with `smoke:`, so their call events are never
evidence of the rollout (the collector's evidence takes only events of the rollout's own id):
smoke traffic is not user traffic. Failures are described by tool names, the pattern and
numbers; never by prompt or answer text. One owned task, bounded: one rollout at a time, at most
`MAX_TESTS` tests, each within its own deadline; `stop` cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque

from outrider.v1 import common_pb2, control_pb2, events_pb2
from sidecar._call_errors import CallError
from sidecar._pipeline import CallPipeline, ChatCall
from sidecar._record import Recorder
from sidecar.routing._router import Router

log = logging.getLogger(__name__)

SMOKE_PREFIX = "smoke:"
MAX_TESTS = 50
MAX_REMEMBERED = 64  # rollout ids already run (a newer state of one never runs it again)
POLL_S = 1.0  # also look without a new state: the registry may teach the router green later
MAX_TEST_S = 60.0  # one test's deadline, at most (and at most half the plan's timeout)


def _check(test: control_pb2.SmokeTest, message: common_pb2.ChatMessage, latency_ms: float) -> str:
    """What failed, or "" when the answer passed every assertion of `test`."""
    called = [c.name for c in message.tool_calls]
    missing = [t for t in test.expect_tools if t not in called]
    if missing:
        got = ", ".join(called) or "none"
        return f"expected tool {', '.join(missing)}, got {got}"
    if test.expect_content_pattern and re.search(test.expect_content_pattern, message.content) is None:
        return f"content did not match /{test.expect_content_pattern}/"
    if test.max_latency_ms > 0 and latency_ms > test.max_latency_ms:
        return f"latency {latency_ms:.0f} ms above max_latency {test.max_latency_ms:.0f} ms"
    return ""


class SmokeRunner:
    """Runs each blue-green rollout's smoke tests once, when the state and green are both here."""

    def __init__(self, *, pipeline: CallPipeline, router: Router, recorder: Recorder) -> None:
        self._pipeline, self._router, self._recorder = pipeline, router, recorder
        self._done: deque[str] = deque(maxlen=MAX_REMEMBERED)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # rollouts whose smoke tests this sidecar ran

    def on_state(self, state: control_pb2.RolloutState) -> None:
        """The control tailer applied a state: look now."""
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="outrider-sidecar-smoke")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def due(self) -> control_pb2.RolloutState | None:
        """The blue-green state whose smoke tests this sidecar should run now, if any."""
        state = self._router.state
        if (
            state is None
            or state.strategy != control_pb2.ROLLOUT_STRATEGY_BLUE_GREEN
            or state.phase != control_pb2.ROLLOUT_PHASE_SMOKE_TEST
            or state.rollout_id in self._done
            or state.candidate_version_id not in self._router.known
        ):
            return None
        return state

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            self._wake.clear()
            state = self.due()
            if state is None:
                continue
            self._done.append(state.rollout_id)
            try:
                await self.run(state)
            except Exception:  # a bug here must not end the loop (the collector times out)
                log.exception("smoke tests of rollout %s failed to run", state.rollout_id)

    async def run(self, state: control_pb2.RolloutState) -> list[events_pb2.SmokeTestRecord]:
        """Run every test of `state`'s plan against green and emit one record per test."""
        tests = list(state.smoke.tests)[:MAX_TESTS]
        self.runs += 1
        log.info(
            "smoke: running %d test(s) of rollout %s against %s",
            len(tests),
            state.rollout_id,
            state.candidate_version_id,
        )
        records = []
        for test in tests:
            record = await self._one(state, test, len(tests))
            records.append(record)
            if not record.passed:
                log.warning(
                    "smoke: rollout %s test %r failed: %s", state.rollout_id, test.name, record.failure
                )
        return records

    async def _one(
        self, state: control_pb2.RolloutState, test: control_pb2.SmokeTest, count: int
    ) -> events_pb2.SmokeTestRecord:
        token, session = self._pipeline.open_pinned(
            state.candidate_version_id, common_pb2.ROLE_CANARY, SMOKE_PREFIX + state.rollout_id
        )
        deadline = min(MAX_TEST_S, max(state.smoke.timeout_s / 2, 1.0))
        started = time.monotonic()
        failure = ""
        try:
            response = await asyncio.wait_for(
                self._pipeline.chat(
                    ChatCall(session_token=token, messages=test.messages, time_remaining=deadline)
                ),
                deadline,
            )
        except CallError as exc:
            failure = f"call failed: {exc.code.name}"
        except TimeoutError:
            failure = f"no answer within {deadline:g}s"
        latency_ms = (time.monotonic() - started) * 1000
        if not failure:
            failure = _check(test, response.message, latency_ms)
        record = events_pb2.SmokeTestRecord(
            test_name=test.name, passed=not failure, failure=failure, latency_ms=latency_ms, test_count=count
        )
        event = self._recorder.event(session)
        event.rollout_id, event.unit_id = state.rollout_id, ""  # the record is the rollout's own
        event.smoke.CopyFrom(record)
        self._recorder.emit(event)
        return record
