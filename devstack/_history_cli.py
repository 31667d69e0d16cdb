"""`outrider rollout history AGENT` and `outrider rollout show ROLLOUT_ID`: the deployment
records of ended rollouts, from the collector's admin API (any replica: each tails
`outrider.deployments`). Exit codes as the other rollout commands: 0, 4 bad input, 5 the
collector refused (NOT_FOUND for an unknown rollout id) or is not there.

The renderers are pure (a message in, lines out), so they are unit-tested without a collector.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click
from google.protobuf import json_format

from devstack._admin_client import admin_target
from devstack._rollout_cli import ADMIN_TIMEOUT_S, BadInput, admin_call, admin_option
from devstack._status import VERDICTS, bounds_text, phase_label
from devstack._tenant_status import time_scale_line
from outrider.v1 import admin_pb2, control_pb2, deployment_pb2

_STAGE_ENDS = {
    "advanced": "advanced",
    "promoted": "promoted",
    "rolled_back": "rolled back",
    "aborted": "aborted",
}


def when(unix_nano: int) -> str:
    """A time as UTC, to the second; "-" when unset."""
    if not unix_nano:
        return "-"
    return datetime.fromtimestamp(unix_nano / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def took(seconds: float) -> str:
    """A duration people read: 45s, 12m 5s, 3h 20m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s" if seconds % 60 else f"{seconds // 60}m"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], indent: str = "") -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    return [
        (indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))).rstrip()
        for row in (header, *rows)
    ]


def history_lines(agent: str, deployments: list[deployment_pb2.DeploymentSummary]) -> list[str]:
    """The text of `outrider rollout history`: one ended rollout a line, newest first."""
    if not deployments:
        return [f"no ended rollouts of {agent} on record"]
    rows = [
        (
            d.rollout_id,
            f"{d.stable_version_id} -> {d.candidate_version_id}",
            phase_label(d.outcome),
            when(d.started_at_unix_nano),
            took(d.duration_s),
            d.decided_by,
        )
        for d in deployments
    ]
    return _table(("ROLLOUT", "STABLE -> CANDIDATE", "OUTCOME", "STARTED", "DURATION", "DECIDED BY"), rows)


def _gate_line(g: control_pb2.GateResult) -> str:
    label = "trigger" if g.kind == "trigger" else "gate"
    sides = f"candidate n={g.candidate_samples}, stable n={g.baseline_samples}"
    verdict = VERDICTS.get(g.verdict, g.verdict or "-")
    return f"      {label} {g.name}: {verdict}  {bounds_text(g) or '-'}  ({sides})"


def _baseline_lines(record: deployment_pb2.DeploymentRecord) -> list[str]:
    if record.outcome != control_pb2.ROLLOUT_PHASE_PROMOTED or record.baseline_s <= 0:
        return ["baseline    none"]
    if not record.HasField("baseline"):
        return [
            f"baseline    pending: {took(record.baseline_s)} at full traffic, "
            f"due {when(record.baseline_due_unix_nano)}"
        ]
    b = record.baseline
    partial = " (partial: part of the window had left the collector's retention)" if b.partial else ""
    return [
        f"baseline    {b.version_id} over {took(record.baseline_s)} from {when(b.from_unix_nano)} "
        f"to {when(b.to_unix_nano)}{partial}",
        f"            {b.requests} requests, {b.errors} errors ({b.error_rate:.2%}), latency p50 "
        f"{b.latency_p50_ms:.0f} / p95 {b.latency_p95_ms:.0f} / p99 {b.latency_p99_ms:.0f} ms",
        f"            cost per call ${b.cost_per_call:.4g}, thumbs-down {b.thumbs_down_rate:.2%}, task "
        f"failures {b.task_failure_rate:.2%}, safety events {b.safety_event_rate:.2%}, tool failures "
        f"{b.tool_failure_rate:.2%}",
    ]


def show_lines(record: deployment_pb2.DeploymentRecord) -> list[str]:
    """The text of `outrider rollout show`: the whole deployment record."""
    scaled = time_scale_line(record.time_scale)
    lines = [f"*** {scaled} ***"] if scaled else []
    lines += [
        f"rollout     {record.rollout_id}  (agent {record.agent})",
        f"versions    stable {record.stable_version_id} -> candidate {record.candidate_version_id}",
        f"outcome     {phase_label(record.outcome)} at {when(record.ended_at_unix_nano)} "
        f"(by {record.decided_by})",
        f"reason      {record.reason}",
        f"started     {when(record.started_at_unix_nano)}  duration {took(record.duration_s)}  "
        f"alpha {record.alpha:g}",
        "stages",
    ]
    rows = [
        (
            str(s.step_index + 1),
            f"{s.candidate_weight:.0%}",
            when(s.entered_at_unix_nano),
            when(s.left_at_unix_nano),
            took(s.duration_s),
            _STAGE_ENDS.get(s.ended, s.ended or "-"),
            str(s.holds),
            s.decided_by or "-",
        )
        for s in record.stages
    ]
    header = ("STEP", "WEIGHT", "ENTERED", "LEFT", "DURATION", "ENDED", "HOLDS", "BY")
    lines += _table(header, rows, indent="  ")
    dropped = f", {record.decisions_dropped} in between not kept" if record.decisions_dropped else ""
    lines.append(f"decisions   {len(record.decisions)}{dropped}")
    for d in record.decisions:
        lines.append(
            f"  gen {d.generation} {when(d.at_unix_nano)} {phase_label(d.phase)} step {d.step_index + 1} "
            f"weight {d.candidate_weight:.0%}: {d.reason} (by {d.decided_by})"
        )
        lines += [_gate_line(g) for g in d.gate_results]
    lines += _baseline_lines(record)
    lines.append("spec")
    lines += [f"  {line}" for line in record.spec_yaml.strip().splitlines()]
    return lines


def record_json(record: deployment_pb2.DeploymentRecord) -> dict[str, Any]:
    """`show --json`: the record as the admin API sent it (json_format.ParseDict reads it back)."""
    return json_format.MessageToDict(record, preserving_proto_field_name=True)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.command("history")
@click.argument("agent")
@click.option("--limit", type=int, default=0, help="At most this many, newest first (0: all).")
@admin_option
@json_option
def history(agent: str, limit: int, as_json: bool, **target: Any) -> None:
    """AGENT's ended rollouts, newest first: id, versions, outcome, start, duration, decided by."""
    if limit < 0:
        raise BadInput(f"--limit: must be >= 0 (got {limit})")
    admin = admin_target(**target)
    request = admin_pb2.ListDeploymentsRequest(agent=agent, limit=limit)
    answer = admin_call(
        admin, lambda stub, md: stub.ListDeployments(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
    )
    if as_json:
        found = [json_format.MessageToDict(d, preserving_proto_field_name=True) for d in answer.deployments]
        click.echo(json.dumps({"agent": agent, "deployments": found}, indent=2, sort_keys=True))
        return
    for line in history_lines(agent, list(answer.deployments)):
        click.echo(line)


@click.command("show")
@click.argument("rollout_id")
@admin_option
@json_option
def show(rollout_id: str, as_json: bool, **target: Any) -> None:
    """The deployment record of ROLLOUT_ID: spec, stages, decisions with gate bounds, baseline."""
    admin = admin_target(**target)
    request = admin_pb2.GetDeploymentRequest(rollout_id=rollout_id)
    record = admin_call(
        admin, lambda stub, md: stub.GetDeployment(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
    )
    if as_json:
        click.echo(json.dumps(record_json(record), indent=2, sort_keys=True))
        return
    for line in show_lines(record):
        click.echo(line)


COMMANDS = (history, show)
