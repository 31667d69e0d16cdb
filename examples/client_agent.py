"""An agent on `outrider_client`: one session, a tool-calling turn, a streamed follow-up and
feedback, against `outrider dev` (or any sidecar).

    .venv/bin/python examples/client_agent.py [--sidecar 127.0.0.1:50051] [--user u-42]
        [--tenant acme] [--order A1]

The sidecar address comes from --sidecar, else $OUTRIDER_SIDECAR_ADDR (which `outrider dev`
prints), else 127.0.0.1:50051. The agent sends only the conversation: the version the session
is pinned to owns the model, system prompt and tools. The tool loop runs the version's
`lookup_order` through the sidecar (CallTool: schema check, breakers, flags, shadow
interception); `run_tools(..., tools={"lookup_order": fn})` would run it in-process instead.
The dev stack's simulated model asks for a tool when a message reads `/tool NAME {json}`; a
real model decides by itself from the tools the version offers.

Needs only `pip install ./proto ./client` (grpcio, protobuf, outrider-contract).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from outrider_client import Client, OutriderError

ENV_SIDECAR = "OUTRIDER_SIDECAR_ADDR"
DEFAULT_SIDECAR = "127.0.0.1:50051"


def run(sidecar: str, user: str, tenant: str, order: str) -> None:
    with Client(sidecar, timeout=30) as client, client.session(user_id=user, tenant_id=tenant) as s:
        print(f"session {s.id[:12]}... on version {s.version_id}", flush=True)
        question = f"/tool lookup_order {json.dumps({'order_id': order})}"
        turn = s.run_tools(question, max_rounds=4)
        for result in turn.tool_results:
            where = "local" if result.local else "via sidecar"
            print(f"tool {result.name} ({where}) -> {json.dumps(result.result)[:160]}", flush=True)
        print(f"answer: {turn.content}", flush=True)
        print("stream: ", end="", flush=True)
        follow_up = [*turn.messages, {"role": "user", "content": "Thanks! When will it arrive?"}]
        for chunk in s.stream(follow_up):
            print(chunk.content_delta, end="", flush=True)
        print(flush=True)
        s.feedback("task_success" if turn.content else "task_failure")
        print(f"feedback sent; tool rounds {turn.rounds}, reopened {s.reopened}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sidecar", default=os.environ.get(ENV_SIDECAR) or DEFAULT_SIDECAR)
    parser.add_argument("--user", default="u-42")
    parser.add_argument("--tenant", default="acme")
    parser.add_argument("--order", default="A1")
    args = parser.parse_args()
    try:
        run(args.sidecar, args.user, args.tenant, args.order)
    except OutriderError as exc:
        print(f"client_agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
