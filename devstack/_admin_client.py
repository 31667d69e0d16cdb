"""How the `outrider rollout` commands reach the collector's admin API: address, bearer token
and TLS.

The token comes from `--token-file`, else `$OUTRIDER_ADMIN_TOKEN`, else the file
`outrider dev` writes (`.outrider/dev/admin-token`, in the working directory); it travels as
`authorization: Bearer <token>` metadata. `--tls-ca` (with `--tls-cert`/`--tls-key` for mTLS)
makes the channel TLS; without them it is plaintext (loopback in dev).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import click
import grpc

ENV_ADMIN_TOKEN = "OUTRIDER_ADMIN_TOKEN"
ENV_ADMIN_TOKEN_FILE = "OUTRIDER_ADMIN_TOKEN_FILE"
DEV_DIR = Path(".outrider/dev")
DEV_TOKEN_FILE = DEV_DIR / "admin-token"

T = TypeVar("T")


@dataclass(frozen=True)
class AdminTarget:
    address: str
    token: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self) -> grpc.Channel:
        if self.tls_ca is None and self.tls_cert is None:
            return grpc.insecure_channel(self.address)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca.read_bytes() if self.tls_ca else None,
            private_key=self.tls_key.read_bytes() if self.tls_key else None,
            certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None,
        )
        return grpc.secure_channel(self.address, credentials)


def resolve_token(token_file: Path | None, env_token: str | None) -> str | None:
    """--token-file, else $OUTRIDER_ADMIN_TOKEN, else the dev stack's token file if present."""
    path = token_file
    if path is None and env_token:
        return env_token.strip()
    if path is None and DEV_TOKEN_FILE.is_file():
        path = DEV_TOKEN_FILE
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read the admin token: {exc.strerror or exc}") from None


def admin_options(func: Callable[..., object]) -> Callable[..., object]:
    """--admin, --token-file, --tls-ca, --tls-cert, --tls-key."""
    path = click.Path(exists=True, dir_okay=False, path_type=Path)
    for option in reversed(
        [
            click.option(
                "--admin",
                envvar="OUTRIDER_ADMIN_ADDR",
                default="127.0.0.1:50061",
                show_default=True,
                help="The collector's admin gRPC address.",
            ),
            click.option(
                "--token-file",
                type=path,
                envvar=ENV_ADMIN_TOKEN_FILE,
                help=f"A file holding the bearer token (default ${ENV_ADMIN_TOKEN}, then {DEV_TOKEN_FILE}).",
            ),
            click.option(
                "--tls-ca", type=path, help="CA bundle that signed the collector's admin certificate."
            ),
            click.option("--tls-cert", type=path, help="Client certificate (mTLS)."),
            click.option("--tls-key", type=path, help="Client private key (mTLS)."),
        ]
    ):
        func = option(func)
    return func


def admin_target(
    admin: str, token_file: Path | None, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None
) -> AdminTarget:
    import os

    token = resolve_token(token_file, os.environ.get(ENV_ADMIN_TOKEN))
    return AdminTarget(admin, token, tls_ca, tls_cert, tls_key)
