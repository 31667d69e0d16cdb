"""An OpenAI Agents SDK agent (`openai-agents`, imported as `agents`) behind the sidecar's
OpenAI-compatible endpoint.

    .venv/bin/python examples/agents_sdk_agent.py ["question"]

The SDK speaks OpenAI's Responses API by default; the sidecar serves chat completions, so the
agent's model is an `OpenAIChatCompletionsModel` on an `AsyncOpenAI` client pointed at the
sidecar. The SDK's own tracing is off: its default exporter sends every trace to OpenAI's
servers, and the sidecar already traces each call (OpenTelemetry, GenAI conventions).
The version owns the system prompt and tool schemas, so the agent has no `instructions`; its
function tool is what the SDK runs when the model asks for it, and `Runner` loops until the
model answers in text. The run is streamed (`Runner.run_streamed`).

The endpoint comes from $OUTRIDER_OPENAI_BASE_URL, else http://127.0.0.1:8001/v1 (`scripts/dev`
prints it on the sidecar's line). On `outrider dev` the simulated model calls the tool a
message names as `/tool NAME {json arguments}`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

BASE_URL = os.environ.get("OUTRIDER_OPENAI_BASE_URL", "http://127.0.0.1:8001/v1")
QUESTION = '/tool lookup_order {"order_id": "A1"}'
MAX_TURNS = 8

set_tracing_disabled(True)  # before any run: nothing is exported to the vendor


@function_tool
def lookup_order(order_id: str) -> str:
    """Look up an order by id.

    Args:
        order_id: the order's id.
    """
    return json.dumps({"order_id": order_id, "status": "shipped", "eta_days": 2})


async def answer(question: str) -> str:
    client = AsyncOpenAI(base_url=BASE_URL, api_key="unused")  # the sidecar, not OpenAI
    agent = Agent(
        name="support-agent",
        model=OpenAIChatCompletionsModel(model="ignored", openai_client=client),
        tools=[lookup_order],
    )
    run = Runner.run_streamed(agent, question, max_turns=MAX_TURNS)
    async for event in run.stream_events():
        if event.type != "run_item_stream_event":
            continue
        item = event.item
        if item.type == "tool_call_item":
            raw = item.raw_item
            print(f"tool {getattr(raw, 'name', '?')}({getattr(raw, 'arguments', '')})")
        elif item.type == "tool_call_output_item":
            print(f"  -> {item.output}")
    await client.close()
    return str(run.final_output)


def main() -> int:
    question = sys.argv[1] if len(sys.argv) > 1 else QUESTION
    print(f"answer: {asyncio.run(answer(question))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
