"""An openai-SDK agent with a tool loop, behind the sidecar's OpenAI-compatible endpoint.

    .venv/bin/python examples/openai_agent.py ["question"]

The only change from an agent that calls OpenAI is `base_url` (and a dummy key: the sidecar
ignores `Authorization` unless `require_api_key` is on). The version owns the model, the system
prompt, the parameters and the tool schemas, so the agent sends its conversation only; it runs
the tools the model asks for itself and sends their results back, until the model answers in
text. The first turn is streamed (SSE), the others are plain calls.

The endpoint comes from $OUTRIDER_OPENAI_BASE_URL, else http://127.0.0.1:8001/v1 (`scripts/dev`
prints it as `openai http://HOST:PORT/v1` on the sidecar's line). On `outrider dev` the
simulated model calls the tool a message names as `/tool NAME {json arguments}`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from openai import OpenAI

BASE_URL = os.environ.get("OUTRIDER_OPENAI_BASE_URL", "http://127.0.0.1:8001/v1")
QUESTION = '/tool lookup_order {"order_id": "A1"}'
MAX_STEPS = 8  # model calls per question: a model that keeps asking for tools is stopped


def lookup_order(order_id: str) -> dict[str, Any]:
    """The agent's own tool (its schema lives in the version): a stand-in for an order database."""
    return {"order_id": order_id, "status": "shipped", "eta_days": 2}


TOOLS: dict[str, Callable[..., Any]] = {"lookup_order": lookup_order}
# the conversation as plain dicts, the JSON the endpoint reads (the SDK's TypedDicts, loosely)
Messages = list[Any]


def streamed_turn(client: OpenAI, messages: Messages) -> dict[str, Any]:
    """One model call over SSE, its text printed as it arrives; the assembled assistant message."""
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    stream = client.chat.completions.create(model="ignored", messages=messages, stream=True)
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            text.append(delta.content)
            print(delta.content, end="", flush=True)
        for part in delta.tool_calls or ():
            # a tool call arrives in pieces keyed by index: id and name first, arguments appended
            call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            if part.function is not None:
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
    if text:
        print()
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(calls.items())
        ]
    return message


def plain_turn(client: OpenAI, messages: Messages) -> dict[str, Any]:
    reply = client.chat.completions.create(model="ignored", messages=messages)
    return reply.choices[0].message.model_dump(exclude_none=True)


def run_tool(call: dict[str, Any]) -> str:
    """A tool's result as the JSON the model reads; an unknown tool or bad arguments are told
    to the model as an error rather than ending the agent."""
    name = call["function"]["name"]
    tool = TOOLS.get(name)
    if tool is None:
        return json.dumps({"error": f"unknown tool {name!r}"})
    try:
        return json.dumps(tool(**json.loads(call["function"]["arguments"] or "{}")))
    except (TypeError, ValueError) as exc:
        return json.dumps({"error": f"bad arguments for {name!r}: {exc}"})


def answer(client: OpenAI, question: str) -> str:
    messages: Messages = [{"role": "user", "content": question}]
    for step in range(MAX_STEPS):
        message = streamed_turn(client, messages) if step == 0 else plain_turn(client, messages)
        messages.append(message)
        if not message.get("tool_calls"):
            return str(message.get("content") or "")
        for call in message["tool_calls"]:
            result = run_tool(call)
            print(f"tool {call['function']['name']}({call['function']['arguments']}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    raise RuntimeError(f"no answer after {MAX_STEPS} model calls")


def main() -> int:
    client = OpenAI(base_url=BASE_URL, api_key="unused")  # the sidecar, not OpenAI
    question = sys.argv[1] if len(sys.argv) > 1 else QUESTION
    print(f"answer: {answer(client, question)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
