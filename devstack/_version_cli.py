"""`outrider version push FILE | list AGENT`: the version registry through the admin API.

`push` validates FILE with the sidecar's own `VersionConfig` (errors name the file and field,
exit 4), computes the id and sends the canonical content; the collector checks the id and
publishes the version, signed, to `outrider.versions`, where every sidecar of the agent picks
it up without a restart. Pushing the same content again changes nothing (same id). Exit 5
when the collector does not answer or refuses (PERMISSION_DENIED for a viewer).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import click
import grpc

from devstack._admin_client import AdminTarget, admin_target
from devstack._rollout_cli import (
    ADMIN_TIMEOUT_S,
    BadInput,
    _CiCommand,
    admin_call,
    admin_option,
    json_option,
    requested_by,
)
from outrider.v1 import admin_pb2_grpc, registry_pb2


def _ago(nanos: int, now: float) -> str:
    if not nanos:
        return "never"
    seconds = max(0.0, now - nanos / 1e9)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _when(nanos: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(nanos / 1e9)) if nanos else ""


@click.group("version")
def version() -> None:
    """Push agent versions to the registry (sidecars load them without a restart) and list them."""


@version.command("push", cls=_CiCommand)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@admin_option
@json_option
def push(file: Path, as_json: bool, **target: Any) -> None:
    """Validate the version in FILE (agent, optional label, version: one entry of a sidecar
    config's `versions:`), then publish it through the collector. Prints its id."""
    from sidecar import ConfigError, load_version_file

    try:
        found = load_version_file(file)
    except ConfigError as exc:
        raise BadInput(str(exc)) from exc
    admin = admin_target(**target)
    request = registry_pb2.PushVersionRequest(
        agent=found.agent,
        version_id=found.version_id,
        label=found.label,
        canonical_json=found.canonical_json(),
        source_name=str(file),
        requested_by=requested_by(),
    )
    response = admin_call(
        admin, lambda stub, md: stub.PushVersion(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
    )
    pushed = response.version
    if as_json:
        document = {
            "agent": pushed.agent,
            "version_id": pushed.version_id,
            "label": pushed.label,
            "model": found.config.model,
            "pushed_at": _when(pushed.pushed_at_unix_nano),
            "pushed_by": pushed.pushed_by,
            "already_present": response.already_present,
        }
        click.echo(json.dumps(document, indent=2, sort_keys=True))
        return
    what = "already in the registry" if response.already_present else "pushed"
    label = f" ({pushed.label})" if pushed.label else ""
    click.echo(
        f"{what}: {pushed.agent} version {pushed.version_id}{label}, model {found.config.model}, "
        f"by {pushed.pushed_by} at {_when(pushed.pushed_at_unix_nano)}"
    )


def _listing_json(response: registry_pb2.ListVersionsResponse, now: float) -> dict[str, Any]:
    return {
        "agent": response.agent,
        "versions": [
            {
                "version_id": v.version_id,
                "label": v.label,
                "model": v.model,
                "in_registry": v.in_registry,
                "pushed_at": _when(v.pushed_at_unix_nano) or None,
                "pushed_by": v.pushed_by or None,
                "sidecars": [
                    {
                        "sidecar_id": s.sidecar_id,
                        "label": s.label,
                        "source": s.source,
                        "last_seen": _when(s.last_seen_unix_nano),
                        "last_seen_s_ago": round(max(0.0, now - s.last_seen_unix_nano / 1e9), 3),
                    }
                    for s in v.sidecars
                ],
                "last_seen": _when(v.last_seen_unix_nano) or None,
            }
            for v in response.versions
        ],
    }


@version.command("list")
@click.argument("agent")
@admin_option
@json_option
def list_versions(agent: str, as_json: bool, **target: Any) -> None:
    """What the registry holds for AGENT and which sidecars report serving each version
    (config-file versions included, as reported)."""
    admin = admin_target(**target)
    request = registry_pb2.ListVersionsRequest(agent=agent)
    response = admin_call(
        admin, lambda stub, md: stub.ListVersions(request, timeout=ADMIN_TIMEOUT_S, metadata=md)
    )
    now = time.time()
    if as_json:
        click.echo(json.dumps(_listing_json(response, now), indent=2, sort_keys=True))
        return
    if not response.versions:
        click.echo(f"{agent}: no versions in the registry and none reported by a sidecar")
        return
    rows = [("VERSION", "LABEL", "MODEL", "REGISTRY", "SIDECARS", "LAST SEEN")]
    for v in response.versions:
        registry = (
            f"pushed {_when(v.pushed_at_unix_nano)} by {v.pushed_by}" if v.in_registry else "config only"
        )
        rows.append(
            (
                v.version_id,
                v.label or "-",
                v.model or "-",
                registry,
                str(len(v.sidecars)),
                _ago(v.last_seen_unix_nano, now) if v.sidecars else "not reported",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for v in response.versions:
        for s in v.sidecars:
            click.echo(
                f"  {v.version_id} served by {s.sidecar_id} ({s.source or 'config'}, "
                f"last report {_ago(s.last_seen_unix_nano, now)})"
            )


def wait_reported(target: AdminTarget, agent: str, version_ids: Collection[str], timeout_s: float) -> bool:
    """Poll `ListVersions` until a sidecar has reported serving every one of `version_ids`
    (what `rollout start` checks); whether it happened within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    request = registry_pb2.ListVersionsRequest(agent=agent)
    while True:
        with contextlib.suppress(grpc.RpcError), target.channel() as channel:
            response = admin_pb2_grpc.AdminStub(channel).ListVersions(
                request, timeout=ADMIN_TIMEOUT_S, metadata=target.metadata()
            )
            reported = {v.version_id for v in response.versions if v.sidecars or v.in_registry}
            if set(version_ids) <= reported:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
