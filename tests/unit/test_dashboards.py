"""Dashboards and alert rules against what the code exposes: every metric name a Grafana panel or
a Prometheus rule uses is one a sidecar or the collector serves, and every family they serve
appears in some panel or rule (the exceptions below say why).

The exposed names come from the real registries (`SidecarMetrics`, `CollectorMetrics` with the
span relay watched, as a running collector with an OTLP endpoint has it): every family, with the
sample names the text exposition gives it (`_total` for counters, `_bucket`/`_sum`/`_count` for
histograms). Label names (e.g. `gen_ai_request_model`) are told apart from metric names by the
labels those families declare.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
# a PromQL identifier that may be a metric (recording-rule names have colons and are skipped)
_IDENT = re.compile(r"(?<![\w:.$])([a-z_][a-z0-9_]*)(?![\w:])")
_PREFIXES = ("outrider_", "gen_ai_")

# exposed families no panel or rule needs, and why
EXEMPT: dict[str, str] = {}


@dataclass(frozen=True)
class Exposed:
    families: dict[str, frozenset[str]]  # family -> its sample names
    labels: frozenset[str]

    @property
    def samples(self) -> frozenset[str]:
        return frozenset().union(*self.families.values())


class _Relay:
    exported_spans = exported_batches = failed_batches = rejected_batches = 0
    rejected_spans = undecodable = retries = 0


def _samples(name: str, kind: str) -> frozenset[str]:
    if kind == "counter":
        return frozenset({f"{name}_total"})
    if kind == "histogram":
        return frozenset({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    return frozenset({name})


def _families(registry: CollectorRegistry, labels: set[str]) -> Iterator[tuple[str, str]]:
    for family in registry.collect():
        for sample in family.samples:
            labels.update(sample.labels)
        yield family.name, family.type


@cache
def exposed() -> Exposed:
    """What a sidecar and a collector serve on /metrics."""
    from collector._metrics import CollectorMetrics
    from sidecar.telemetry._metrics import SidecarMetrics

    collector = CollectorMetrics()
    collector.watch_relay(_Relay())
    sidecar = SidecarMetrics()
    labels: set[str] = {"le"}
    # label names of the families without samples yet: from the instruments' declarations
    for metrics in (collector, sidecar, sidecar.genai):
        for value in vars(metrics).values():
            labels.update(getattr(value, "_labelnames", ()))
    families: dict[str, frozenset[str]] = {}
    for registry in (collector.registry, sidecar.registry):
        for name, kind in _families(registry, labels):
            families[name] = families.get(name, frozenset()) | _samples(name, kind)
    return Exposed(families, frozenset(labels))


def _dashboard_exprs(path: Path) -> list[str]:
    doc = json.loads(path.read_text())
    out: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            out.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(doc["panels"])
    for var in doc.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            out.append(query)
    return out


def _rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def _names(expr: str) -> set[str]:
    """Identifiers of `expr` that look like ours (`outrider_*`, `gen_ai_*`), strings removed."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return {m for m in _IDENT.findall(bare) if m.startswith(_PREFIXES)}


def _metrics_in(expr: str) -> set[str]:
    known = exposed()
    return {n for n in _names(expr) if n in known.samples or n not in known.labels}


def _all_exprs() -> dict[str, list[str]]:
    found = {p.name: _dashboard_exprs(p) for p in DASHBOARDS}
    found[RULES.name] = _rule_exprs()
    return found


@pytest.mark.parametrize("source", [p.name for p in DASHBOARDS] + [RULES.name])
def test_dashboard_and_rule_metrics_are_exposed(source: str) -> None:
    exprs = _all_exprs()[source]
    assert exprs, source
    unknown = {n: e for e in exprs for n in _metrics_in(e) if n not in exposed().samples}
    assert not unknown, f"{source}: names no sidecar or collector exposes: {sorted(unknown)}"


def test_every_exposed_metric_is_on_a_dashboard_or_in_a_rule() -> None:
    used = set().union(*(_metrics_in(e) for exprs in _all_exprs().values() for e in exprs))
    missing = sorted(
        family
        for family, samples in exposed().families.items()
        if not samples & used and family not in EXEMPT
    )
    assert not missing, f"exposed but on no dashboard or rule: {missing}"
    assert not set(EXEMPT) - set(exposed().families), "an exemption names a family no longer exposed"


def test_dashboard_genai_and_health_rows() -> None:
    doc = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "outrider-sidecar.json").read_text())
    panels = doc["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    rows = {p["title"] for p in panels if p["type"] == "row"}
    assert {"Quotas", "Sidecar health: telemetry"} <= rows
    assert any(r.startswith("GenAI client metrics") for r in rows)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
    uids = {json.loads(p.read_text())["uid"] for p in DASHBOARDS}
    assert len(uids) == len(DASHBOARDS)  # Grafana keys provisioned dashboards by uid


def test_dashboard_alert_rules_for_sidecar_health_and_quotas() -> None:
    doc = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}
    wanted = {
        "OutriderTelemetryDropped": "outrider_sidecar_telemetry_dropped_total",
        "OutriderTelemetrySpillGrowing": "outrider_sidecar_telemetry_spill_bytes",
        "OutriderQuotaGrantsStale": "outrider_quota_grants_published_total",
        "OutriderBreakerFlapping": "outrider_sidecar_breaker_state",
    }
    for name, metric in wanted.items():
        assert metric in _metrics_in(alerts[name]["expr"]), name
        assert alerts[name]["labels"]["severity"] in ("info", "warning", "critical")
        assert alerts[name]["annotations"]["summary"] and alerts[name]["annotations"]["description"]


def test_dashboard_name_extraction_tells_labels_from_metrics() -> None:
    expr = (
        "sum by (gen_ai_request_model, le) "
        '(rate(gen_ai_client_token_usage_bucket{gen_ai_token_type="x"}[5m]))'
        " / on (agent) outrider:request_rate:5m + outrider_nope"
    )
    assert _metrics_in(expr) == {"gen_ai_client_token_usage_bucket", "outrider_nope"}
