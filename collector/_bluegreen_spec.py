"""The `blue_green:` section of a rollout spec (`strategy: blue_green`): smoke tests, then the switch.

strategy: blue_green
blue_green:
  smoke_timeout: 2m         # no sidecar reported a complete set of results by then: rolled back
  keep_warm: 30m            # blue (stable) stays warm this long after the switch, then the swap
  smoke_tests:
    - name: order-lookup
      prompt: "where is order 42?"          # or `messages: [{role: user, content: ...}, ...]`
      expect_tools: [lookup_order]          # every one must be called by the answer
      expect_content: "order"               # a regular expression the answer's text must match
      max_latency: 5s

Blue is the stable version, green the candidate. `steps` and `shadow` do not apply; the spec's
`triggers` and `gates` watch green while blue is warm (collector._bluegreen_phase). The spec's
`time_scale` multiplies `keep_warm` (not `smoke_timeout`: smoke tests are real calls).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from outrider.durations import Duration
from outrider.v1 import common_pb2, control_pb2

DEFAULT_SMOKE_TIMEOUT_S = 120.0
DEFAULT_KEEP_WARM_S = 1800.0
MAX_SMOKE_TESTS = 50


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SmokeMessage(_Model):
    role: Literal["system", "user", "assistant", "tool"] = "user"
    content: str = Field(min_length=1, max_length=20_000)


class SmokeTestSpec(_Model):
    """One scripted conversation run through a sidecar against green, and what its answer must show."""

    name: str = Field(min_length=1, max_length=128)
    prompt: str | None = Field(default=None, min_length=1, max_length=20_000)
    messages: list[SmokeMessage] | None = Field(default=None, min_length=1, max_length=50)
    expect_tools: list[str] = Field(default_factory=list, max_length=20)
    expect_content: str | None = Field(default=None, min_length=1, max_length=1000)
    max_latency: Duration | None = None

    @model_validator(mode="after")
    def _checks(self) -> SmokeTestSpec:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(f"prompt: smoke test {self.name!r} needs exactly one of prompt or messages")
        if self.messages is not None and self.messages[-1].role != "user":
            raise ValueError(f"messages: smoke test {self.name!r} must end with a user message")
        if self.expect_content is not None:
            try:
                re.compile(self.expect_content)
            except re.error as exc:
                raise ValueError(
                    f"expect_content: smoke test {self.name!r} has an invalid regular expression: {exc}"
                ) from None
        if any(not t for t in self.expect_tools):
            raise ValueError(f"expect_tools: smoke test {self.name!r} names an empty tool")
        if self.max_latency is not None and self.max_latency <= 0:
            raise ValueError(f"max_latency: smoke test {self.name!r} must allow more than 0s")
        return self

    def conversation(self) -> list[SmokeMessage]:
        return list(self.messages) if self.messages is not None else [SmokeMessage(content=self.prompt or "")]


class BlueGreen(_Model):
    smoke_tests: list[SmokeTestSpec] = Field(min_length=1, max_length=MAX_SMOKE_TESTS)
    smoke_timeout: Duration = DEFAULT_SMOKE_TIMEOUT_S
    keep_warm: Duration = DEFAULT_KEEP_WARM_S

    @model_validator(mode="after")
    def _checks(self) -> BlueGreen:
        if self.smoke_timeout <= 0:
            raise ValueError("smoke_timeout: must be longer than 0s")
        if self.keep_warm <= 0:
            raise ValueError("keep_warm: must be longer than 0s")
        seen: set[str] = set()
        for i, test in enumerate(self.smoke_tests):
            if test.name in seen:
                raise ValueError(f"smoke_tests[{i}].name: duplicate smoke test name {test.name!r}")
            seen.add(test.name)
        return self

    def plan(self) -> control_pb2.SmokePlan:
        """The smoke tests as the control record carries them to the sidecars."""
        return control_pb2.SmokePlan(
            timeout_s=self.smoke_timeout,
            tests=[
                control_pb2.SmokeTest(
                    name=t.name,
                    messages=[
                        common_pb2.ChatMessage(role=m.role, content=m.content) for m in t.conversation()
                    ],
                    expect_tools=t.expect_tools,
                    expect_content_pattern=t.expect_content or "",
                    max_latency_ms=(t.max_latency or 0.0) * 1000,
                )
                for t in self.smoke_tests
            ],
        )
