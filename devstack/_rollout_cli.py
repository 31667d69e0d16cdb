"""`outrider rollout start | status | watch | pause | resume | promote | abort | switch-back`: the
admin API's client. Needs neither the sidecar nor the collector packages, only the contract.

`start --wait` is for CI pipelines; its exit codes (and `start`'s without --wait):

    0  promoted              3  still HOLD, NO_DATA or running when --timeout ran out
    1  rolled back           4  bad input: an invalid spec or bad flags
    2  aborted               5  no answer from the collector, or it refused (a rollout already runs)
"""

from __future__ import annotations

import contextlib
import getpass
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from devstack._admin_client import ENV_ADMIN_TOKEN, AdminTarget, admin_options, admin_target
from devstack._status import ENDED, phase_label, render_status, status_json
from outrider.v1 import admin_pb2, admin_pb2_grpc, control_pb2

ENV_ADMIN = "OUTRIDER_ADMIN_ADDR"
DEFAULT_ADMIN_ADDR = "127.0.0.1:50061"
ADMIN_TIMEOUT_S = 10.0
DEFAULT_POLL = "2s"
EXIT_PROMOTED, EXIT_ROLLED_BACK, EXIT_ABORTED, EXIT_TIMEOUT, EXIT_BAD_INPUT, EXIT_ERROR = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
SHADOW_COMPLETE = "shadow run complete"  # collector._shadow_phase: how a pure shadow run ends
WAIT_EXITS = {
    control_pb2.ROLLOUT_PHASE_PROMOTED: EXIT_PROMOTED,
    control_pb2.ROLLOUT_PHASE_ROLLED_BACK: EXIT_ROLLED_BACK,
    control_pb2.ROLLOUT_PHASE_ABORTED: EXIT_ABORTED,
}
T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]


class BadInput(click.ClickException):
    exit_code = EXIT_BAD_INPUT


class AdminFailed(click.ClickException):
    exit_code = EXIT_ERROR


class _CiCommand(click.Command):
    """A command whose usage errors (bad flags, a missing file) exit 4, not click's 2, which
    `start --wait` uses for "aborted"."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _BadUsage(exc.message, exc.ctx) from exc


class _BadUsage(click.UsageError):
    exit_code = EXIT_BAD_INPUT


def requested_by() -> str:
    """Who the CLI says is asking; the collector records it (until it authenticates callers)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no USER variable and no passwd entry (some containers)
        name = "unknown"
    return f"cli:{name}"


def admin_call(target: AdminTarget, call: Callable[[admin_pb2_grpc.AdminStub, Metadata], T]) -> T:
    """One admin RPC with the target's credentials; errors become click exceptions with the code
    and a readable detail."""
    with target.channel() as channel:
        try:
            return call(admin_pb2_grpc.AdminStub(channel), target.metadata())
        except grpc.RpcError as exc:
            code = exc.code()
            detail = exc.details()
            if code == grpc.StatusCode.UNAVAILABLE:
                detail = f"no collector admin API at {target.address} ({detail})"
            elif code == grpc.StatusCode.UNAUTHENTICATED:
                detail = f"{detail} (set {ENV_ADMIN_TOKEN} or pass --token-file)"
            error = BadInput if code == grpc.StatusCode.INVALID_ARGUMENT else AdminFailed
            raise error(f"{code.name}: {detail}") from exc


def print_status(
    status: admin_pb2.RolloutStatus, as_json: bool, labels: Mapping[str, str] | None = None
) -> None:
    if as_json:
        click.echo(json.dumps(status_json(status, labels), indent=2, sort_keys=True))
        return
    for line in render_status(status, labels=labels):
        click.echo(line)


def version_labels(sidecar_config: Path | None) -> dict[str, str]:
    """Version id -> label from a sidecar config: the collector sees only ids."""
    if sidecar_config is None:
        return {}
    import sidecar as sidecar_pkg

    try:
        config = sidecar_pkg.load_config(sidecar_config, resolve_secrets=False)
    except sidecar_pkg.ConfigError as exc:
        raise BadInput(str(exc)) from exc
    return {version_id: label for label, version_id in config.version_ids().items()}


