"""The framework example agents (examples/openai_agent.py, langchain_agent.py, agents_sdk_agent.py),
each run as a user runs it, `.venv/bin/python examples/NAME`, from the checkout root against ONE
`outrider dev` (ports picked at run time; the agents find its endpoint through the
`OUTRIDER_OPENAI_BASE_URL` the stack prints). Each must loop: the model asks for `lookup_order`,
the agent runs it and sends the result back, the model answers in text.

No network beyond loopback is used: proxies are dropped from the environment, and tiktoken's
cache is an empty directory that must stay empty (its encodings would be downloaded).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_readme_demo import PORT_SPAN
from tests.support import DevStackProc, free_port_base

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ("openai_agent.py", "langchain_agent.py", "agents_sdk_agent.py")
RUN_TIMEOUT_S = 90.0
# what the simulated model says after the tool ran, with the agent's tool result in it
FINAL_ANSWER = re.compile(r"^answer: Simulated reply from sim-good to tool result: .*\"shipped\"", re.M)


def command(example: str) -> str:
    return f".venv/bin/python examples/{example}"


@dataclass
class Stack:
    base_url: str
    tmp: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("example-agents")
    dev = DevStackProc(ROOT, free_port_base(PORT_SPAN), tmp / "dev-state", tmp / "dev.log")
    try:
        dev.wait_up()
        exported = re.search(r"OUTRIDER_OPENAI_BASE_URL=(\S+)", dev.output())
        assert exported, f"outrider dev does not print OUTRIDER_OPENAI_BASE_URL:\n{dev.output()}"
        assert f"openai {exported.group(1)}" in dev.output(), "the sidecar's line names another URL"
        yield Stack(exported.group(1), tmp)
    finally:
        code = dev.stop()
    assert code == 0, dev.output()


def run_agent(stack: Stack, line: str) -> subprocess.CompletedProcess[str]:
    """`line` as a shell runs it, in the checkout, with the URL `outrider dev` printed exported."""
    cache = stack.tmp / f"tiktoken-{len(list(stack.tmp.glob('tiktoken-*')))}"
    cache.mkdir()
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.lower().endswith("_proxy")
            and k not in ("VIRTUAL_ENV", "OPENAI_API_KEY", "OPENAI_BASE_URL")
        },
        "OUTRIDER_OPENAI_BASE_URL": stack.base_url,
        "TIKTOKEN_CACHE_DIR": str(cache),
    }
    done = subprocess.run(
        ["bash", "-c", line],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"{line!r} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    assert not any(cache.iterdir()), f"{line!r} loaded a tiktoken encoding"
    return done


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_agent_runs_its_tool_loop_against_outrider_dev(stack: Stack, example: str) -> None:
    done = run_agent(stack, command(example))
    assert re.search(r"^tool lookup_order\(.*A1", done.stdout, re.M), done.stdout
    assert "shipped" in done.stdout.split("tool lookup_order", 1)[1], "the tool's result is not shown"
    assert FINAL_ANSWER.search(done.stdout), done.stdout
    if example == "agents_sdk_agent.py":
        # with the SDK's tracing on and no OPENAI_API_KEY, it says it skips the export to OpenAI
        assert "trace" not in done.stderr.lower(), done.stderr


def test_readme_wire_your_agent_names_the_examples_and_their_command() -> None:
    """The README's command is the one the tests above run, word for word, in the same way."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = re.search(r"^### Wire your agent$", text, re.M)
    assert heading, "README.md has no 'Wire your agent' section"
    section = text[heading.end() :].split("\n## ", 1)[0]
    for example in EXAMPLES:
        assert f"`examples/{example}`" in section, f"the section does not name examples/{example}"
    commands = re.findall(r"`(\.venv/bin/python examples/[^`]*)`", section)
    assert commands, "the section shows no command running an example"
    assert set(commands) <= {command(example) for example in EXAMPLES}, commands
