"""The secrets a deployment needs, made in one directory (`outrider init-secrets DIR`, and
`outrider dev` each run):

- `control.key` (0600): the Ed25519 key that signs `outrider.control`; the collector
  (`OUTRIDER_CONTROL_SIGNING_KEY_FILE`);
- `control.pub`: its public half; sidecars and collectors (`OUTRIDER_CONTROL_PUBLIC_KEYS`);
- `session-key` (0600): the HMAC key for session tokens, the same on every replica; sidecars
  (`OUTRIDER_SESSION_KEY_FILE`);
- `admin-token` (0600): an operator bearer token; the `outrider rollout` CLI (`--token-file`,
  `OUTRIDER_ADMIN_TOKEN_FILE`);
- `admin-tokens.yaml`: its SHA-256 with a name and role operator; the collector
  (`OUTRIDER_ADMIN_TOKENS_FILE`).

Files that exist are kept unless `overwrite` (the dev stack makes new ones every run).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class SecretFiles:
    signing_key: Path
    public_key: Path
    session_key: Path
    admin_token: Path
    admin_tokens: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_secrets(directory: Path, *, overwrite: bool = False, token_name: str = "operator") -> SecretFiles:
    import outrider
    from collector._auth import token_entry

    directory.mkdir(parents=True, exist_ok=True)
    files = SecretFiles(
        directory / "control.key",
        directory / "control.pub",
        directory / "session-key",
        directory / "admin-token",
        directory / "admin-tokens.yaml",
    )
    if overwrite or not files.signing_key.exists():
        signer = outrider.SigningKey.generate()
        _write_private(files.signing_key, signer.private_pem())
        files.public_key.write_bytes(signer.public_pem())
    if overwrite or not files.session_key.exists():
        _write_private(files.session_key, (secrets.token_hex(32) + "\n").encode())
    if overwrite or not files.admin_token.exists() or not files.admin_tokens.exists():
        token = secrets.token_urlsafe(32)
        _write_private(files.admin_token, (token + "\n").encode())
        document = {"tokens": [token_entry(token_name, "operator", token)]}
        files.admin_tokens.write_text(yaml.safe_dump(document, sort_keys=False))
    return files
