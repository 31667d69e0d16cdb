"""The framework example agents (examples/openai_agent.py, langchain_agent.py, agents_sdk_agent.py),
each run as a user runs it, `.venv/bin/python examples/NAME`, from the checkout root, all three
at once against one `outrider dev` (ports picked at run time; the agents find its endpoint
through the `OUTRIDER_OPENAI_BASE_URL` the stack prints). Each must loop: the model asks for
`lookup_order`, the agent runs it and sends the result back, the model answers in text.

One test, not one per example on a module-scoped stack: xdist ignores `xdist_group` under
pytest 9 and would spread such tests, and with them copies of the stack, over its workers.

No network beyond loopback is used: proxies are dropped from the environment, and tiktoken's
cache is an empty directory that must stay empty (its encodings would be downloaded).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
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


@pytest.fixture
def dev_url(tmp_path: Path) -> Iterator[str]:
    """`outrider dev` up; the endpoint URL it exports for the examples."""
    dev = DevStackProc(ROOT, free_port_base(PORT_SPAN), tmp_path / "dev-state", tmp_path / "dev.log")
    try:
        dev.wait_up()
        exported = re.search(r"OUTRIDER_OPENAI_BASE_URL=(\S+)", dev.output())
        assert exported, f"outrider dev does not print OUTRIDER_OPENAI_BASE_URL:\n{dev.output()}"
        assert f"openai {exported.group(1)}" in dev.output(), "the sidecar's line names another URL"
        yield exported.group(1)
    finally:
        code = dev.stop()
    assert code == 0, dev.output()


def start_agent(line: str, base_url: str, tmp: Path) -> subprocess.Popen[str]:
    """`line` as a shell runs it, in the checkout, with the URL `outrider dev` printed exported
    and tiktoken's cache an empty directory (`tmp`/tiktoken)."""
    (tmp / "tiktoken").mkdir(parents=True)
    dropped = ("VIRTUAL_ENV", "OPENAI_API_KEY", "OPENAI_BASE_URL")
    env = {
        **{k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k not in dropped},
        "OUTRIDER_OPENAI_BASE_URL": base_url,
        "TIKTOKEN_CACHE_DIR": str(tmp / "tiktoken"),
    }
    return subprocess.Popen(
        ["bash", "-c", "exec " + line],  # exec: the PID held is the agent's own
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def check_agent(example: str, stdout: str, stderr: str) -> None:
    assert re.search(r"^tool lookup_order\(.*A1", stdout, re.M), "the tool was not run"
    assert "shipped" in stdout.split("tool lookup_order", 1)[1], "the tool's result is not shown"
    assert FINAL_ANSWER.search(stdout), "no answer built on the tool's result"
    if example == "agents_sdk_agent.py":
        # with the SDK's tracing on and no OPENAI_API_KEY, it says it skips the export to OpenAI
        assert "trace" not in stderr.lower(), "the Agents SDK's tracing is on"


# the stack (~15 s) and three agents importing their frameworks (LangChain, the Agents SDK: ~4 s
# a run on a quiet machine, 15 to 45 s for the three on a loaded one)
@pytest.mark.timeout(240)
def test_example_agents_run_their_tool_loops_against_outrider_dev(dev_url: str, tmp_path: Path) -> None:
    # one test on one stack (starting `outrider dev` costs ~10 s), the three agents at once
    procs = {ex: start_agent(command(ex), dev_url, tmp_path / ex) for ex in EXAMPLES}
    failures = []
    try:
        for example, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
            try:
                assert proc.returncode == 0, f"exited with {proc.returncode}"
                assert not any((tmp_path / example / "tiktoken").iterdir()), "a tiktoken encoding was loaded"
                check_agent(example, stdout, stderr)
            except AssertionError as exc:
                failures.append(f"{command(example)}: {exc}\n{stdout}\n{stderr}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert not failures, "\n\n".join(failures)


def test_readme_wire_your_agent_names_the_examples_and_their_command() -> None:
    """The README's command is the one the test above runs, word for word, in the same way."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = re.search(r"^### Wire your agent$", text, re.M)
    assert heading, "README.md has no 'Wire your agent' section"
    section = text[heading.end() :].split("\n## ", 1)[0]
    for example in EXAMPLES:
        assert f"`examples/{example}`" in section, f"the section does not name examples/{example}"
    commands = re.findall(r"`(\.venv/bin/python examples/[^`]*)`", section)
    assert commands, "the section shows no command running an example"
    assert set(commands) <= {command(example) for example in EXAMPLES}, commands
