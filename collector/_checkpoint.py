"""Checkpoints: the window state and the totals TOGETHER with the consumed offsets.

One file per consumer group in `state_dir` (`<group>.ckpt`: zlib-compressed JSON), written
to a temporary file, fsynced and renamed over the old one, so a reader sees either the old
checkpoint or the new one, never half of one. A checkpoint says "the state holds exactly the
events before these offsets", so a restarted collector loads it, seeks each partition to its
offset and re-reads what came after: nothing lost, nothing counted twice.

A checkpoint names the Kafka bootstrap it was taken against; one from another bootstrap (a
dev broker on another port, say) is ignored rather than mixed into a different log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1
SUFFIX = ".ckpt"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> the next offset to consume


class CheckpointError(Exception):
    """A checkpoint file exists but cannot be used (corrupt, another format)."""


@dataclass
class Checkpoint:
    offsets: Offsets
    windows: dict[str, Any]
    totals: dict[str, Any]
    bootstrap: str = ""
    written_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def encode(checkpoint: Checkpoint) -> bytes:
    """The file's bytes (JSON, compressed); call this where the state cannot change meanwhile."""
    document = {
        "format": FORMAT,
        "bootstrap": checkpoint.bootstrap,
        "written_at": checkpoint.written_at,
        "offsets": [[topic, partition, offset] for (topic, partition), offset in checkpoint.offsets.items()],
        "windows": checkpoint.windows,
        "totals": checkpoint.totals,
        "extra": checkpoint.extra,
    }
    return zlib.compress(json.dumps(document, separators=(",", ":")).encode("utf-8"), 1)


def decode(data: bytes) -> Checkpoint:
    try:
        document = json.loads(zlib.decompress(data))
    except (zlib.error, ValueError) as exc:
        raise CheckpointError(f"not a checkpoint: {exc}") from exc
    if not isinstance(document, Mapping):
        raise CheckpointError("not a checkpoint: expected a JSON object")
    if document.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint format {document.get('format')!r}, expected {FORMAT}")
    try:
        offsets = {(str(t), int(p)): int(o) for t, p, o in document["offsets"]}
        return Checkpoint(
            offsets=offsets,
            windows=dict(document["windows"]),
            totals=dict(document["totals"]),
            bootstrap=str(document.get("bootstrap", "")),
            written_at=float(document.get("written_at", 0.0)),
            extra=dict(document.get("extra") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint lacks {exc}") from exc


class CheckpointStore:
    """The checkpoint file of one consumer group in `state_dir`."""

    def __init__(self, state_dir: Path, group_id: str) -> None:
        self.state_dir = state_dir
        self.path = state_dir / (_UNSAFE.sub("_", group_id) + SUFFIX)

    def load(self, bootstrap: str) -> Checkpoint | None:
        """The checkpoint, or None when there is none (or it was taken against another bootstrap).

        Raises CheckpointError for a file that is there but unusable.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        checkpoint = decode(data)
        if checkpoint.bootstrap and checkpoint.bootstrap != bootstrap:
            log.warning(
                "ignoring checkpoint %s: taken against kafka %s, not %s",
                self.path,
                checkpoint.bootstrap,
                bootstrap,
            )
            return None
        return checkpoint

    def write(self, data: bytes) -> None:
        """Replace the checkpoint atomically with `data` (from `encode`). Blocking: run in a thread."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.state_dir)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem syncs directories
    finally:
        os.close(fd)
