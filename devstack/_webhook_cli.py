"""`outrider inject-webhook` (the admission webhook server) and `outrider inject-check` (pods
that missed injection)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import TextIO

import click

# where every pod finds its ServiceAccount (devstack._kube_list reads it only when asked)
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
EXIT_MISSING = 1  # inject-check found pods without the sidecar
EXIT_BAD_INPUT = 2


@click.command("inject-webhook")
@click.option(
    "--tls-cert-file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Serving certificate (PEM), e.g. cert-manager's tls.crt mounted from its Secret.",
)
@click.option(
    "--tls-key-file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Its private key (PEM), e.g. tls.key.",
)
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="host:port (port 0 picks one).")
@click.option("--image", default=None, help="Sidecar image (default: the injection template's).")
@click.option(
    "--template",
    "template_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The injection patch (default: deploy/k8s/injection/sidecar-patch.yaml).",
)
@click.option(
    "--tls-reload-interval",
    type=click.FloatRange(min=0.01),
    default=10.0,
    show_default=True,
    help="Seconds between checks of the TLS files for a rotated certificate.",
)
@click.option(
    "--shutdown-delay",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds to keep answering after SIGTERM while /healthz fails (endpoints catch up).",
)
def inject_webhook(
    tls_cert_file: Path,
    tls_key_file: Path,
    listen: str,
    image: str | None,
    template_path: Path | None,
    tls_reload_interval: float,
    shutdown_delay: float,
) -> None:
    """Serve the sidecar injection as a mutating admission webhook (HTTPS)."""
    from devstack import _inject, _webhook

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{listen!r}: expected host:port", param_hint="--listen")
    try:
        injector = _webhook.Injector(_inject.SidecarTemplate.load(template_path), image)
    except _inject.InjectError as exc:
        raise click.ClickException(str(exc)) from exc

    def ready(webhook: _webhook.RunningWebhook) -> None:
        paths = f"{_webhook.PATH_NAMESPACE}, {_webhook.PATH_POD}, {_webhook.PATH_HEALTH}"
        click.echo(f"inject-webhook on {webhook.url} ({paths})", err=True)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                _webhook.serve(
                    host.strip("[]") or "0.0.0.0",
                    int(port),
                    cert_file=tls_cert_file,
                    key_file=tls_key_file,
                    injector=injector,
                    reload_interval=tls_reload_interval,
                    shutdown_delay=shutdown_delay,
                    on_ready=ready,
                )
            )
    except (_webhook.WebhookError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("inject-check")
@click.option(
    "-f",
    "--filename",
    "source",
    type=click.File("r"),
    help="`kubectl get pods,namespaces -A -o json` (or -o yaml) output; - for stdin.",
)
@click.option(
    "--in-cluster",
    is_flag=True,
    help="Read pods and namespaces from the API with the pod's ServiceAccount (the CronJob).",
)
@click.option("--api-server", default=None, help="With --in-cluster: the API URL (default: the pod's env).")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=str(SERVICE_ACCOUNT / "token"),
    show_default=True,
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=str(SERVICE_ACCOUNT / "ca.crt"),
    show_default=True,
)
@click.option(
    "--exclude-namespace",
    "excluded",
    multiple=True,
    help="Namespaces the webhook never sees (default: kube-system, outrider). Repeatable.",
)
def inject_check(
    source: TextIO | None,
    in_cluster: bool,
    api_server: str | None,
    token_file: Path,
    ca_file: Path,
    excluded: tuple[str, ...],
) -> None:
    """List pods that should run the sidecar and do not; exit 1 when there are any."""
    from devstack import _inject_check, _kube_list

    if (source is None) == (not in_cluster):
        raise click.UsageError("give one of -f FILE and --in-cluster")
    try:
        if source is not None:
            objects = _inject_check.load_objects(source.read(), source.name)
        else:
            server = api_server or _kube_list.in_cluster_server()
            token, tls = _kube_list.credentials(token_file, ca_file)
            objects = asyncio.run(_kube_list.list_objects(server, token=token, tls=tls))
    except (_inject_check.CheckInputError, _kube_list.KubeListError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    result = _inject_check.check(objects, excluded=excluded or _inject_check.DEFAULT_EXCLUDED)
    if not result.namespaces_seen:
        click.echo(
            "warning: the input lists no Namespaces, so only annotated pods were checked "
            "(use `kubectl get pods,namespaces -A -o json`)",
            err=True,
        )
    for missing in result.missing:
        click.echo(str(missing))
    click.echo(
        f"{len(result.missing)} of {result.checked} pod(s) selected for injection lack the sidecar "
        f"({result.pods} pod(s) read)",
        err=True,
    )
    if result.missing:
        sys.exit(EXIT_MISSING)


COMMANDS = (inject_webhook, inject_check)
