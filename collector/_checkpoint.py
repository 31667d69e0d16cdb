"""Checkpoints: the window state and the totals TOGETHER with the consumed offsets.

One file per `outrider.events` partition in `state_dir/<group>/` (`events-<p>.ckpt`:
zlib-compressed JSON) holding the state of the agents on that partition, written to a
temporary file, fsynced and renamed over the old one, so a reader sees either the old
checkpoint or the new one, never half of one. A checkpoint says "the state of these agents
holds exactly the events before this offset", so whoever holds the partition next (this
collector restarted, or another replica sharing `state_dir`) loads it, seeks to its offset
and re-reads what came after: nothing lost, nothing counted twice. A single-file checkpoint
of an earlier release (`state_dir/<group>.ckpt`) is read when a partition has no file yet.

A checkpoint names the Kafka bootstrap it was taken against; one from another bootstrap (a
dev broker on another port, say) is ignored rather than mixed into a different log.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from collector._files import write_atomic

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


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector while a checkpoint is built: that makes a container
    per seen id (hundreds of thousands), each batch of them setting off a collection that scans
    the whole heap for cycles there are none of (reference counting frees all of it)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def encode(checkpoint: Checkpoint) -> bytes:
    """The file's bytes (JSON, compressed); call this where the state cannot change meanwhile.

    The windows and totals (nearly all of it: every seen id) are written by orjson, about 15x
    faster than the stdlib; every float in them is finite, so orjson's one difference (NaN
    written as null) cannot arise there. The rest (evidence, sequence gaps) goes through the
    stdlib, which keeps whatever it holds as it is."""
    head = {
        "format": FORMAT,
        "bootstrap": checkpoint.bootstrap,
        "written_at": checkpoint.written_at,
        "offsets": [[topic, partition, offset] for (topic, partition), offset in checkpoint.offsets.items()],
    }
    document = b"".join(
        (
            _dumps(head)[:-1],  # the head without its closing brace
            b',"windows":',
            _dumps(checkpoint.windows),
            b',"totals":',
            _dumps(checkpoint.totals),
            b',"extra":',
            json.dumps(checkpoint.extra, separators=(",", ":")).encode("utf-8"),
            b"}",
        )
    )
    return zlib.compress(document, 1)


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: e.g. an integer past 64 bits (a forged count),
        # which orjson then reads back as a float (within 1e-16 of it)
        return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # NaN or Infinity (the stdlib writes them), or not JSON
        return json.loads(data)


def decode(data: bytes) -> Checkpoint:
    try:
        document = _loads(zlib.decompress(data))
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
    """The checkpoint files of one consumer group in `state_dir`, one per events partition."""

    def __init__(self, state_dir: Path, group_id: str) -> None:
        self.state_dir = state_dir
        safe = _UNSAFE.sub("_", group_id)
        self.directory = state_dir / safe
        self.legacy_path = state_dir / (safe + SUFFIX)

    def path(self, partition: int) -> Path:
        return self.directory / f"events-{partition}{SUFFIX}"

    def load(self, bootstrap: str, partition: int) -> Checkpoint | None:
        """The partition's checkpoint (or the earlier release's single file), or None when
        there is none or it was taken against another bootstrap.

        Raises CheckpointError for a file that is there but unusable.
        """
        path = self.path(partition)
        if not path.exists() and self.legacy_path.exists():
            path = self.legacy_path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
        checkpoint = decode(data)
        if checkpoint.bootstrap and checkpoint.bootstrap != bootstrap:
            log.warning(
                "ignoring checkpoint %s: taken against kafka %s, not %s",
                path,
                checkpoint.bootstrap,
                bootstrap,
            )
            return None
        return checkpoint

    def write(self, partition: int, data: bytes) -> None:
        """Replace the partition's checkpoint atomically with `data` (from `encode`). Blocking:
        run in a thread."""
        write_atomic(self.path(partition), data)
