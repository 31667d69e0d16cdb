"""A real Prometheus server (Debian's `prometheus` package) with the repo's scrape config and
rules, scraping a real sidecar and a real collector on loopback under traffic: it loads every
rule group, both targets are up, the rules evaluate without errors and none fires on a healthy
stack, and what it returns for the counters the rules read equals the calls the test made.

The scrape config is deploy/prometheus/prometheus.yml (the compose stack's), with the targets
and intervals swapped for the test's: the rules' `job` selectors meet the job names it really
gives. Skipped without the binary locally, failed under CI (tests/prometheus_bin.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

from collector import Collector
from devstack.broker import EmbeddedBroker, free_port
from devstack.simprovider import SimProvider
from outrider.v1 import sidecar_pb2, sidecar_pb2_grpc
from sidecar import Sidecar
from tests.integration.test_collector_service import settings_for
from tests.integration.test_sidecar_api import API_KEY, USER, open_session, sidecar_config, sim_models
from tests.prometheus_bin import prometheus_binary
from tests.support import free_port_base

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
FIRST_CALLS, CALLS = 2, 5
WITHIN_S = 20.0


def prometheus_config(collector_port: int, sidecar_port: int) -> dict[str, Any]:
    """prometheus.yml with loopback targets, 1 s scrapes and evaluations, and the repo's rules."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {"outrider-collector": collector_port, "outrider-sidecar": sidecar_port}
    jobs = [job for job in config["scrape_configs"] if job["job_name"] in targets]
    assert {job["job_name"] for job in jobs} == set(targets), "prometheus.yml lost a scrape job"
    for job in jobs:
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{targets[job['job_name']]}"]
    config["scrape_configs"] = jobs
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    return config


class PrometheusProc:
    """`prometheus` on a free loopback port; the test that starts it stops it by its PID."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.workdir = workdir
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    prometheus_binary("prometheus"),
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def wait_ready(http: aiohttp.ClientSession, prom: PrometheusProc, within: float = WITHIN_S) -> bool:
    """True once /-/ready answers 200; False if the process exited (its port was taken)."""
    deadline = time.monotonic() + within
    while not prom.exited():
        try:
            async with http.get(f"{prom.url}/-/ready") as response:
                if response.status == 200:
                    return True
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, f"prometheus not ready after {within}s:\n{prom.output()}"
        await asyncio.sleep(0.1)
    return False


@contextmanager
def prometheus_process(config: dict[str, Any], workdir: Path) -> Iterator[PrometheusProc]:
    prom = PrometheusProc(config, workdir)
    try:
        yield prom
    finally:
        prom.stop()


async def api(http: aiohttp.ClientSession, prom: PrometheusProc, path: str, **params: str) -> Any:
    async with http.get(f"{prom.url}/api/v1/{path}", params=params) as response:
        body = await response.json()
    assert body["status"] == "success", f"{path} {params}: {body}"
    return body["data"]


async def eventually(
    check: Callable[[], Awaitable[Any]], what: str, prom: PrometheusProc, within: float = WITHIN_S
) -> Any:
    """Poll `check` until it returns a truthy value (the last one is in the failure)."""
    deadline = time.monotonic() + within
    while True:
        got = await check()
        if got:
            return got
        assert not prom.exited(), f"prometheus exited:\n{prom.output()}"
        assert time.monotonic() < deadline, f"{what}: still {got!r} after {within}s"
        await asyncio.sleep(0.2)


def record_expr(record: str) -> str:
    doc = yaml.safe_load(RULES.read_text())
    [expr] = [r["expr"] for g in doc["groups"] for r in g["rules"] if r.get("record") == record]
    return str(expr)


def rule_names() -> dict[str, list[str]]:
    doc = yaml.safe_load(RULES.read_text())
    return {g["name"]: [r.get("alert") or r["record"] for r in g["rules"]] for g in doc["groups"]}


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(sim_models(), api_key=API_KEY, seed=5) as provider:
        yield provider


async def value(http: aiohttp.ClientSession, prom: PrometheusProc, query: str) -> float | None:
    """An instant query's first sample (None: no series)."""
    result = (await api(http, prom, "query", query=query))["result"]
    return float(result[0]["value"][1]) if result else None


