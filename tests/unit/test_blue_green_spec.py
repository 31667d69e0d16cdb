"""The `strategy: blue_green` spec: its smoke tests and durations, errors naming the field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from collector._config_errors import SpecError
from collector._rollout import RolloutController
from collector._spec import load_spec_text

BASE: dict[str, Any] = {
    "agent": "bot",
    "stable": "1a2b3c4d5e6f",
    "candidate": "9f8e7d6c5b4a",
    "strategy": "blue_green",
    "blue_green": {"smoke_tests": [{"name": "hi", "prompt": "hello"}]},
}


def load(**over: Any) -> Any:
    return load_spec_text(yaml.safe_dump({**BASE, **over}), "bg.yaml")


def problems(**over: Any) -> str:
    with pytest.raises(SpecError) as info:
        load(**over)
    return "; ".join(info.value.problems)


def smoke(*tests: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"blue_green": {"smoke_tests": list(tests), **fields}}


def test_blue_green_spec_defaults_and_plan() -> None:
    spec = load(
        **smoke(
            {"name": "a", "prompt": "p", "expect_tools": ["lookup_order"], "max_latency": "3s"},
            {
                "name": "b",
                "messages": [{"role": "system", "content": "s"}, {"content": "u"}],
                "expect_content": "x+",
            },
            keep_warm="5m",
        )
    )
    assert spec.strategy == "blue_green" and not spec.steps
    bg = spec.blue_green
    assert bg is not None and bg.smoke_timeout == 120.0 and bg.keep_warm == 300.0
    plan = bg.plan()
    assert [t.name for t in plan.tests] == ["a", "b"] and plan.timeout_s == 120.0
    assert plan.tests[0].max_latency_ms == 3000.0 and plan.tests[1].expect_content_pattern == "x+"
    assert [(m.role, m.content) for m in plan.tests[1].messages] == [("system", "s"), ("user", "u")]


def test_blue_green_spec_bad_regex_names_the_test() -> None:
    text = problems(**smoke({"name": "orders", "prompt": "p", "expect_content": "(unclosed"}))
    assert "blue_green.smoke_tests[0].expect_content" in text and "'orders'" in text, text


@pytest.mark.parametrize(
    ("over", "wanted"),
    [
        (
            smoke({"name": "a"}),
            "smoke_tests[0].prompt: smoke test 'a' needs exactly one of prompt or messages",
        ),
        (
            smoke({"name": "a", "prompt": "p", "messages": [{"content": "m"}]}),
            "exactly one of prompt or messages",
        ),
        (
            smoke({"name": "a", "messages": [{"role": "assistant", "content": "m"}]}),
            "must end with a user message",
        ),
        (smoke({"name": "a", "prompt": "p"}, {"name": "a", "prompt": "q"}), "smoke_tests[1].name: duplicate"),
        (smoke(), "blue_green.smoke_tests"),
        (smoke({"name": "a", "prompt": "p"}, keep_warm="0s"), "keep_warm: must be longer than 0s"),
        (smoke({"name": "a", "prompt": "p"}, smoke_timeout="-1s"), "smoke_timeout"),
        (smoke({"name": "a", "prompt": "p", "max_latency": "0s"}), "max_latency"),
        (smoke({"name": "a", "prompt": "p", "expect_tools": [""]}), "expect_tools"),
        (smoke({"name": "a", "prompt": "p", "bogus": 1}), "smoke_tests[0].bogus"),
        ({"blue_green": None}, "blue_green: required with strategy: blue_green"),
        ({"strategy": "canary", "steps": [{"weight": 5}]}, "blue_green: only with strategy: blue_green"),
        ({"steps": [{"weight": 5}]}, "steps: not used by strategy blue_green"),
        ({"strategy": "bluegreen"}, "strategy"),
    ],
)
def test_blue_green_spec_errors_name_the_field(over: dict[str, Any], wanted: str) -> None:
    assert wanted in problems(**over)


def test_blue_green_time_scale_shortens_keep_warm_not_the_smoke_timeout() -> None:
    spec = load(time_scale=0.01, **smoke({"name": "a", "prompt": "p"}, keep_warm="30m"))
    state = RolloutController("bot").propose_start(spec, "x", 1000.0)
    assert state.keep_warm_s == pytest.approx(18.0) and state.smoke.timeout_s == 120.0
