"""The simulated tool services: JSON in, JSON out. Pure functions; the server adds behavior."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._sim_openai import RequestError

ToolHandler = Callable[[str, object], object]


def _lookup_order(name: str, body: object) -> object:
    if not isinstance(body, Mapping):
        raise RequestError(400, "The request body must be a JSON object with 'order_id'.", param="body")
    order_id = body.get("order_id")
    if order_id is None:
        raise RequestError(400, "Missing required field: 'order_id'.", param="order_id")
    if isinstance(order_id, bool) or not isinstance(order_id, str | int) or order_id == "":
        raise RequestError(
            400, f"Invalid 'order_id': expected a non-empty string, got {order_id!r}.", param="order_id"
        )
    return {"order_id": order_id, "status": "shipped", "eta_days": 2}


def _echo(name: str, body: object) -> object:
    return body


def _generic(name: str, body: object) -> object:
    """A tool that has a behavior in the config but no built-in logic: acknowledge the input."""
    return {"tool": name, "ok": True, "input": body}


BUILTIN_HANDLERS: dict[str, ToolHandler] = {"lookup_order": _lookup_order, "echo": _echo}


def run_tool(name: str, body: object) -> Any:
    """The tool's JSON answer; raises RequestError (400) naming a bad field."""
    return BUILTIN_HANDLERS.get(name, _generic)(name, body)