async def until_value(http: aiohttp.ClientSession, prom: PrometheusProc, query: str, expected: float) -> None:
    last: list[float | None] = [None]

    async def check() -> bool:
        last[0] = await value(http, prom, query)
        return last[0] == expected

    try:
        await eventually(check, query, prom)
    except AssertionError as e:
        raise AssertionError(f"{query}: {last[0]}, not {expected}\n{e}") from None


async def start(http: aiohttp.ClientSession, prom: PrometheusProc) -> None:
    for _attempt in range(3):  # a test beside this one may take the free port first
        prom.start()
        if await wait_ready(http, prom):
            return
    raise AssertionError(f"prometheus never listened:\n{prom.output()}")


async def test_prometheus_scrapes_sidecar_and_collector_and_evaluates_the_rules(
    broker: EmbeddedBroker, sim: SimProvider, tmp_path: Path
) -> None:
    prometheus_binary("prometheus")
    # the targets' ports first, so Prometheus starts (and applies its targets, on a 5 s tick)
    # while the collector does; below the ephemeral range, where no neighbour's free_port() lands
    collector_port = free_port_base(2)
    sidecar_port = collector_port + 1
    config = sidecar_config(sim, kafka=broker.bootstrap_servers, metrics_port=sidecar_port)
    with prometheus_process(prometheus_config(collector_port, sidecar_port), tmp_path) as prom:
        async with aiohttp.ClientSession() as http:
            await start(http, prom)
            async with (
                Collector(settings_for(broker, metrics_port=collector_port)),
                Sidecar(config, sidecar_id="prom-sidecar") as sidecar,
                grpc.aio.insecure_channel(sidecar.address) as channel,
            ):
                await scraped_under_traffic(http, prom, sidecar_pb2_grpc.SidecarStub(channel))
    assert prom.exited()


async def scraped_under_traffic(
    http: aiohttp.ClientSession, prom: PrometheusProc, stub: sidecar_pb2_grpc.SidecarStub
) -> None:
    session = await open_session(stub)

    async def chat(calls: int) -> None:
        for _ in range(calls):
            request = sidecar_pb2.ChatRequest(session_id=session.session_id, messages=USER)
            assert (await stub.Chat(request)).message.content

    # both targets up under the compose config's job names (OutriderCollectorDown's `up`)
    for job in ("outrider-collector", "outrider-sidecar"):
        await until_value(http, prom, f'up{{job="{job}"}}', 1)
    # traffic in two bursts, each seen in a scrape: the sidecar counts each RPC once, the
    # collector each call event once
    labels = {"agent": "support-bot", "version": session.version_id, "role": "stable"}
    series = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0
    for burst in (FIRST_CALLS, CALLS - FIRST_CALLS):
        await chat(burst)
        total += burst
        await until_value(
            http, prom, 'sum(outrider_sidecar_requests_total{method=~".*/Chat",code="OK"})', total
        )
        await until_value(http, prom, f"sum(outrider_requests_total{{{series}}})", total)
    await until_value(http, prom, f"sum(outrider_llm_calls_total{{{series}}})", CALLS)
    # a recording rule's expression, read from rules.yaml: one series, the session's version,
    # with the traffic between the bursts' scrapes
    [rate] = (await api(http, prom, "query", query=record_expr("outrider:request_rate:5m")))["result"]
    assert rate["metric"] == labels and float(rate["value"][1]) > 0
    # no call failed: the error-rate rules' numerator has no series
    assert await value(http, prom, "sum(outrider_errors_total)") is None

    # every group and rule of rules.yaml loaded; the alerting groups (1 s evaluation) have
    # evaluated every rule without an error (the recording group runs every 30 s)
    async def evaluated() -> list[dict[str, Any]] | None:
        groups = (await api(http, prom, "rules"))["groups"]
        alerting = [r for g in groups for r in g["rules"] if r["type"] == "alerting"]
        return groups if all(r["health"] == "ok" for r in alerting) else None

    groups = await eventually(evaluated, "every alerting rule evaluated", prom)
    assert {g["name"]: [r["name"] for r in g["rules"]] for g in groups} == rule_names()
    assert not [r for g in groups for r in g["rules"] if r.get("lastError")]
    # a healthy stack: nothing fires
    alerts = (await api(http, prom, "alerts"))["alerts"]
    assert not [a for a in alerts if a["state"] == "firing"], alerts
