"""The deployment history a collector serves: every verified record of an ended rollout.

Every replica loads its own `state_dir/deployments/*.json` at start and tails
`outrider.deployments` from the beginning for as long as it runs, so `outrider rollout history`
answers the same on any of them. Each record, from the topic or from disk, is verified
(`collector._deployments.open_record`): a forged or unsigned one is counted and never shown.
Of two records of one rollout the later revision wins (the baseline after a promotion), as
compaction keeps the last one on the topic.

Nothing here relies on `end_offsets` (the embedded test broker answers it wrongly): the topic
is read from the beginning and followed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from google.protobuf import json_format
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_fixed

import outrider
from collector._deployments import newer, open_record, summary
from collector._files import write_atomic
from outrider._signing import KEY_ID_HEADER
from outrider.v1 import deployment_pb2

log = logging.getLogger(__name__)

FILE_FORMAT = 1
_POLL_MS = 500
_RETRY_S = 2.0  # after the broker failed the tail
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class DeploymentHistory:
    """Verified deployment records by rollout id; `mine` are those this collector wrote."""

    def __init__(
        self,
        verifier: outrider.Verifier,
        state_dir: Path | None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._verifier = verifier
        self.directory = state_dir / "deployments" if state_dir is not None else None
        self._on_reject = on_reject
        self._records: dict[str, deployment_pb2.DeploymentRecord] = {}
        self._signed: dict[str, outrider.SignedRecord] = {}
        self.mine: set[str] = set()
        self._rejects = outrider.RejectLog(log)

    # -- the store ------------------------------------------------------------------------

    def add(self, signed: outrider.SignedRecord, record: deployment_pb2.DeploymentRecord) -> bool:
        """Keep `record` unless a later revision of its rollout is here; whether it was kept."""
        if not newer(record, self._records.get(record.rollout_id)):
            return False
        self._records[record.rollout_id] = record
        self._signed[record.rollout_id] = signed
        return True

    def offer(
        self, signed: outrider.SignedRecord, offset: int = -1
    ) -> deployment_pb2.DeploymentRecord | None:
        """Verify a record read back and keep it; the record, or None when it was refused."""
        reason, record = open_record(self._verifier, signed)
        if record is None:
            if self._on_reject is not None:
                self._on_reject(reason)
            key_id = dict(signed.headers).get(KEY_ID_HEADER, b"").decode("ascii", "replace")
            self._rejects.rejected(reason, key_id, offset, signed.key)
            return None
        self.add(signed, record)
        return record

    def get(self, rollout_id: str) -> deployment_pb2.DeploymentRecord | None:
        return self._records.get(rollout_id)

    def signed(self, rollout_id: str) -> outrider.SignedRecord | None:
        return self._signed.get(rollout_id)

    def records(self) -> list[deployment_pb2.DeploymentRecord]:
        return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def list(self, agent: str, limit: int = 0) -> list[deployment_pb2.DeploymentSummary]:
        """The rollouts of `agent`, newest first (by start; ties by end, then by the ending
        state's epoch and generation, which only grow)."""
        ended = sorted(
            (r for r in self._records.values() if r.agent == agent),
            key=lambda r: (r.started_at_unix_nano, r.ended_at_unix_nano, r.epoch, r.generation),
            reverse=True,
        )
        return [summary(r) for r in (ended[:limit] if limit > 0 else ended)]

    # -- state_dir copies -----------------------------------------------------------------

    def path(self, rollout_id: str) -> Path | None:
        if self.directory is None:
            return None
        if not _SAFE_ID.match(rollout_id):
            raise ValueError(f"rollout id {rollout_id!r} is not usable as a file name")
        return self.directory / f"{rollout_id}.json"

    def save(self, signed: outrider.SignedRecord, record: deployment_pb2.DeploymentRecord) -> Path | None:
        """Write the signed record atomically (blocking: run it in a thread). The readable
        copy beside it is for people; only the signed bytes are trusted on load."""
        path = self.path(record.rollout_id)
        if path is None:
            return None
        document = {
            "format": FILE_FORMAT,
            "record": signed.to_json(),
            "readable": json_format.MessageToDict(record, preserving_proto_field_name=True),
        }
        write_atomic(path, json.dumps(document, indent=1, sort_keys=True).encode("utf-8"))
        return path

    def load_dir(self) -> int:
        """Take every verified record in `state_dir/deployments`; how many were taken."""
        if self.directory is None or not self.directory.is_dir():
            return 0
        taken = 0
        for path in sorted(self.directory.glob("*.json")):
            try:
                signed = _read(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("ignoring deployment record file %s: %s", path, exc)  # noqa: TRY400
                continue
            record = self.offer(signed)
            if record is not None and record.rollout_id == path.stem:
                self.mine.add(record.rollout_id)
                taken += 1
        if taken:
            log.info("loaded %d deployment records from %s", taken, self.directory)
        return taken

    # -- the topic ------------------------------------------------------------------------

    async def tail(self, bootstrap: str) -> None:
        """Read `outrider.deployments` from the beginning, then follow it; runs until cancelled.
        A broker that fails is asked again through tenacity every `_RETRY_S` (from the
        beginning: records are few)."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((KafkaError, OSError)),
            wait=wait_fixed(_RETRY_S),
            before_sleep=_tail_failed,
            reraise=True,
        ):
            with attempt:
                await self._follow(bootstrap)

    async def _follow(self, bootstrap: str) -> None:
        consumer = AIOKafkaConsumer(
            outrider.DEPLOYMENTS_TOPIC,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        try:
            await consumer.start()
            while True:
                batch = await consumer.getmany(timeout_ms=_POLL_MS, max_records=500)
                for records in batch.values():
                    for r in records:
                        if r.value:
                            signed = outrider.SignedRecord(r.key, r.value, tuple(r.headers or ()))
                            self.offer(signed, r.offset)
        finally:
            await consumer.stop()


def _tail_failed(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "tailing %s failed: %s; trying again",
        outrider.DEPLOYMENTS_TOPIC,
        exc or type(exc).__name__,
    )


def _read(path: Path) -> outrider.SignedRecord:
    """The signed record in one state_dir file; ValueError (or OSError) when it has none."""
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
        raise ValueError(f"not a deployment record file of format {FILE_FORMAT}")
    return outrider.SignedRecord.from_json(document["record"])