def _seconds(value: str | None, flag: str) -> float | None:
    from outrider.durations import parse_duration  # the one duration parser, pure

    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise BadInput(f"{flag}: {exc}") from exc
    if seconds <= 0:
        raise BadInput(f"{flag}: must be longer than 0s")
    return seconds


admin_option = admin_options  # --admin and the credentials (devstack._admin_client)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
labels_option = click.option(
    "--sidecar-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A sidecar config: shows its version labels next to the ids.",
)
reason_option = click.option("--reason", required=True, help="Why: recorded with who asked.")


@click.command("start", cls=_CiCommand)
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Block until the rollout ends; the exit code says how.")
@click.option("--timeout", help="With --wait: give up after this long (30s, 10m, 2h); exit 3.")
@click.option(
    "--poll-interval", default=DEFAULT_POLL, show_default=True, help="With --wait: how often to ask."
)
@admin_option
@json_option
def start(
    spec: Path, wait: bool, timeout: str | None, poll_interval: str, as_json: bool, **target: Any
) -> None:
    """Start the rollout described by SPEC (YAML). With --wait, exit 0 promoted, 1 rolled back,
    2 aborted, 3 still undecided at --timeout, 4 bad input, 5 collector errors."""
    admin = admin_target(**target)
    limit = _seconds(timeout, "--timeout")
    every = _seconds(poll_interval, "--poll-interval")
    assert every is not None
    if limit is not None and not wait:
        raise BadInput("--timeout: only with --wait")
    try:
        text = spec.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{spec}: cannot read: {exc}") from exc
    request = admin_pb2.StartRolloutRequest(
        spec_yaml=text, source_name=str(spec), requested_by=requested_by()
    )
    status = admin_call(
        admin, lambda stub, md: stub.StartRollout(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
    )
    if not (wait and as_json):  # with --wait, --json prints one document: the outcome
        print_status(status, as_json)
    if wait:
        sys.exit(wait_for_end(admin, status.state.agent, status.state.rollout_id, limit, every, as_json))


def wait_for_end(
    admin: AdminTarget,
    agent: str,
    rollout_id: str,
    timeout_s: float | None,
    every_s: float,
    as_json: bool,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Poll until the rollout ends; its exit code. A collector that is briefly away (a restart)
    is asked again until the timeout: a CI job should not fail on a blip."""
    deadline = None if timeout_s is None else clock() + timeout_s
    request = admin_pb2.GetRolloutRequest(agent=agent)
    last: tuple[int, int] | None = None
    phase = control_pb2.ROLLOUT_PHASE_RUNNING
    try:
        while True:
            try:
                status = admin_call(
                    admin, lambda stub, md: stub.GetRollout(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
                )
            except AdminFailed as exc:
                click.echo(f"waiting: {exc.message}", err=True)
            else:
                state = status.state
                if state.rollout_id != rollout_id:
                    click.echo(f"rollout {rollout_id} was replaced by {state.rollout_id}", err=True)
                    return EXIT_ERROR
                phase = state.phase
                if (state.generation, phase) != last:
                    last = (state.generation, phase)
                    weight = state.candidate_weight
                    where = f"step {state.step_index + 1}/{state.step_count}, weight {weight:.0%}"
                    click.echo(f"waiting: {agent} {phase_label(phase)} at {where}: {state.reason}", err=True)
                if phase in ENDED:
                    print_status(status, as_json)
                    shadow_done = state.reason.startswith(SHADOW_COMPLETE)
                    if phase == control_pb2.ROLLOUT_PHASE_ABORTED and shadow_done:
                        return EXIT_PROMOTED  # a pure shadow run whose gates passed: a success
                    return WAIT_EXITS[phase]
            if deadline is not None and clock() >= deadline:
                click.echo(f"timed out: {agent} still {phase_label(phase)} after {timeout_s:g}s", err=True)
                return EXIT_TIMEOUT
            left = every_s if deadline is None else max(0.0, min(every_s, deadline - clock()))
            sleep(left)
    except KeyboardInterrupt:
        click.echo("interrupted; the rollout goes on", err=True)
        return EXIT_INTERRUPTED


@click.command("status")
@click.argument("agent")
@admin_option
@json_option
@labels_option
def status(agent: str, as_json: bool, sidecar_config: Path | None, **target: Any) -> None:
    """The controller's live evaluation of AGENT's rollout: phase, gates, versions, record."""
    admin = admin_target(**target)
    labels = version_labels(sidecar_config)
    request = admin_pb2.GetRolloutRequest(agent=agent)
    answer = admin_call(
        admin, lambda stub, md: stub.GetRollout(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
    )
    print_status(answer, as_json, labels)


@click.command("watch")
@click.argument("agent")
@click.option("--interval", default=DEFAULT_POLL, show_default=True, help="How often to refresh.")
@admin_option
@labels_option
def watch(agent: str, interval: str, sidecar_config: Path | None, **target: Any) -> None:
    """AGENT's status, refreshed live with each gate's bounds over time; ends with the rollout."""
    admin = admin_target(**target)
    from rich.console import Console

    from devstack._watch import watch as run_watch

    every = _seconds(interval, "--interval")
    assert every is not None
    labels = version_labels(sidecar_config)
    request = admin_pb2.GetRolloutRequest(agent=agent)
    console = Console()
    if not console.is_terminal:
        console = Console(soft_wrap=True)  # logs and pipes: whole lines, never wrapped mid-word
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the watch, not the rollout
        run_watch(
            lambda: admin_call(
                admin, lambda s, md: s.GetRollout(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
            ),
            console,
            every,
            labels=labels,
        )


def _verb(
    name: str, rpc: str, request_type: Any, help_text: str, reason: Callable[[Any], Any] = reason_option
) -> click.Command:
    @click.command(name, help=help_text)
    @click.argument("agent")
    @reason
    @admin_option
    @json_option
    def command(agent: str, reason: str, as_json: bool, **target: Any) -> None:
        admin = admin_target(**target)
        request = request_type(agent=agent, reason=reason, requested_by=requested_by())
        print_status(
            admin_call(
                admin, lambda stub, md: getattr(stub, rpc)(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
            ),
            as_json,
        )

    return command


pause = _verb(
    "pause",
    "PauseRollout",
    admin_pb2.PauseRolloutRequest,
    "Hold AGENT's rollout at its current weight until `resume`.",
)
resume = _verb(
    "resume",
    "ResumeRollout",
    admin_pb2.ResumeRolloutRequest,
    "Release a HOLD. The evidence stays: a hold gate that still shows harm holds again at the next look.",
)
promote = _verb(
    "promote",
    "PromoteRollout",
    admin_pb2.PromoteRolloutRequest,
    "Promote AGENT's candidate now, whatever the gates say (recorded as your decision).",
)
abort = _verb(
    "abort",
    "AbortRollout",
    admin_pb2.AbortRolloutRequest,
    "Stop AGENT's rollout: new sessions go to stable at once.",
    # optional, as it always was: stopping a bad rollout must not wait on wording
    click.option(
        "--reason", default="aborted by operator", show_default=True, help="Why: recorded with who asked."
    ),
)
switch_back = _verb(
    "switch-back",
    "SwitchBack",
    admin_pb2.SwitchBackRequest,
    "Blue-green: send AGENT's new sessions back to blue (stable) at once; green's sessions drain.",
    click.option(
        "--reason",
        default="switched back by operator",
        show_default=True,
        help="Why: recorded with who asked.",
    ),
)
COMMANDS = (start, status, watch, pause, resume, promote, abort, switch_back)
