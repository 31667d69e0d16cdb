"""A toy agent: concurrent sessions on the sidecar, each a few chat turns (the first one
calling the `lookup_order` tool through the sidecar), with a summary of which role served and
how it went every few seconds.

    .venv/bin/python examples/agent.py [--sidecar 127.0.0.1:50051] [--concurrency 8]
        [--duration 15m] [--sessions N] [--turns 3] [--tenants N] [--feedback]
        [--log FILE] [--verbose]

The sidecar address comes from --sidecar, else $OUTRIDER_SIDECAR_ADDR, else 127.0.0.1:50051.
It keeps sending for --duration (or until --sessions sessions are done, whichever is first).
Run it beside `outrider dev`, start a rollout, and watch the split (and the rollback) happen.
Each session is a new user; with --tenants N the sessions are spread over N tenants
(`tenant-0` ...), for per-tenant canaries and flags. With --feedback each session ends with a
task outcome (success when every turn was answered, undegraded), the primary metric of an A/B test.
A session the sidecar retired (FAILED_PRECONDITION: drained or expired) is replaced by a new
one, which lands where the rollout now sends new sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import os
import sys
import time
from pathlib import Path

import grpc

from outrider.durations import parse_positive_duration
from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc

ENV_SIDECAR = "OUTRIDER_SIDECAR_ADDR"
DEFAULT_SIDECAR = "127.0.0.1:50051"
ROLES = {
    common_pb2.ROLE_STABLE: "stable",
    common_pb2.ROLE_CANARY: "canary",
    common_pb2.ROLE_VARIANT: "variant",
}
CALL_TIMEOUT_S = 10.0
REPORT_EVERY_S = 5.0
BACKOFF_S = 1.0  # after the sidecar itself failed (restarting, overloaded)


def parse_duration(text: str) -> float:
    try:
        return parse_positive_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Agent:
    def __init__(
        self,
        stub: sidecar_pb2_grpc.SidecarStub,
        turns: int,
        verbose: bool,
        tenants: int = 0,
        feedback: bool = False,
    ) -> None:
        self.stub, self.turns, self.verbose = stub, turns, verbose
        self.tenants, self.feedback = tenants, feedback
        self.seen: collections.Counter[str] = collections.Counter()
        self.versions: dict[str, str] = {}  # role -> version id
        self._ids = itertools.count()

    async def worker(self, stop_at: float, sessions_left: list[int]) -> None:
        while time.monotonic() < stop_at and sessions_left[0] != 0:
            sessions_left[0] -= 1
            try:
                await self.session(next(self._ids))
            except grpc.aio.AioRpcError as exc:
                # the sidecar itself failed (OpenSession refused, restarting): back off, go on
                self.seen[f"open:{exc.code().name}"] += 1
                await asyncio.sleep(BACKOFF_S)

    async def session(self, i: int) -> None:
        tenant = f"tenant-{i % self.tenants}" if self.tenants > 0 else ""
        opened = await self.stub.OpenSession(
            sidecar_pb2.OpenSessionRequest(user_id=f"user-{i}", tenant_id=tenant), timeout=CALL_TIMEOUT_S
        )
        role = ROLES.get(opened.role, "other")
        self.versions[role] = opened.version_id
        self.seen[f"{role}:sessions"] += 1
        answered = 0
        for turn in range(self.turns):
            # the first turn of a session looks the order up with the tool (the simulator calls
            # a tool when the message is "/tool NAME ARGS"), the others ask in words
            text = f'/tool lookup_order {{"order_id": "{i}"}}' if turn == 0 else f"Where is order {i}-{turn}?"
            messages = [common_pb2.ChatMessage(role="user", content=text)]
            try:
                reply = await self.stub.Chat(
                    sidecar_pb2.ChatRequest(session_id=opened.session_id, messages=messages),
                    timeout=CALL_TIMEOUT_S,
                )
                if reply.message.tool_calls:
                    messages.append(reply.message)
                    for call in reply.message.tool_calls:
                        result = await self.stub.CallTool(
                            sidecar_pb2.CallToolRequest(
                                session_id=opened.session_id,
                                tool_name=call.name,
                                arguments_json=call.arguments_json,
                                call_id=call.id,
                            ),
                            timeout=CALL_TIMEOUT_S,
                        )
                        messages.append(
                            common_pb2.ChatMessage(
                                role="tool", tool_call_id=call.id, content=result.result_json
                            )
                        )
                    reply = await self.stub.Chat(
                        sidecar_pb2.ChatRequest(session_id=opened.session_id, messages=messages),
                        timeout=CALL_TIMEOUT_S,
                    )
            except grpc.aio.AioRpcError as exc:
                self.seen[f"{role}:{exc.code().name}"] += 1
                if self.verbose:
                    print(f"session {i} {role} {opened.version_id}: {exc.code().name} {exc.details()}")
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return  # retired (drained, expired): the next session opens where it should
                continue
            self.seen[f"{role}:{'degraded' if reply.degraded else 'ok'}"] += 1
            answered += 0 if reply.degraded else 1
            if self.verbose:
                print(f"session {i} {role} {opened.version_id}: ok {reply.message.content[:50]!r}")
        if self.feedback:
            success = answered == self.turns
            kind = (
                sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS if success else sidecar_pb2.FEEDBACK_KIND_TASK_FAILURE
            )
            await self.stub.Feedback(
                sidecar_pb2.FeedbackRequest(session_id=opened.session_id, kind=kind), timeout=CALL_TIMEOUT_S
            )
            self.seen[f"{role}:{'task_success' if success else 'task_failure'}"] += 1

    def summary(self) -> str:
        parts = []
        for role in ("stable", "canary", "variant", "other"):
            counts = {k.split(":", 1)[1]: v for k, v in self.seen.items() if k.startswith(f"{role}:")}
            if counts:
                detail = " ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                parts.append(f"{role} {self.versions.get(role, '?')}: {detail}")
        opens = {k: v for k, v in self.seen.items() if k.startswith("open:")}
        if opens:
            parts.append(" ".join(f"{k} {v}" for k, v in sorted(opens.items())))
        return " | ".join(parts) or "no sessions yet"


async def main(args: argparse.Namespace) -> None:
    address, concurrency, turns = args.sidecar, args.concurrency, args.turns
    stop_at = time.monotonic() + args.duration
    sessions_left = [args.sessions if args.sessions > 0 else -1]  # shared by the workers; -1: no cap
    async with grpc.aio.insecure_channel(address) as channel:
        agent = Agent(sidecar_pb2_grpc.SidecarStub(channel), turns, args.verbose, args.tenants, args.feedback)
        print(
            f"agent: {concurrency} concurrent sessions of {turns} turns on {address} for {args.duration:g}s",
            flush=True,
        )
        workers = [asyncio.create_task(agent.worker(stop_at, sessions_left)) for _ in range(concurrency)]
        try:
            while not all(w.done() for w in workers):
                await asyncio.wait(workers, timeout=REPORT_EVERY_S)
                print(time.strftime("%H:%M:%S"), agent.summary(), flush=True)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    print("done:", agent.summary(), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sidecar", default=os.environ.get(ENV_SIDECAR) or DEFAULT_SIDECAR)
    parser.add_argument("--concurrency", type=int, default=8, help="sessions in flight at once")
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("15m"))
    parser.add_argument("--sessions", type=int, default=0, help="stop after this many sessions (0: no cap)")
    parser.add_argument("--turns", type=int, default=3, help="chat calls per session")
    parser.add_argument("--tenants", type=int, default=0, help="spread sessions over N tenants (0: none)")
    parser.add_argument("--feedback", action="store_true", help="report each session's task outcome")
    parser.add_argument("--log", type=Path, help="write the summaries here instead of stdout")
    parser.add_argument("--verbose", action="store_true", help="one line per call")
    args = parser.parse_args()
    if args.concurrency < 1 or args.turns < 1:
        parser.error("--concurrency and --turns must be at least 1")
    if args.tenants < 0:
        parser.error("--tenants must be 0 (no tenant) or more")
    if args.log is not None:  # line-buffered, so `tail -f` follows it
        args.log.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout = open(args.log, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as we do
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args))
