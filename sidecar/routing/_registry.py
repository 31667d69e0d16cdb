"""The version registry, sidecar side: tails `outrider.versions` and adds every verified version
of this agent to the running version table, so a rollout can name a version that was pushed
(`outrider version push`) after the sidecar started.

Each record is verified like a control record (`outrider.open_version`: signature, key id,
record key, canonical JSON, id), then validated with `VersionConfig` and its id recomputed;
its API key (if it names one) is read from this sidecar's environment. What fails any step is
dropped, counted in `outrider_sidecar_versions_rejected_total{reason}` and logged at a limited
rate: a bad record never stops the tail. Verified records are kept (as they were on the
topic) in `state_path`, re-verified at the next start, so a restart without a broker still
serves a session pinned to a pushed version.

The sidecar reports the versions it serves (a `VersionsReport` event) at start, when the set
changes, and every `control.versions_report_interval`; the collector uses the reports to
check a rollout's versions and to answer `outrider version list`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from pydantic import SecretStr, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

import outrider
from outrider.clock import Clock
from outrider.v1 import events_pb2, registry_pb2
from sidecar._aliases import alias_version
from sidecar._config import SidecarConfig, fallback_key
from sidecar._config_format import format_validation_error
from sidecar._version_config import VersionConfig
from sidecar.routing._router import Router
from sidecar.routing._versions import Version, build_version
from sidecar.telemetry._metrics import SidecarMetrics
from sidecar.telemetry._producer import TelemetryProducer
from sidecar.telemetry._producer_policy import new_event_id

log = logging.getLogger(__name__)

SOURCE_CONFIG = "config"
SOURCE_REGISTRY = "registry"
INVALID = "invalid"
FULL = "full"
MAX_REGISTRY_VERSIONS = 1000  # per agent: a bound on memory, far above any real history
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
POLL_TIMEOUT_MS = 500
METADATA_MAX_AGE_MS = 1000
STOP_WAIT_S = 3.0
REPORT_RETRY_S = 0.2  # while Kafka is away, how often to look again


def registry_state_path(control_state: Path | None) -> Path | None:
    """Beside the persisted control state: `<spill dir>.versions.json`."""
    if control_state is None:
        return None
    name = control_state.name.removesuffix(".control.json").removesuffix(".json")
    return control_state.with_name(name + ".versions.json")


def key_sources(config: SidecarConfig) -> frozenset[str]:
    """The API key sources (`env:NAME`, `file:PATH`) the sidecar's own config names: the only
    ones a pushed version may use, so a push cannot send another secret of the pod (the session
    key, say) to a URL of its choosing."""
    sources: set[str] = set()
    for version in config.versions.values():
        providers = [version.provider, *(t.provider for t in version.fallback if t.provider is not None)]
        for provider in providers:
            if provider.api_key_env:
                sources.add("env:" + provider.api_key_env)
            if provider.api_key_file:
                sources.add("file:" + provider.api_key_file)
    return frozenset(sources)


def _secret(
    where: str, env_name: str | None, file_name: str | None, env: Mapping[str, str]
) -> SecretStr | None:
    if env_name:
        value = env.get(env_name, "").strip()
        if not value:
            raise ValueError(f"{where}.api_key_env: environment variable {env_name} is not set or empty")
        return SecretStr(value)
    if file_name:
        try:
            value = Path(file_name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{where}.api_key_file: cannot read {file_name}: {exc.strerror}") from None
        if not value:
            raise ValueError(f"{where}.api_key_file: {file_name} is empty")
        return SecretStr(value)
    return None


def resolve_keys(
    label: str, vc: VersionConfig, env: Mapping[str, str], allowed: frozenset[str] | None = None
) -> dict[str, SecretStr]:
    """The API keys a version names, read from this sidecar's environment or files; with
    `allowed`, a source outside it is a ValueError naming the field."""
    keys: dict[str, SecretStr] = {}
    if allowed is not None:
        providers = [("provider", vc.provider)]
        providers += [
            (f"fallback[{i}].provider", t.provider) for i, t in enumerate(vc.fallback) if t.provider
        ]
        for where, provider in providers:
            for field, source in (
                ("api_key_env", f"env:{provider.api_key_env}" if provider.api_key_env else ""),
                ("api_key_file", f"file:{provider.api_key_file}" if provider.api_key_file else ""),
            ):
                if source and source not in allowed:
                    raise ValueError(
                        f"{where}.{field}: {source.partition(':')[2]} is not a key source of this "
                        "sidecar's config (a pushed version may only use those)"
                    )
    found = _secret("provider", vc.provider.api_key_env, vc.provider.api_key_file, env)
    if found is not None:
        keys[label] = found
    for index, tier in enumerate(vc.fallback):
        if tier.provider is not None:
            where = f"fallback[{index}].provider"
            found = _secret(where, tier.provider.api_key_env, tier.provider.api_key_file, env)
            if found is not None:
                keys[fallback_key(label, index + 1)] = found
    return keys


class _Mismatch(ValueError):
    """Valid content whose id, as this sidecar computes it, is not the record's."""


