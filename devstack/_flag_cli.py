"""`outrider flag set | list | clear`: feature flags through the collector's admin API (same
address, token and TLS options as `outrider rollout ...`). Needs only the contract.

    outrider flag set support-bot refunds --share 10% --sticky-by tenant --tenant acme --reason "beta"
    outrider flag list support-bot [--json]
    outrider flag clear support-bot refunds --reason "back to the config default"

A set flag is on for `--tenant` tenants always and for the share of users or tenants (sticky
by `--sticky-by`); `clear` puts the sidecar config's default back. `list` shows each flag's
setting and its figures on against off, from the events.
"""

from __future__ import annotations

import json
from typing import Any

import click
from google.protobuf import json_format

from devstack._admin_client import admin_target
from devstack._rollout_cli import (
    ADMIN_TIMEOUT_S,
    BadInput,
    admin_call,
    admin_option,
    json_option,
    requested_by,
)
from outrider.v1 import admin_pb2, common_pb2

_STICKY = {"user": common_pb2.STICKY_BY_USER, "tenant": common_pb2.STICKY_BY_TENANT}
_STICKY_NAMES = {value: name for name, value in _STICKY.items()}


def parse_share(text: str) -> float:
    """A percentage as a fraction: `--share 10%` and `--share 10` are both 0.1."""
    value = text.strip().removesuffix("%").strip()
    try:
        number = float(value)
    except ValueError:
        raise BadInput(f"--share: expected a percentage such as 10%, got {text!r}") from None
    if not 0.0 <= number <= 100.0:
        raise BadInput(f"--share: must be between 0% and 100%, got {text!r}")
    return number / 100.0


def _describe(status: admin_pb2.FlagStatus) -> list[str]:
    state = status.state
    if state.generation == 0 or state.cleared:
        setting = "config default" + (" (cleared)" if state.cleared else "")
    else:
        setting = f"{state.share:.0%} of {_STICKY_NAMES.get(state.sticky_by, 'tenant')}s"
        if state.tenants:
            setting += f" + tenants {', '.join(state.tenants)}"
    head = f"{state.name}: {setting}"
    if state.generation:
        head += f"  (generation {state.generation}, by {state.set_by or '?'}"
        head += f": {state.reason})" if state.reason else ")"
    lines = [head]
    for arm in status.arms:
        lines.append(
            f"  {'on ' if arm.on else 'off'}  requests {arm.requests:>6}  errors {arm.errors:>5} "
            f"({arm.error_rate:.1%})  p95 {arm.latency_p95_ms:7.1f} ms  sessions {arm.sessions}"
        )
    return lines


def _flag_json(status: admin_pb2.FlagStatus) -> dict[str, Any]:
    return json_format.MessageToDict(
        status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _print(statuses: list[admin_pb2.FlagStatus], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"flags": [_flag_json(s) for s in statuses]}, indent=2, sort_keys=True))
        return
    if not statuses:
        click.echo("no flags known (none set, none seen in events)")
    for status in statuses:
        for line in _describe(status):
            click.echo(line)


@click.group("flag")
def flag() -> None:
    """Turn feature flags on for a share of users or tenants, list them, clear them."""


@flag.command("set")
@click.argument("agent")
@click.argument("name")
@click.option("--share", default="0%", show_default=True, help="Of users or tenants (sticky): 10%.")
@click.option("--sticky-by", type=click.Choice(sorted(_STICKY)), default="tenant", show_default=True)
@click.option("--tenant", "tenants", multiple=True, help="A tenant that always has it on (repeat).")
@click.option("--reason", default="", help="Why: recorded with who asked.")
@admin_option
@json_option
def set_flag(
    agent: str,
    name: str,
    share: str,
    sticky_by: str,
    tenants: tuple[str, ...],
    reason: str,
    as_json: bool,
    **target: Any,
) -> None:
    """Set flag NAME of AGENT at run time (a signed record; sidecars apply it without a restart)."""
    request = admin_pb2.SetFlagRequest(
        agent=agent,
        name=name,
        share=parse_share(share),
        sticky_by=_STICKY[sticky_by],
        tenants=list(tenants),
        reason=reason,
        requested_by=requested_by(),
    )
    answer = admin_call(
        admin_target(**target), lambda stub, md: stub.SetFlag(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
    )
    _print([answer], as_json)


@flag.command("clear")
@click.argument("agent")
@click.argument("name")
@click.option("--reason", default="", help="Why: recorded with who asked.")
@admin_option
@json_option
def clear_flag(agent: str, name: str, reason: str, as_json: bool, **target: Any) -> None:
    """Put flag NAME of AGENT back to the sidecar config's default."""
    request = admin_pb2.ClearFlagRequest(agent=agent, name=name, reason=reason, requested_by=requested_by())
    answer = admin_call(
        admin_target(**target), lambda stub, md: stub.ClearFlag(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
    )
    _print([answer], as_json)


@flag.command("list")
@click.argument("agent")
@admin_option
@json_option
def list_flags(agent: str, as_json: bool, **target: Any) -> None:
    """AGENT's flags: each one's setting and its figures on against off."""
    request = admin_pb2.ListFlagsRequest(agent=agent)
    answer = admin_call(
        admin_target(**target), lambda stub, md: stub.ListFlags(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
    )
    _print(list(answer.flags), as_json)
