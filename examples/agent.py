"""A toy agent: opens sessions on the sidecar and chats, printing which version served.

    .venv/bin/python examples/agent.py [--sidecar 127.0.0.1:50051] [--sessions 200]

Run it beside `outrider dev`, start a rollout, and watch the split (and the rollback) happen.
"""

from __future__ import annotations

import argparse
import asyncio
import collections

import grpc

from outrider.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc

ROLES = {common_pb2.ROLE_STABLE: "stable", common_pb2.ROLE_CANARY: "canary"}


async def main(address: str, sessions: int, pause_s: float) -> None:
    seen: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        for i in range(sessions):
            opened = await stub.OpenSession(sidecar_pb2.OpenSessionRequest(user_id=f"user-{i}"))
            role = ROLES.get(opened.role, "other")
            request = sidecar_pb2.ChatRequest(
                session_id=opened.session_id,
                messages=[common_pb2.ChatMessage(role="user", content=f"Where is order {i}?")],
            )
            try:
                reply = await stub.Chat(request, timeout=10)
                outcome = f"ok   {reply.message.content[:50]!r}"
            except grpc.aio.AioRpcError as exc:
                outcome = f"{exc.code().name} {exc.details()}"
            seen[f"{role}:{'ok' if outcome.startswith('ok') else 'error'}"] += 1
            print(f"session {i:4d} {role:<7} version {opened.version_id}  {outcome}")
            await asyncio.sleep(pause_s)
    print(dict(seen))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sidecar", default="127.0.0.1:50051")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between sessions")
    args = parser.parse_args()
    asyncio.run(main(args.sidecar, args.sessions, args.pause))
