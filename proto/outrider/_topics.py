"""Kafka topic names and record keys (DESIGN.md, "Kafka")."""

from __future__ import annotations

EVENTS_TOPIC = "outrider.events"
SPANS_TOPIC = "outrider.spans"
CONTROL_TOPIC = "outrider.control"
COMMANDS_TOPIC = "outrider.commands"
DEADLETTER_TOPIC = "outrider.deadletter"


def agent_key(agent: str) -> bytes:
    """The record key for everything about one agent: keeps its records on one partition."""
    if not agent:
        raise ValueError("agent name must not be empty")
    return agent.encode("utf-8")
