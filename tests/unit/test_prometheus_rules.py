"""The alert and recording rules under `promtool`: `check rules` accepts deploy/prometheus/rules.yaml
and `test rules` passes deploy/prometheus/*.test.yaml, whose cases are checked here to cover
every rule: each alert has a case where it fires on a synthetic bad series and one where it stays
quiet on a healthy series, both feeding the metrics its expression reads (so a new rule without
tests, or a quiet case that is quiet only because its series are missing, fails); an alert with a
`for` is seen pending before it fires; every recording rule has an expression test.

promtool comes from Debian's `prometheus` package (tests/prometheus_bin.py: skipped without it,
failed under CI).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.prometheus_bin import prometheus_binary

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
# rules.test.yaml, and rules-hours.test.yaml for the alerts held for hours (a coarser evaluation)
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus").glob("*.test.yaml"))
K8S = ROOT / "deploy" / "k8s"
_METRIC = re.compile(r"(?<![\w:])(outrider_[a-z0-9_]+|up)(?![\w:])")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == [RULES.name], f"{path.name} must test {RULES.name}"
        cases.extend(doc["tests"])
    return cases


def _metrics(expr: str) -> set[str]:
    """Metric names an expression reads (`outrider_*` and `up`; label values removed)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def _fed(case: dict[str, Any]) -> set[str]:
    return {s["series"].split("{", 1)[0].strip() for s in case.get("input_series", [])}


def _promtool(*args: str) -> None:
    result = subprocess.run(
        [prometheus_binary("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def test_promtool_checks_the_rules() -> None:
    _promtool("check", "rules", str(RULES))


def test_promtool_rule_unit_tests_pass() -> None:
    assert RULE_TESTS, "no deploy/prometheus/*.test.yaml"
    _promtool("test", "rules", *map(str, RULE_TESTS))


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = {r["alert"]: r["expr"] for r in _rules() if "alert" in r}
    firing: dict[str, list[dict[str, Any]]] = {}
    quiet: dict[str, list[dict[str, Any]]] = {}
    for case in _cases():
        for check in case.get("alert_rule_test", []):
            name = check["alertname"]
            assert name in alerts, f"{case['name']!r} tests {name}, which rules.yaml does not have"
            (firing if check.get("exp_alerts") else quiet).setdefault(name, []).append(case)
    for kind, cases in (("firing", firing), ("quiet", quiet)):
        missing = sorted(set(alerts) - set(cases))
        assert not missing, f"alerts without a {kind} case in deploy/prometheus/*.test.yaml: {missing}"
    for name, expr in alerts.items():
        # a case proves something only if it feeds what the expression reads: a quiet case
        # without the alert's series would pass for any rule
        for case in firing[name] + quiet[name]:
            unfed = _metrics(expr) - _fed(case)
            assert not unfed, f"{case['name']!r}: no input series for {sorted(unfed)} that {name} reads"


def test_every_alert_with_a_for_is_seen_pending_first() -> None:
    """An alert with a `for` is pending (ALERTS{alertstate="pending"}) in its firing case before
    the `for` has passed: it fires because the condition held long enough, not at once."""
    held = {r["alert"] for r in _rules() if "alert" in r and "for" in r}
    pending = {
        check["expr"].split('alertname="', 1)[1].split('"', 1)[0]
        for case in _cases()
        for check in case.get("promql_expr_test", [])
        if check["expr"].startswith("ALERTS{")
        and any('alertstate="pending"' in sample["labels"] for sample in check["exp_samples"])
    }
    assert held, "rules.yaml has no alert with a `for`"
    assert not held - pending, f"alerts with a `for` never checked pending: {sorted(held - pending)}"


def test_every_recording_rule_has_an_expression_test() -> None:
    records = {r["record"] for r in _rules() if "record" in r}
    tested = {t["expr"].strip() for case in _cases() for t in case.get("promql_expr_test", [])}
    assert records, "rules.yaml has no recording rules"
    assert not records - tested, f"recording rules without a promql_expr_test: {sorted(records - tested)}"


def test_every_firing_alert_names_its_severity() -> None:
    """The expected labels carry the rule's severity (promtool compares them exactly anyway;
    this names the case whose severity drifted from the rule's)."""
    severity = {r["alert"]: r["labels"]["severity"] for r in _rules() if "alert" in r}
    for case in _cases():
        for check in case.get("alert_rule_test", []):
            for alert in check.get("exp_alerts") or []:
                assert alert["exp_labels"]["severity"] == severity[check["alertname"]], case["name"]


def test_kubernetes_prometheus_rules_match_rules_yaml() -> None:
    """A PrometheusRule under deploy/k8s (for the Prometheus Operator) carries rules.yaml's groups
    unchanged, so the promtool tests cover it too. There is none today: the operator users put
    `groups:` under a PrometheusRule's `spec` themselves (rules.yaml's header says how)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule":
                assert doc["spec"]["groups"] == groups, f"{path.relative_to(ROOT)} differs from rules.yaml"


def test_metric_names_of_an_expression() -> None:
    expr = 'sum(rate(outrider_errors_total{class="outrider_x"}[5m])) / on (agent) outrider:request_rate:5m'
    assert _metrics(expr) == {"outrider_errors_total"}
    assert _metrics('up{job="outrider-collector"} == 0') == {"up"}
