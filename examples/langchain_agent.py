"""A LangChain agent (`langchain_openai.ChatOpenAI` with `bind_tools`) behind the sidecar's
OpenAI-compatible endpoint.

    .venv/bin/python examples/langchain_agent.py ["question"]

ChatOpenAI points at the sidecar (`base_url`, a dummy key); the version owns the model, prompt,
parameters and tool schemas, so the tools bound here only tell LangChain what it may run (the
sidecar ignores the `tools` the request carries). The loop runs the tool calls the model asks
for and sends their results back as ToolMessages, until the model answers in text; every
call is streamed (SSE), the chunks summed into one message, tool calls included. Nothing here
counts tokens (`get_num_tokens` would load a tiktoken encoding, downloaded on first use): the
endpoint's `usage` gives the counts.

The endpoint comes from $OUTRIDER_OPENAI_BASE_URL, else http://127.0.0.1:8001/v1 (`scripts/dev`
prints it on the sidecar's line). On `outrider dev` the simulated model calls the tool a
message names as `/tool NAME {json arguments}`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langchain_openai import ChatOpenAI

BASE_URL = os.environ.get("OUTRIDER_OPENAI_BASE_URL", "http://127.0.0.1:8001/v1")
QUESTION = '/tool lookup_order {"order_id": "A1"}'
MAX_STEPS = 8


@tool
def lookup_order(order_id: str) -> dict[str, Any]:
    """Look up an order by id."""
    return {"order_id": order_id, "status": "shipped", "eta_days": 2}


TOOLS: dict[str, BaseTool] = {t.name: t for t in (lookup_order,)}


def streamed(model: Any, messages: list[BaseMessage]) -> AIMessage:
    """One model call over SSE, text printed as it arrives; the chunks summed into one message."""
    total: Any = None
    for chunk in model.stream(messages):
        if chunk.content:
            print(chunk.content, end="", flush=True)
        total = chunk if total is None else total + chunk
    if total is not None and total.content:
        print()
    assert total is not None, "the stream had no chunk"
    return AIMessage(content=total.content, tool_calls=total.tool_calls, id=total.id)


def answer(llm: ChatOpenAI, question: str) -> str:
    model = llm.bind_tools(list(TOOLS.values()))
    messages: list[BaseMessage] = [HumanMessage(question)]
    for _ in range(MAX_STEPS):
        reply = streamed(model, messages)
        if not reply.tool_calls:
            return str(reply.content)
        messages.append(reply)
        for call in reply.tool_calls:
            # invoking a tool with its ToolCall gives the ToolMessage, tool_call_id set
            result: ToolMessage = TOOLS[call["name"]].invoke(call)
            print(f"tool {call['name']}({call['args']}) -> {result.content}")
            messages.append(result)
    raise RuntimeError(f"no answer after {MAX_STEPS} model calls")


def main() -> int:
    llm = ChatOpenAI(base_url=BASE_URL, api_key="unused", model="ignored", max_retries=2)  # type: ignore[arg-type]
    question = sys.argv[1] if len(sys.argv) > 1 else QUESTION
    print(f"answer: {answer(llm, question)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
