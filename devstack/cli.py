"""The `outrider` command line.

Each subcommand imports only what it runs, so `outrider rollout ...` needs neither the
sidecar nor the collector, and the two never share a process unless a test puts them there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import TextIO

import click

from devstack import _flag_cli, _history_cli, _rollout_cli, _simulate_cli, _version_cli, _webhook_cli

ENV_KAFKA = "OUTRIDER_KAFKA_BOOTSTRAP"
ENV_ADMIN = _rollout_cli.ENV_ADMIN
ENV_LOG_LEVEL = "OUTRIDER_LOG_LEVEL"
ENV_DEV_PORT_BASE = "OUTRIDER_DEV_PORT_BASE"
DEFAULT_ADMIN_ADDR = _rollout_cli.DEFAULT_ADMIN_ADDR


@click.group()
@click.option(
    "--log-level",
    envvar=ENV_LOG_LEVEL,
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def main(log_level: str) -> None:
    """Outrider: ship AI-agent versions to production safely."""
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))


@main.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Sidecar YAML: the agent, its versions and tools.",
)
@click.option("--listen", help="host:port or unix:///path (default: the config's, 127.0.0.1:50051).")
@click.option("--kafka", envvar=ENV_KAFKA, help="Kafka bootstrap servers (default: the config's).")
@click.option("--metrics-port", type=int, help="Prometheus /metrics port (0 picks a free one).")
def sidecar(config_path: Path, listen: str | None, kafka: str | None, metrics_port: int | None) -> None:
    """Run the sidecar next to an agent."""
    import sidecar as sidecar_pkg

    try:
        config = sidecar_pkg.load_config(config_path)
    except sidecar_pkg.ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    config = config.with_overrides(listen=listen, kafka_bootstrap=kafka, metrics_port=metrics_port)
    from sidecar._loop import run as run_loop

    sys.exit(run_loop(sidecar_pkg.run(config)))


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Collector YAML (optional; defaults are fine for development).",
)
@click.option("--kafka", envvar=ENV_KAFKA, help="Kafka bootstrap servers.")
@click.option("--admin-listen", help="Admin gRPC address (default 127.0.0.1:50061).")
@click.option("--metrics-port", type=int, help="Prometheus /metrics port (0 picks a free one).")
@click.option(
    "--signing-key-file",
    envvar="OUTRIDER_CONTROL_SIGNING_KEY_FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ed25519 private key (PEM) that signs control records (`outrider keygen`).",
)
@click.option(
    "--control-public-keys",
    envvar="OUTRIDER_CONTROL_PUBLIC_KEYS",
    help="Comma-separated extra public keys trusted on read (files, directories, ed25519:<base64>).",
)
@click.option(
    "--admin-tokens-file",
    envvar="OUTRIDER_ADMIN_TOKENS_FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML of hashed admin bearer tokens (`outrider token`).",
)
@click.option(
    "--admin-reflection", is_flag=True, default=None, help="Serve gRPC reflection on the admin port."
)
def collector(
    config_path: Path | None,
    kafka: str | None,
    admin_listen: str | None,
    metrics_port: int | None,
    signing_key_file: Path | None,
    control_public_keys: str | None,
    admin_tokens_file: Path | None,
    admin_reflection: bool | None,
) -> None:
    """Run the collector: rolling metrics, gates and the rollout controller."""
    import collector as collector_pkg

    overrides: dict[str, object] = {
        "kafka_bootstrap": kafka,
        "admin_listen": admin_listen,
        "metrics_port": metrics_port,
        "signing_key_file": signing_key_file,
        "admin_tokens_file": admin_tokens_file,
        "admin_reflection": admin_reflection,
    }
    if control_public_keys:
        overrides["control_public_keys"] = tuple(
            k.strip() for k in control_public_keys.split(",") if k.strip()
        )
    try:
        settings = collector_pkg.load_settings(
            config_path, **{k: v for k, v in overrides.items() if v is not None}
        )
    except collector_pkg.SpecError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(asyncio.run(collector_pkg.run(settings, hard_exit=True)))


@main.command()
@click.option("--listen", default="127.0.0.1:8000", show_default=True, help="host:port to serve on.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML with per-model and per-tool latency and error rates.",
)
def simprovider(listen: str, config_path: Path | None) -> None:
    """Serve the simulated OpenAI-compatible provider and tool endpoints."""
    from devstack.simprovider import serve

    host, port = _split_host_port(listen)

    def ready(sim: object) -> None:
        click.echo(f"simulated provider on {getattr(sim, 'base_url', listen)}", err=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port, config_path, on_ready=ready))


@main.command()
@click.option(
    "--sidecar-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("examples/sidecar.yaml"),
    show_default=True,
)
@click.option(
    "--sim-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("examples/simprovider.yaml"),
    show_default=True,
)
@click.option(
    "--collector-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("examples/collector.yaml"),
    show_default=True,
)
@click.option(
    "--port-base",
    type=click.IntRange(1024, 65535 - 5),
    envvar=ENV_DEV_PORT_BASE,
    show_envvar=True,
    help="Every listener at base + offset: simulated provider +0, collector admin +1, sidecar +2, "
    "sidecar metrics +3, collector metrics +4 (default: 8000, 50061, 50051, 9464, 9465).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".outrider/dev"),
    show_default=True,
    help="Where the run keeps the collector's checkpoints, the sidecar's spill, the session key "
    "and the configs moved onto the ports.",
)
@click.option(
    "--keep-state",
    is_flag=True,
    help="Keep the state of the previous run (default: start fresh; the broker is in memory anyway).",
)
def dev(
    sidecar_config: Path,
    sim_config: Path,
    collector_config: Path,
    port_base: int | None,
    state_dir: Path,
    keep_state: bool,
) -> None:
    """Run everything on the embedded default: broker, collector, sidecar, simulated provider."""
    from devstack._dev_state import DevPorts
    from devstack.stack import DevStack, StackError

    for path in (sidecar_config, sim_config, collector_config):
        if not path.is_file():
            raise click.ClickException(f"{path}: not found (run from the repository root or pass the path)")
    stack = DevStack(
        sidecar_config=sidecar_config,
        sim_config=sim_config,
        collector_config=collector_config,
        ports=DevPorts.from_base(port_base),
        run_dir=state_dir,
        keep_state=keep_state,
    )
    try:
        sys.exit(stack.run_until_interrupted())
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory for <key id>.key (private, mode 0600) and <key id>.pub.",
)
def keygen(out_dir: Path) -> None:
    """Write a new Ed25519 key pair for signing control records (collector: the .key;
    sidecars and collectors: the .pub, in control.public_keys / OUTRIDER_CONTROL_PUBLIC_KEYS)."""
    import outrider

    key = outrider.SigningKey.generate()
    private_path, public_path = key.write(out_dir)
    click.echo(f"key id      {key.key_id}")
    click.echo(f"private key {private_path}")
    click.echo(f"public key  {public_path}")
    click.echo(f"inline      {key.public_text()}")


@main.command("init-secrets")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace files that exist.")
def init_secrets(directory: Path, force: bool) -> None:
    """Make what a deployment needs in DIRECTORY: control.key/.pub (signing), session-key,
    admin-token and admin-tokens.yaml (its hash); existing files are kept unless --force."""
    from devstack._secrets import make_secrets

    files = make_secrets(directory, overwrite=force)
    for label, path in vars(files).items():
        click.echo(f"{label:<13} {path}")


@main.command()
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator"]), default="viewer", show_default=True)
@click.option(
    "--tokens-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append the hashed entry to this tokens file (created if missing).",
)
def token(name: str, role: str, tokens_file: Path | None) -> None:
    """Make an admin bearer token for NAME: prints the token once (give it to the caller) and
    the hashed entry for the collector's admin_tokens_file."""
    import secrets

    import yaml

    from collector._auth import token_entry

    value = secrets.token_urlsafe(32)
    entry = token_entry(name, role, value)
    if tokens_file is not None:
        document = yaml.safe_load(tokens_file.read_text()) if tokens_file.exists() else None
        document = document if isinstance(document, dict) else {}
        document.setdefault("tokens", []).append(entry)
        tokens_file.write_text(yaml.safe_dump(document, sort_keys=False))
        click.echo(f"added {name} ({role}) to {tokens_file}", err=True)
    else:
        click.echo(yaml.safe_dump({"tokens": [entry]}, sort_keys=False), err=True)
    click.echo(value)


