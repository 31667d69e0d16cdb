"""The README's "Try a rollout", run exactly as written: its first shell block, line by line,
from the checkout root, against an `outrider dev` that this test starts on ports picked at run
time (`OUTRIDER_DEV_PORT_BASE`; the block's clients find it through `OUTRIDER_ADMIN_ADDR` and
`OUTRIDER_SIDECAR_ADDR`). Lines ending in `&` run in the background and are stopped by PID.

The 30 %-error candidate must be rolled back by the controller within 2 minutes of `rollout
start`, with a `rollout status` that says so, on a run directory an earlier run left behind.
The test prints the time from `rollout start` to the first status that says "rolled back".
The block's `rollout history` must then list that rollout, rolled back by the controller.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import DevStackProc, free_port_base

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
PORT_SPAN = 6  # devstack._dev_state offsets: simprovider, admin, sidecar, both metrics, openai
ROLLBACK_WITHIN_S = 120.0
LINE_TIMEOUT_S = 60.0
POLL_S = 2.0
DONE_WORDS = ("rolled back", "rolled_back", "promoted")


def readme_block() -> list[str]:
    """The first ```sh block under the heading that contains "Try a rollout"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = re.search(r"^#+ .*Try a rollout.*$", text, re.M)
    assert heading, 'README.md has no heading containing "Try a rollout"'
    block = re.search(r"^```(?:sh|bash|shell)\n(.*?)^```", text[heading.end() :], re.M | re.S)
    assert block, "no shell block under the Try a rollout heading"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def _says_done(output: str) -> bool:
    return any(word in output.lower() for word in DONE_WORDS)


def _rolled_back(output: str) -> bool:
    return "rolled back" in output.lower() or "ROLLED_BACK" in output


class Block:
    """Runs README lines as a user's shell would, with the addresses in the environment."""

    def __init__(self, port_base: int, log_dir: Path, state_dir: Path) -> None:
        # what `outrider dev` prints to export when it runs on a port base and a state dir
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "OUTRIDER_SESSION_KEY")},
            "OUTRIDER_ADMIN_ADDR": f"127.0.0.1:{port_base + 1}",
            "OUTRIDER_SIDECAR_ADDR": f"127.0.0.1:{port_base + 2}",
            "OUTRIDER_ADMIN_TOKEN_FILE": str(state_dir / "admin-token"),
        }
        self.log_dir = log_dir
        self.background: list[subprocess.Popen[bytes]] = []

    def run(self, line: str) -> str:
        done = subprocess.run(
            ["bash", "-c", line],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=LINE_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == 0, f"{line!r} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def start(self, line: str) -> subprocess.Popen[bytes]:
        # exec: the PID we hold is the command's own, so stopping it by PID stops it
        log = open(self.log_dir / f"background-{len(self.background)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            ["bash", "-c", "exec " + line.removesuffix("&").strip()],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.background.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_readme_block_keeps_its_shape() -> None:
    lines = readme_block()
    assert not any("scripts/dev" in line or "outrider dev" in line for line in lines)
    for line in lines:
        assert line.startswith((".venv/bin/", "sleep ")), (
            f"{line!r}: run from the checkout, no activated venv"
        )
    agents = [line for line in lines if "examples/agent.py" in line]
    assert len(agents) == 1 and agents[0].endswith("&"), "the agent runs in the background"
    duration = re.search(r"--duration (\d+)m\b", agents[0])
    assert duration and int(duration.group(1)) >= 10, "the agent keeps sending for at least 10 minutes"
    assert ".venv/bin/outrider rollout status support-bot" in lines
    history = ".venv/bin/outrider rollout history support-bot"
    assert history in lines and lines.index(history) > lines.index(
        ".venv/bin/outrider rollout status support-bot"
    )
    assert any("rollout start examples/rollout.yaml" in line for line in lines)


@pytest.mark.timeout(480)
# its agent writes .outrider/agent.log in the checkout, as the README says: one at a time
@pytest.mark.xdist_group("readme-agent-log")
def test_readme_demo_rolls_back_the_bad_candidate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = readme_block()
    base = free_port_base(PORT_SPAN)
    state = tmp_path / "dev-state"

    # an earlier run leaves its state behind: checkpoints naming a rollout and offsets that
    # the next run's fresh broker never had, a spill, a session key
    earlier = DevStackProc(ROOT, base, state, tmp_path / "dev-earlier.log")
    try:
        earlier.wait_up()
        Block(base, tmp_path, state).run(".venv/bin/outrider rollout start examples/rollout.yaml")
    finally:
        assert earlier.stop() == 0, earlier.output()
    assert any(state.rglob("*.ckpt")), "the earlier run left no checkpoint to trip over"

    dev = DevStackProc(ROOT, base, state, tmp_path / "dev.log")
    block = Block(base, tmp_path, state)
    started_at: float | None = None
    rolled_back_after: float | None = None
    status_line = ".venv/bin/outrider rollout status support-bot"
    last = ""
    history = ""
    try:
        dev.wait_up()
        for line in lines:
            if line.endswith("&"):
                block.start(line)
            elif line.startswith("sleep "):
                # the time passes as written; meanwhile the README's own status line, polled,
                # tells when the rollback happened
                until = time.monotonic() + float(line.split()[1])
                while time.monotonic() < until:
                    polling = started_at is not None and rolled_back_after is None
                    if polling and _rolled_back(block.run(status_line)):
                        assert started_at is not None
                        rolled_back_after = time.monotonic() - started_at
                    time.sleep(min(POLL_S, max(0.0, until - time.monotonic())))
            elif "rollout history" in line:
                # the history lists ended rollouts: a rollback later than the sleep is waited for
                while rolled_back_after is None and started_at is not None:
                    assert time.monotonic() - started_at < ROLLBACK_WITHIN_S + 60, "no rollback to list"
                    if _rolled_back(block.run(status_line)):
                        rolled_back_after = time.monotonic() - started_at
                    else:
                        time.sleep(POLL_S)
                history = block.run(line)
            else:
                out = block.run(line)
                if "rollout start" in line:
                    started_at = time.monotonic()
                    assert not _says_done(out), out
                elif "rollout status" in line:
                    last = out
                    if rolled_back_after is None and started_at is not None:
                        if _rolled_back(out):
                            rolled_back_after = time.monotonic() - started_at
                        else:
                            assert not _says_done(out), f"neither rolled back nor promoted yet:\n{out}"
        assert started_at is not None, "the block never started a rollout"
        # the block ends as it is written; if the rollback is later than that, wait for it so
        # the failure says by how much
        while rolled_back_after is None and time.monotonic() - started_at < ROLLBACK_WITHIN_S + 60:
            time.sleep(POLL_S)
            if _rolled_back(block.run(status_line)):
                rolled_back_after = time.monotonic() - started_at
        agent = block.background[0]
        assert agent.poll() is None, "the agent stopped sending"
        agent_log = (ROOT / ".outrider" / "agent.log").read_text()
    finally:
        block.stop()
        code = dev.stop()
    with capsys.disabled():
        seconds = "none" if rolled_back_after is None else f"{rolled_back_after:.1f}s"
        print(f"\nREADME demo: rolled back {seconds} after `rollout start`")
    assert code == 0, dev.output()
    assert rolled_back_after is not None and rolled_back_after <= ROLLBACK_WITHIN_S, (
        f"no rollback within {ROLLBACK_WITHIN_S}s (at {rolled_back_after}s):\n{last}"
    )
    assert _rolled_back(last), f"the block's last status does not say it rolled back:\n{last}"
    # and why: the errors gate, or latency or cost (retries also make v2 slower and dearer), or
    # the absolute trigger on one of those: which of them has its samples first is a race the
    # traffic's luck decides (the README names the gate as an example, "e.g.")
    reasons = [f"gate {g} found harm" for g in ("errors", "latency", "cost")]
    reasons += [f"trigger:{t} found harm" for t in ("error_rate", "latency_p99_ms", "cost_ratio")]
    assert any(reason in last for reason in reasons), last
    assert "canary" in agent_log and "stable" in agent_log, agent_log
    # newest first: this run's rollout, rolled back by the controller (the earlier run's never ended)
    rollout_id = re.search(r"^rollout\s+(\w+)", last, re.M)
    assert rollout_id, last
    rows = history.splitlines()
    assert rows and rows[0].split()[:2] == ["ROLLOUT", "STABLE"], history
    assert len(rows) == 2 and rows[1].startswith(rollout_id.group(1)), history
    assert "rolled back" in rows[1] and rows[1].rstrip().endswith("controller"), history
