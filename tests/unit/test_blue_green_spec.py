"""The `strategy: blue_green` spec: its smoke tests and durations, errors naming the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import sidecar
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


def test_blue_green_readme_block_and_example_agree() -> None:
    """The README's blue-green block names the example spec, which validates and names v1 (blue)
    and the pushed v4 (green); the snippet above it validates too."""
    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Blue-green") :]
    section = section[: section.index("\n## ")]
    snippet = re.search(r"^```yaml\n(.*?)^```", section, re.M | re.S)
    block = re.search(r"^```sh\n(.*?)^```", section, re.M | re.S)
    assert snippet and block
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert ".venv/bin/outrider rollout start examples/bluegreen-rollout.yaml" in lines
    assert any(line.startswith(".venv/bin/outrider rollout switch-back support-bot") for line in lines)
    spec = load_spec_text((root / "examples" / "bluegreen-rollout.yaml").read_text(encoding="utf-8"))
    pushed = sidecar.load_version_file(root / "examples" / "version-v4.yaml")
    config = sidecar.load_config(root / "examples" / "sidecar.yaml", resolve_secrets=False)
    assert spec.candidate == pushed.version_id and spec.stable == config.version_ids()["v1"]
    snippet_spec = yaml.safe_load(snippet.group(1))
    assert load(**snippet_spec).blue_green is not None