@main.command()
@click.option(
    "--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
def versions(config_path: Path) -> None:
    """Print the id of each version in a sidecar config (rollout specs name versions by id)."""
    import sidecar as sidecar_pkg

    try:
        config = sidecar_pkg.load_config(config_path, resolve_secrets=False)
    except sidecar_pkg.ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    for label, version_id in config.version_ids().items():
        marker = " (stable)" if label == config.stable else ""
        click.echo(f"{label}\t{version_id}{marker}")


@main.command()
@click.option(
    "-f", "--filename", "source", required=True, type=click.File("r"), help="Kubernetes YAML; - for stdin."
)
@click.option(
    "-o", "--output", "output", type=click.File("w"), default="-", help="Where to write; stdout by default."
)
@click.option(
    "--all", "inject_all", is_flag=True, help='Every pod, not only those asking (outrider.io/inject: "true").'
)
@click.option("--image", default=None, help="Sidecar image (default: the injection template's).")
@click.option(
    "--template",
    "template_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The injection patch (default: deploy/k8s/injection/sidecar-patch.yaml).",
)
def inject(
    source: TextIO,
    output: TextIO,
    inject_all: bool,
    image: str | None,
    template_path: Path | None,
) -> None:
    """Add the Outrider sidecar to the pod templates of a manifest, offline (GitOps)."""
    from devstack import _inject

    try:
        template = _inject.SidecarTemplate.load(template_path)
        result = _inject.inject_text(
            source.read(), source=source.name, template=template, inject_all=inject_all, image=image
        )
    except _inject.InjectError as exc:
        raise click.ClickException(str(exc)) from exc
    output.write(result.text)
    summary = f"injected {len(result.injected)} pod template(s)"
    if result.skipped:
        summary += f", {len(result.skipped)} already had the sidecar"
    click.echo(summary, err=True)


@main.group()
def rollout() -> None:
    """Start, watch, pause, resume, promote and abort rollouts through the collector's admin API;
    plan and simulate them locally."""


for _command in (*_rollout_cli.COMMANDS, *_history_cli.COMMANDS, *_simulate_cli.COMMANDS):
    rollout.add_command(_command)
main.add_command(_version_cli.version)
main.add_command(_flag_cli.flag)
for _command in _webhook_cli.COMMANDS:
    main.add_command(_command)


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{address!r}: expected host:port")
    return host or "127.0.0.1", int(port)