class VersionRegistry:
    """This agent's versions: the config file's, plus every verified one from `outrider.versions`.

    `versions` is the table the servicer reads (shared, mutated in place on the loop)."""

    def __init__(
        self,
        config: SidecarConfig,
        versions: dict[str, Version],
        router: Router,
        metrics: SidecarMetrics,
        telemetry: TelemetryProducer,
        *,
        verifier: outrider.Verifier,
        clock: Clock,
        sidecar_id: str,
        client_id: str = "outrider-sidecar",
        state_path: Path | None = None,
        report_interval_s: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._config, self._versions, self._router = config, versions, router
        self._metrics, self._telemetry, self._clock = metrics, telemetry, clock
        self._verifier = verifier
        self._sidecar_id, self._client_id = sidecar_id, client_id
        self._state_path = state_path
        self._report_interval_s = report_interval_s
        self._env = os.environ if env is None else env
        self._key_sources = key_sources(config)
        self._rejects = outrider.RejectLog(log)
        self.sources = {vid: SOURCE_CONFIG for vid in versions}
        self.records: dict[str, outrider.SignedRecord] = {}  # verified registry records, by id
        self.rejected = 0
        self.reports = 0
        self._dirty = False
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- records ---------------------------------------------------------------------------

    def handle(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None,
        *,
        offset: int = -1,
        persist: bool = True,
    ) -> bool:
        """Verify, validate and add one record; whether it added a version."""
        if value is None:
            return False  # a tombstone: a pushed version is never taken back from a running sidecar
        verdict, pushed = outrider.open_version(self._verifier, key, value, headers)
        if pushed is None:
            self._reject(verdict.reason, verdict.key_id, offset, key)
            return False
        if pushed.agent != self._config.agent or pushed.version_id in self._versions:
            return False  # another agent's, or one this sidecar already serves
        if len(self.records) >= MAX_REGISTRY_VERSIONS:
            self._reject(FULL, verdict.key_id, offset, key)
            return False
        try:
            version = self._build(pushed)
        except ValueError as exc:
            # names the field, never the value of a key or the prompt
            log.warning(
                "registry: rejected version %s of %s at offset %d: %s",
                pushed.version_id,
                pushed.agent,
                offset,
                exc,
            )
            reason = outrider.ID_MISMATCH if isinstance(exc, _Mismatch) else INVALID
            self._reject(reason, verdict.key_id, offset, key, warn=False)
            return False
        self._versions[version.version_id] = version
        self.sources[version.version_id] = SOURCE_REGISTRY
        self._router.learn(version.version_id)
        self.records[version.version_id] = outrider.SignedRecord(key, value, tuple(headers or ()))
        self._metrics.registry_versions.set(len(self.records))
        self._dirty = self._dirty or persist
        self._changed.set()
        log.info(
            "registry: serving version %s (%s) of %s: %s/%s, pushed by %s",
            version.version_id,
            version.label,
            pushed.agent,
            version.provider,
            version.model,
            pushed.pushed_by or "unknown",
        )
        return True

    def _build(self, pushed: registry_pb2.RegistryVersion) -> Version:
        source = f"{outrider.VERSIONS_TOPIC} {pushed.agent}/{pushed.version_id}"
        try:
            vc = VersionConfig.model_validate(json.loads(pushed.canonical_json))
        except ValidationError as exc:
            raise ValueError(format_validation_error(source, exc).replace("\n", "; ")) from None
        except ValueError:
            raise ValueError(f"{source}: not JSON") from None
        if vc.version_id() != pushed.version_id:
            # valid, but not what the collector hashed: a field this sidecar reads differently
            raise _Mismatch(f"{source}: content hashes to {vc.version_id()}, not {pushed.version_id}")
        label = pushed.label or pushed.version_id
        try:
            keys = resolve_keys(label, vc, self._env, self._key_sources)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        moved = alias_version(vc, self._config.upstream_aliases)
        return build_version(self._config, label, pushed.version_id, moved, keys.get, field=source)

    def _reject(self, reason: str, key_id: str, offset: int, key: bytes | None, *, warn: bool = True) -> None:
        self.rejected += 1
        self._metrics.versions_rejected.labels(reason).inc()
        if warn:
            self._rejects.rejected(reason, key_id, offset, key)

    # -- persisted versions ----------------------------------------------------------------

    async def load_persisted(self) -> int:
        """Add the versions kept at the last run (verified again); how many."""
        if self._state_path is None:
            return 0
        try:
            records, _ = await asyncio.to_thread(outrider.load_records, self._state_path)
        except ValueError as exc:
            log.error("registry: ignoring persisted versions: %s", exc)  # noqa: TRY400
            return 0
        added = sum(self.handle(r.key, r.value, r.headers, persist=False) for r in records)
        if added:
            log.info("registry: %d versions from %s until the topic is replayed", added, self._state_path)
        return added

    async def persist(self) -> None:
        if not self._dirty or self._state_path is None:
            return
        self._dirty = False
        try:
            await asyncio.to_thread(outrider.save_records, self._state_path, list(self.records.values()))
        except OSError as exc:
            log.warning("registry: cannot persist versions to %s: %s", self._state_path, exc)

    # -- reports ---------------------------------------------------------------------------

    def report_event(self) -> events_pb2.Event:
        event = events_pb2.Event(
            event_id=new_event_id(),
            time_unix_nano=round(self._clock.now() * 1e9),
            agent=self._config.agent,
            sidecar_id=self._sidecar_id,
        )
        event.versions_report.interval_s = self._report_interval_s
        for version_id, version in self._versions.items():
            event.versions_report.versions.add(
                version_id=version_id,
                label=version.label,
                source=self.sources.get(version_id, SOURCE_CONFIG),
                model=version.model,
            )
        return event

    def report(self) -> None:
        self.reports += 1
        self._telemetry.emit(self.report_event())

    async def _report_loop(self) -> None:
        if not self._config.telemetry.enabled:
            return
        while not self._closing.is_set():
            if not self._telemetry.connected:
                # a report is news only while fresh: sent once Kafka answers, never spilled
                await self._sleep(REPORT_RETRY_S)
                continue
            self._changed.clear()
            self.report()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._report_interval_s)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Tail and report (`load_persisted` first, before the first call)."""
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._run(), name="outrider-registry-tailer"),
            asyncio.create_task(self._report_loop(), name="outrider-registry-report"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        self._closing.set()
        self._changed.set()
        await asyncio.wait(tasks, timeout=STOP_WAIT_S)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.persist()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _retrying(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "registry: Kafka at %s unavailable (%s); serving %d versions, retrying",
            self._config.kafka.bootstrap_servers,
            type(exc).__name__,
            len(self._versions),
        )

    async def _run(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((KafkaError, TimeoutError)),
            wait=wait_random_exponential(multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S),
            sleep=self._sleep,
            before_sleep=self._retrying,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._tail()

    async def _tail(self) -> None:
        if self._closing.is_set():
            return
        consumer = AIOKafkaConsumer(
            outrider.VERSIONS_TOPIC,
            bootstrap_servers=self._config.kafka.bootstrap_servers,
            client_id=self._client_id,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
        )
        try:
            await consumer.start()
            log.info("registry: tailing %s", outrider.VERSIONS_TOPIC)
            while not self._closing.is_set():
                batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
                for records in batches.values():
                    for record in records:
                        self.handle(
                            record.key, record.value, list(record.headers or ()), offset=record.offset
                        )
                await self.persist()
        finally:
            await consumer.stop()
