"""The simulated provider's state: behaviors, counters, recent requests and the seeded random
source. Synchronous and free of I/O; the server asks it what to do and does the waiting."""

from __future__ import annotations

import collections
import hmac
import itertools
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from multidict import CIMultiDictProxy

from ._sim_behavior import ModelBehavior, ToolBehavior, behavior_to_dict, default_models, default_tools
from ._sim_faults import BREAKING, Fault, FaultQueue, fault_to_dict
from ._sim_openai import RequestError

RECEIVED_MAX = 100  # how many recent requests `received` keeps
B = TypeVar("B", ModelBehavior, ToolBehavior)


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the server saw it, for tests to inspect what a client sent."""

    method: str
    path: str
    headers: CIMultiDictProxy[str]  # case-insensitive, as sent (Authorization included)
    body: Any  # the decoded JSON, or None when the body was empty or not JSON
    text: str


@dataclass
class Counts:
    requests: int = 0
    errors: int = 0  # injected by error_rate, plus scripted faults that break the answer
    faults: collections.Counter[str] = field(default_factory=collections.Counter)  # by fault kind

    def count_fault(self, fault: Fault) -> None:
        self.faults[fault.kind] += 1
        if fault.kind in BREAKING:
            self.errors += 1


@dataclass
class SimState:
    models: dict[str, ModelBehavior] = field(default_factory=default_models)
    tools: dict[str, ToolBehavior] = field(default_factory=default_tools)
    api_key: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.model_counts: collections.defaultdict[str, Counts] = collections.defaultdict(Counts)
        self.tool_counts: collections.defaultdict[str, Counts] = collections.defaultdict(Counts)
        self.model_faults: collections.defaultdict[str, FaultQueue] = collections.defaultdict(FaultQueue)
        self.tool_faults: collections.defaultdict[str, FaultQueue] = collections.defaultdict(FaultQueue)
        self.received: collections.deque[ReceivedRequest] = collections.deque(maxlen=RECEIVED_MAX)
        self._ids = itertools.count(1)
        self._id_prefix = f"{self.rng.getrandbits(32):08x}"  # drawn once, so ids never shift later draws

    def authorize(self, authorization: str | None) -> None:
        """Raise a 401 RequestError unless the header carries the key. The key is never echoed."""
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestError(401, "You didn't provide an API key in an 'Authorization: Bearer' header.")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError(401, "Incorrect API key provided.", code="invalid_api_key")

    def delay_s(self, latency_ms: float, jitter_ms: float = 0.0) -> float:
        delay = latency_ms + (self.rng.uniform(-jitter_ms, jitter_ms) if jitter_ms > 0 else 0.0)
        return max(0.0, delay) / 1000.0

    def fails(self, error_rate: float) -> bool:
        return error_rate > 0 and self.rng.random() < error_rate

    def next_ids(self) -> tuple[str, str]:
        """A fresh (completion id, tool call id) pair."""
        tag = f"{self._id_prefix}{next(self._ids):016x}"
        return f"chatcmpl-sim{tag}", f"call_sim{tag}"

    def take_fault(self, queues: Mapping[str, FaultQueue], name: str, stream: bool) -> Fault | None:
        """The scripted fault this request suffers, if any (a use of it is spent)."""
        queue = queues.get(name)  # get, not [], so unscripted names add no empty queues
        return queue.take(stream) if queue is not None else None

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: per model and per tool, requests, errors (injected and scripted), scripted
        faults applied by kind, the faults still pending (times = uses left) and the behavior."""

        def section(
            behaviors: Mapping[str, B], counts: Mapping[str, Counts], queues: Mapping[str, FaultQueue]
        ) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name in sorted(set(behaviors) | set(counts)):
                c = counts.get(name, Counts())
                b = behaviors.get(name)
                q = queues.get(name)
                out[name] = {
                    "requests": c.requests,
                    "errors": c.errors,
                    "faults": dict(sorted(c.faults.items())),
                    "pending_faults": [fault_to_dict(f) for f in q.pending()] if q is not None else [],
                    "behavior": behavior_to_dict(b) if b is not None else None,
                }
            return out

        return {
            "models": section(self.models, self.model_counts, self.model_faults),
            "tools": section(self.tools, self.tool_counts, self.tool_faults),
        }

    def reset(self) -> None:
        self.model_counts.clear()
        self.tool_counts.clear()
        self.received.clear()
