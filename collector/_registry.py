"""The version registry, collector side: takes pushes (`PushVersion`), publishes them signed
to `outrider.versions` (compacted, key `<agent>/<version id>`), and keeps a view of what the
topic holds, so any replica can list an agent's versions and check a rollout's.

Every replica tails `outrider.versions` from the beginning (no consumer group) and verifies
each record as a sidecar does (`outrider.open_version`: signature, record key, canonical JSON,
id); rejected ones are dropped and counted (`outrider_collector_versions_rejected_total{reason}`).
The collector never imports `sidecar`: it checks a push's id against the sha256 of the
canonical JSON it received (`outrider.version_id_of`); the CLI and every sidecar validate the
content itself with the sidecar's `VersionConfig`.

`require(spec)` is the check before a rollout starts: each version it names is in the
registry or was reported by a sidecar (config-file versions count as reported).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

import outrider
from collector._control import ControlPublisher
from collector._errors import UnknownVersion
from collector._metrics import CollectorMetrics
from collector._sightings import VersionSightings
from collector._spec import RolloutSpec
from outrider.v1 import registry_pb2

log = logging.getLogger(__name__)

MAX_VERSIONS = 10_000  # (agent, version) pairs held; the oldest push goes first
MAX_CANONICAL_BYTES = 256 * 1024
MAX_AGENT_LENGTH = 249
MAX_LABEL_LENGTH = 64
POLL_TIMEOUT_MS = 500
METADATA_MAX_AGE_MS = 1000
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
STOP_WAIT_S = 3.0


class PushRejected(ValueError):
    """A push that cannot be accepted; the message names the field (INVALID_ARGUMENT)."""


@dataclass(frozen=True, slots=True)
class Entry:
    version: registry_pb2.RegistryVersion
    record: outrider.SignedRecord
    model: str


def _model_of(canonical_json: str) -> str:
    data = json.loads(canonical_json)
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else ""


def _check_push(request: registry_pb2.PushVersionRequest) -> None:
    """What the collector can check without the sidecar's model: names, sizes, canonical form,
    the id, and the two fields every version has."""
    source = request.source_name or "<request>"
    if not request.agent or len(request.agent) > MAX_AGENT_LENGTH:
        raise PushRejected(f"{source}: agent: must be 1 to {MAX_AGENT_LENGTH} characters")
    if len(request.label) > MAX_LABEL_LENGTH:
        raise PushRejected(f"{source}: label: at most {MAX_LABEL_LENGTH} characters")
    if not request.canonical_json:
        raise PushRejected(f"{source}: canonical_json: must not be empty")
    if len(request.canonical_json.encode()) > MAX_CANONICAL_BYTES:
        raise PushRejected(f"{source}: canonical_json: larger than {MAX_CANONICAL_BYTES} bytes")
    try:
        canonical = outrider.canonical_form(request.canonical_json)
    except ValueError as exc:
        raise PushRejected(f"{source}: canonical_json: not a JSON object ({exc})") from None
    if canonical != request.canonical_json:
        raise PushRejected(f"{source}: canonical_json: not in canonical form (sorted keys, no spaces)")
    data = json.loads(canonical)
    if not isinstance(data.get("model"), str) or not isinstance(data.get("provider"), dict):
        raise PushRejected(f"{source}: canonical_json: a version needs provider and model")
    actual = outrider.version_id_of(canonical)
    if request.version_id != actual:
        raise PushRejected(
            f"{source}: version_id: {request.version_id or '(empty)'} does not match the content, "
            f"which hashes to {actual}"
        )


class RegistryView:
    """The verified versions on `outrider.versions`, by (agent, version id), bounded."""

    def __init__(
        self,
        bootstrap: str,
        publisher: ControlPublisher,
        verifier: outrider.Verifier,
        sightings: VersionSightings,
        metrics: CollectorMetrics,
    ) -> None:
        self._bootstrap, self._publisher, self._verifier = bootstrap, publisher, verifier
        self._sightings, self._metrics = sightings, metrics
        self._entries: dict[tuple[str, str], Entry] = {}
        self._rejects = outrider.RejectLog(log)
        self._lock = asyncio.Lock()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rejected = 0

    # -- the view --------------------------------------------------------------------------

    def add(self, record: outrider.SignedRecord, offset: int = -1) -> bool:
        """Verify one record and add it; whether it was new."""
        if not record.value:
            return False  # a tombstone
        verdict, version = outrider.open_version(self._verifier, record.key, record.value, record.headers)
        if version is None:
            self.rejected += 1
            self._metrics.versions_rejected.labels(verdict.reason).inc()
            self._rejects.rejected(verdict.reason, verdict.key_id, offset, record.key)
            return False
        key = (version.agent, version.version_id)
        if key in self._entries:
            return False  # the same content: the first push is what counts
        self._entries[key] = Entry(version, record, _model_of(version.canonical_json))
        if len(self._entries) > MAX_VERSIONS:
            del self._entries[next(iter(self._entries))]
        self._metrics.registry_versions.set(len(self._entries))
        return True

    def get(self, agent: str, version_id: str) -> Entry | None:
        return self._entries.get((agent, version_id))

    def require(self, spec: RolloutSpec) -> None:
        """UnknownVersion when a version `spec` names is neither pushed nor reported."""
        named = [("stable", spec.stable), ("candidate", spec.candidate)]
        if spec.ab is not None:  # an A/B test: every variant
            named = [(f"variant {v.name}", v.version) for v in spec.ab.variants]
        for role, version_id in named:
            if self.get(spec.agent, version_id) is None and not self._sightings.reported(
                spec.agent, version_id
            ):
                raise UnknownVersion(
                    f"{role} version {version_id} of {spec.agent} is not in the version registry and no "
                    f"sidecar of {spec.agent} reported serving it: push it with "
                    f"`outrider version push FILE` (or run a sidecar whose config has it), then start again"
                )

    def listing(self, agent: str) -> registry_pb2.ListVersionsResponse:
        """What the registry holds for `agent` and which sidecars report serving each version."""
        rows: dict[str, registry_pb2.VersionListing] = {}
        for (name, version_id), entry in self._entries.items():
            if name == agent:
                v = entry.version
                rows[version_id] = registry_pb2.VersionListing(
                    version_id=version_id,
                    label=v.label,
                    model=entry.model,
                    in_registry=True,
                    pushed_at_unix_nano=v.pushed_at_unix_nano,
                    pushed_by=v.pushed_by,
                )
        for version_id, seen in self._sightings.versions(agent):
            row = rows.setdefault(version_id, registry_pb2.VersionListing(version_id=version_id))
            if not row.model and seen.models:
                row.model = seen.models[0]
            newest = seen.last_seen
            for sidecar_id, reporter in seen.reporters.items():
                row.sidecars.add(
                    sidecar_id=sidecar_id,
                    last_seen_unix_nano=round(reporter.last_seen * 1e9),
                    label=reporter.label,
                    source=reporter.source,
                )
                newest = max(newest, reporter.last_seen)
                if not row.label:
                    row.label = reporter.label
            row.last_seen_unix_nano = round(newest * 1e9)
        response = registry_pb2.ListVersionsResponse(agent=agent)
        response.versions.extend(sorted(rows.values(), key=lambda r: (r.label, r.version_id)))
        return response

    # -- pushes ----------------------------------------------------------------------------

    async def push(
        self, request: registry_pb2.PushVersionRequest, who: str
    ) -> registry_pb2.PushVersionResponse:
        """Check, sign and publish one version (waiting for the broker's ack); idempotent:
        content already in the registry is not written again. PushRejected for a bad request;
        KafkaError or TimeoutError when the write fails."""
        _check_push(request)
        async with self._lock:  # two identical pushes at once write one record
            found = self.get(request.agent, request.version_id)
            if found is not None:
                return registry_pb2.PushVersionResponse(version=found.version, already_present=True)
            version = registry_pb2.RegistryVersion(
                agent=request.agent,
                version_id=request.version_id,
                label=request.label,
                canonical_json=request.canonical_json,
                pushed_at_unix_nano=time.time_ns(),
                pushed_by=who,
            )
            key = outrider.version_key(version.agent, version.version_id)
            record = self._publisher.sign_record(key, version.SerializeToString())
            await self._publisher.send(record, outrider.VERSIONS_TOPIC)
            self.add(record)
        log.info(
            "version %s (%s) of %s pushed by %s: model %s",
            version.version_id,
            version.label or "no label",
            version.agent,
            who,
            _model_of(version.canonical_json),
        )
        return registry_pb2.PushVersionResponse(version=version)

    async def republish(self) -> int:
        """Write every record again, as it is (a new or emptied broker); how many."""
        count = 0
        for entry in list(self._entries.values()):
            await self._publisher.send(entry.record, outrider.VERSIONS_TOPIC)
            count += 1
        return count

    # -- the tail --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="collector-registry")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._closing.set()
        await asyncio.wait({task}, timeout=STOP_WAIT_S)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _retrying(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning("registry: Kafka at %s unavailable (%s); retrying", self._bootstrap, type(exc).__name__)

    async def _run(self) -> None:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((KafkaError, TimeoutError)),
            wait=wait_random_exponential(multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S),
            sleep=self._sleep,
            before_sleep=self._retrying,
            reraise=True,
        ):
            with attempt:
                await self._tail()

    async def _tail(self) -> None:
        if self._closing.is_set():
            return
        consumer = AIOKafkaConsumer(
            outrider.VERSIONS_TOPIC,
            bootstrap_servers=self._bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
        )
        try:
            await consumer.start()
            while not self._closing.is_set():
                batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
                for records in batches.values():
                    for r in records:
                        self.add(
                            outrider.SignedRecord(r.key, r.value or b"", tuple(r.headers or ())), r.offset
                        )
        finally:
            await consumer.stop()
