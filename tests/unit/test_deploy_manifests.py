"""Everything under deploy/ parses and hangs together: Kubernetes objects are well-formed and
their references resolve, kustomizations name only files that exist, the compose file uses
only defined volumes, networks and services, configs validate with the real loaders, and the
probe script answers correctly against a real gRPC health server."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import collector
import sidecar
from devstack.simprovider import load_sim_config
from sidecar._config import DEFAULT_SHUTDOWN_GRACE_S
from tests.unit.test_dashboards import exposed

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
JSON_FILES = sorted(DEPLOY.rglob("*.json"))
KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))
# what each kind's apiVersion must be
API_VERSIONS = {
    "Namespace": "v1",
    "ServiceAccount": "v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Deployment": "apps/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Component": "kustomize.config.k8s.io/v1alpha1",
    # deploy/k8s/webhook
    "ClusterRole": "rbac.authorization.k8s.io/v1",
    "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
    "PodDisruptionBudget": "policy/v1",
    "CronJob": "batch/v1",
    "MutatingWebhookConfiguration": "admissionregistration.k8s.io/v1",
    "Issuer": "cert-manager.io/v1",
    "Certificate": "cert-manager.io/v1",
}
# Secrets and ConfigMaps the deploy docs tell the operator to create from `outrider init-secrets`
EXTERNAL_SECRETS = {
    "outrider-control-signing",
    "outrider-admin-tokens",
    "outrider-session-key",
    "outrider-control-public-keys",
}
METRICS = {
    "outrider_requests_total",
    "outrider_errors_total",
    "outrider_request_duration_seconds_bucket",
    "outrider_rollout_phase",
    "outrider_rollout_candidate_weight",
    "outrider_collector_events_consumed_total",
    "outrider_collector_events_duplicate_total",
    "outrider_collector_records_undecodable_total",
    "outrider_collector_control_publish_failures_total",
    "outrider_collector_notifications_total",
    # the full gate metric set (collector._totals) and the collector pipeline
    "outrider_llm_calls_total",
    "outrider_llm_time_to_first_token_seconds_bucket",
    "outrider_llm_tokens_sum",
    "outrider_llm_cost_usd_sum",
    "outrider_llm_cost_usd_count",
    "outrider_llm_fallbacks_total",
    "outrider_llm_degraded_total",
    "outrider_llm_quota_total",
    "outrider_tool_calls_total",
    "outrider_tool_failures_total",
    "outrider_safety_events_total",
    "outrider_feedback_total",
    "outrider_feedback_score_sum",
    "outrider_feedback_score_count",
    "outrider_breaker_transitions_total",
    "outrider_collector_deadletter_total",
    "outrider_collector_deadletter_failures_total",
    "outrider_collector_checkpoints_total",
    "outrider_collector_checkpoint_bytes",
    "outrider_collector_relayed_spans_total",
    # issue 10: loss detection and the control plane's own health
    "outrider_events_missing_total",
    "outrider_control_rejected_total",
    "outrider_collector_new_broker_total",
    "outrider_sidecar_control_wait_expired_total",
    # issue 12: the shadow comparison and the judge
    "outrider_shadow_pairs_total",
    "outrider_shadow_intercepted_writes_total",
    "outrider_shadow_tool_agreement_ratio",
    "outrider_shadow_text_similarity_ratio",
    "outrider_shadow_judge_score",
    "outrider_shadow_judge_preference_ratio",
    "outrider_judge_cost_usd_total",
}


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _generator_files(entry: dict[str, Any]) -> Iterator[str]:
    for spec in entry.get("files", []):
        yield spec.split("=", 1)[-1]  # "key=path" or "path"
    yield from entry.get("envs", [])


def kustomization_refs(path: Path) -> dict[str, list[Path]]:
    """The files and directories a kustomization names, by role."""
    doc = load_docs(path)[0]
    here = path.parent
    refs: dict[str, list[Path]] = {"resources": [], "components": [], "patches": [], "generated": []}
    refs["resources"] = [here / r for r in doc.get("resources", [])]
    refs["components"] = [here / c for c in doc.get("components", [])]
    for patch in doc.get("patches", []) + doc.get("patchesStrategicMerge", []):
        if isinstance(patch, str):
            refs["patches"].append(here / patch)
        elif "path" in patch:
            refs["patches"].append(here / patch["path"])
    for key in ("configMapGenerator", "secretGenerator"):
        for entry in doc.get(key, []):
            refs["generated"] += [here / f for f in _generator_files(entry)]
    return refs


def k8s_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every object in a file that some kustomization lists as a resource or patch."""
    files = {
        p.resolve()
        for k in KUSTOMIZATIONS
        for role, paths in kustomization_refs(k).items()
        if role in ("resources", "patches")
        for p in paths
        if p.is_file()
    }
    for path in sorted(files):
        for doc in load_docs(path):
            yield path, doc


# --- parsing --------------------------------------------------------------------------------------


def test_deploy_tree_has_what_we_ship() -> None:
    for rel in [
        "Dockerfile",
        "docker-compose.yaml",
        "prometheus/rules.yaml",
        "grafana/dashboards/outrider-rollouts.json",
        "grafana/dashboards/outrider-signals.json",
        "k8s/base/kustomization.yaml",
        "k8s/injection/kustomization.yaml",
    ]:
        assert (DEPLOY / rel).is_file(), rel
    assert len(YAML_FILES) >= 15
    assert JSON_FILES


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


# --- Kubernetes -----------------------------------------------------------------------------------


def test_k8s_objects_are_well_formed() -> None:
    objects = list(k8s_objects())
    kinds = {doc.get("kind") for _, doc in objects}
    assert {"Namespace", "Deployment", "Service", "ServiceAccount"} <= kinds
    for path, doc in objects:
        where = f"{path.relative_to(DEPLOY)} {doc.get('kind')}"
        assert doc.get("apiVersion"), where
        assert doc.get("kind") in API_VERSIONS, where
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], where
        assert isinstance(doc.get("metadata"), dict) and doc["metadata"].get("name"), where
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), where


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("containers", [])) + list(pod_spec.get("initContainers", []))


def test_deployments_select_their_own_pods_and_mount_defined_volumes() -> None:
    deployments = [
        (p, d) for p, d in k8s_objects() if d["kind"] == "Deployment" and p.parent.name != "injection"
    ]
    assert len(deployments) >= 3
    for path, dep in deployments:
        where = f"{path.relative_to(DEPLOY)} {dep['metadata']['name']}"
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector, where
        assert selector.items() <= labels.items(), (
            f"{where}: selector {selector} does not match labels {labels}"
        )
        pod = dep["spec"]["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in _containers(pod):
            assert container.get("image"), where
            assert container.get("resources", {}).get("requests"), (
                f"{where}: {container['name']} has no requests"
            )
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (
                    f"{where}: {container['name']} mounts undefined {mount['name']}"
                )
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                named = container.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(named, str):
                    assert named in ports, f"{where}: {probe} names unknown port {named}"


def test_services_select_a_deployment_in_their_kustomization() -> None:
    for kustomization in KUSTOMIZATIONS:
        resources = [p for p in kustomization_refs(kustomization)["resources"] if p.is_file()]
        docs = [d for p in resources for d in load_docs(p)]
        pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"]
        pod_ports = {
            port["name"]
            for d in docs
            if d["kind"] == "Deployment"
            for c in _containers(d["spec"]["template"]["spec"])
            for port in c.get("ports", [])
        }
        for svc in (d for d in docs if d["kind"] == "Service"):
            selector = svc["spec"]["selector"]
            assert any(selector.items() <= labels.items() for labels in pod_labels), svc["metadata"]["name"]
            for port in svc["spec"]["ports"]:
                if isinstance(port.get("targetPort"), str):
                    assert port["targetPort"] in pod_ports, (svc["metadata"]["name"], port)


def test_kustomizations_list_only_existing_files() -> None:
    assert len(KUSTOMIZATIONS) >= 3
    for kustomization in KUSTOMIZATIONS:
        refs = kustomization_refs(kustomization)
        for role, paths in refs.items():
            for path in paths:
                if role == "components" or (role == "resources" and path.is_dir()):
                    assert (path / "kustomization.yaml").is_file(), f"{kustomization}: {role} {path}"
                else:
                    assert path.is_file(), f"{kustomization}: {role} {path} does not exist"


def test_every_k8s_yaml_is_used_by_a_kustomization() -> None:
    used = {p.resolve() for k in KUSTOMIZATIONS for paths in kustomization_refs(k).values() for p in paths}
    for path in K8S.rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert path.resolve() in used, f"{path.relative_to(DEPLOY)} is not listed in any kustomization"


def test_network_policies_lock_the_admin_api_and_agent_egress() -> None:
    objects = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_objects()}
    collector_policy = objects[("NetworkPolicy", "outrider-collector")]["spec"]
    admin_rule = next(r for r in collector_policy["ingress"] if r["ports"][0]["port"] == "grpc-admin")
    assert admin_rule["from"] == [{"namespaceSelector": {"matchLabels": {"outrider.dev/operators": "true"}}}]
    agent_policy = objects[("NetworkPolicy", "outrider-agent-egress")]["spec"]
    assert agent_policy["policyTypes"] == ["Egress"]
    ports = {p["port"] for rule in agent_policy["egress"] for p in rule["ports"]}
    assert {53, 9092} <= ports
    patch = load_docs(K8S / "injection" / "sidecar-patch.yaml")[0]
    labels = patch["spec"]["template"]["metadata"]["labels"]
    assert agent_policy["podSelector"]["matchLabels"].items() <= labels.items()
    kinds = {d["kind"] for _, d in k8s_objects()}
    assert "PodMonitor" in kinds


def test_collector_service_and_probes() -> None:
    objects = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_objects()}
    service = objects[("Service", "outrider-collector")]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"grpc-admin": 50061, "http-metrics": 9465}
    pod = objects[("Deployment", "outrider-collector")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50061
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_injected_sidecar_is_locked_down() -> None:
    patch = load_docs(K8S / "injection" / "sidecar-patch.yaml")[0]
    pod = patch["spec"]["template"]["spec"]
    (side,) = [c for c in _containers(pod) if c["name"] == "outrider-sidecar"]
    assert "127.0.0.1:50051" in side["args"]
    security = side["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert side["resources"]["limits"]["memory"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert side[probe]["exec"]["command"] == ["outrider-health", "127.0.0.1:50051"]
    assert any(m["mountPath"] == "/etc/outrider" for m in side["volumeMounts"])
    assert {"name": "outrider-metrics", "containerPort": 9464} in side["ports"]
    # the root filesystem is read-only: the telemetry spill needs its own writable volume
    config = sidecar.load_config(
        K8S / "examples" / "agent" / "sidecar.yaml",
        env={"OUTRIDER_PROVIDER_API_KEY": "k", "OUTRIDER_SESSION_KEY": "s"},
    )
    spill = config.telemetry.spill_path(config.agent)
    assert spill is not None
    (mount,) = [m for m in side["volumeMounts"] if spill.is_relative_to(m["mountPath"])]
    assert not mount.get("readOnly") and mount["mountPath"] != "/"
    assert any(v["name"] == mount["name"] and "emptyDir" in v for v in pod["volumes"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", ["base", "examples/agent", "webhook"])
def test_kustomize_renders_with_references_resolved(overlay: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    generated = {d["metadata"]["name"] for d in docs if d["kind"] in ("ConfigMap", "Secret")}
    generated |= EXTERNAL_SECRETS  # created by the operator, never in git (documented in the kustomizations)
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in generated, volume
        for container in _containers(pod):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in generated, ref
    if overlay == "examples/agent":
        rendered = out.stdout
        assert "change-me" not in rendered and "session-key=" not in rendered
        agent = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "support-bot")
        names = [c["name"] for c in agent["spec"]["template"]["spec"]["initContainers"]]
        assert names == ["outrider-sidecar"]  # injected by the component
        assert all(d["metadata"]["namespace"] == "support-bot" for d in docs if d["kind"] != "Namespace")


# --- configs validate with the real loaders -------------------------------------------------------


@pytest.mark.parametrize(
    "path", [DEPLOY / "config" / "sidecar.yaml", K8S / "examples" / "agent" / "sidecar.yaml"]
)
def test_sidecar_configs_validate(path: Path) -> None:
    config = sidecar.load_config(path, env={"OUTRIDER_PROVIDER_API_KEY": "k", "OUTRIDER_SESSION_KEY": "s"})
    assert config.agent == "support-bot"
    # Prometheus scrapes these from outside the container: loopback-only /metrics would be unreachable
    assert str(config.metrics_host) == "0.0.0.0" and config.metrics_port == 9464
    assert set(config.version_ids()) == {"v1", "v2"}


@pytest.mark.parametrize("path", [DEPLOY / "config" / "collector.yaml", K8S / "base" / "collector.yaml"])
def test_collector_configs_validate(path: Path) -> None:
    settings = collector.load_settings(path)
    assert settings.admin_listen == "0.0.0.0:50061"
    assert settings.metrics_port == 9465


def test_simprovider_config_copy_matches_example() -> None:
    copy = K8S / "examples" / "agent" / "simprovider-config.yaml"
    assert load_sim_config(copy) == load_sim_config(ROOT / "examples" / "simprovider.yaml")


# --- docker ---------------------------------------------------------------------------------------


def test_compose_references_are_defined() -> None:
    compose = load_docs(DEPLOY / "docker-compose.yaml")[0]
    services: dict[str, Any] = compose["services"]
    volumes = set(compose.get("volumes") or {})
    networks = set(compose.get("networks") or {})
    assert {"redpanda", "collector", "simprovider", "sidecar", "jaeger", "prometheus", "grafana"} <= set(
        services
    )
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), name
        for mount in svc.get("volumes", []):
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount["source"]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in volumes, f"{name}: volume {source} is not defined"
        svc_networks = svc.get("networks", [])
        for network in svc_networks if isinstance(svc_networks, list) else list(svc_networks):
            assert network in networks, f"{name}: network {network} is not defined"
        depends = svc.get("depends_on", {})
        for other in depends if isinstance(depends, list) else list(depends):
            assert other in services, f"{name}: depends on unknown service {other}"
        if name not in ("agent", "secrets"):  # a demo client and a one-shot job
            assert "healthcheck" in svc, f"{name} has no healthcheck"
        # no fixed secret in the file (issue 10): keys come from the secrets volume
        environment = svc.get("environment") or {}
        assert "OUTRIDER_SESSION_KEY" not in environment, name
        assert not any("change-me" in str(v) for v in environment.values()), name
    build = services["collector"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()


COMPOSE_OVERRIDES = sorted(DEPLOY.glob("docker-compose.*.yaml"))


def _compose(*overrides: Path) -> dict[str, Any]:
    """The compose file with `overrides` merged on top the way compose does it for what this
    stack uses (environment, depends_on and other mappings merge key by key; lists replace)."""

    def merge(base: Any, top: Any) -> Any:
        if isinstance(base, dict) and isinstance(top, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in top.items()}}
        return top

    compose: dict[str, Any] = load_docs(DEPLOY / "docker-compose.yaml")[0]
    for override in overrides:
        compose = merge(compose, load_docs(override)[0])
    return compose


def _bind_mount(service: dict[str, Any], target: str) -> Path:
    for mount in service.get("volumes", []):
        source, _, rest = mount.partition(":")
        if rest.split(":", 1)[0] == target:
            return (DEPLOY / source).resolve()
    raise AssertionError(f"nothing is mounted at {target}")


def _span_paths(compose: dict[str, Any]) -> list[str]:
    """Which services send spans to Jaeger: the sidecar directly (its OTLP exporter) and the
    collector by relaying `outrider.spans` (its `otlp_endpoint`), read with the real rules."""
    from collector._settings import load_settings, otlp_endpoint
    from sidecar.telemetry._span_records import OTLP_ENDPOINT_ENVS

    services = compose["services"]
    paths = []
    sidecar_env = {k: str(v) for k, v in (services["sidecar"].get("environment") or {}).items()}
    if any(sidecar_env.get(name) for name in OTLP_ENDPOINT_ENVS):
        paths.append("sidecar")
    collector_env = {k: str(v) for k, v in (services["collector"].get("environment") or {}).items()}
    settings = load_settings(_bind_mount(services["collector"], "/etc/outrider/collector.yaml"))
    if otlp_endpoint(settings, collector_env):
        paths.append("collector")
    return paths


def test_compose_sends_each_span_to_jaeger_once() -> None:
    # the default is the path the README describes: the collector relays outrider.spans
    assert _span_paths(_compose()) == ["collector"]
    assert COMPOSE_OVERRIDES, "the opt-in direct-export override is missing"
    for override in COMPOSE_OVERRIDES:
        assert len(_span_paths(_compose(override))) == 1, override.name
    assert _span_paths(_compose(DEPLOY / "docker-compose.otlp-direct.yaml")) == ["sidecar"]


def _rollout_pairs() -> Iterator[tuple[str, Path, Path]]:
    """(where, rollout spec, sidecar config whose versions it names)."""
    services = _compose()["services"]
    yield (
        "compose",
        _bind_mount(services["collector"], "/etc/outrider/rollout.yaml"),
        _bind_mount(services["sidecar"], "/etc/outrider/sidecar.yaml"),
    )
    yield "examples", ROOT / "examples" / "rollout.yaml", ROOT / "examples" / "sidecar.yaml"


@pytest.mark.parametrize("pair", list(_rollout_pairs()), ids=lambda p: p[0])
def test_rollout_examples_name_versions_their_sidecar_config_has(pair: tuple[str, Path, Path]) -> None:
    from collector._spec import load_spec_file

    where, spec_path, config_path = pair
    spec = load_spec_file(spec_path)
    config = sidecar.load_config(config_path, resolve_secrets=False)
    ids = config.version_ids()  # what `outrider versions --config FILE` prints
    assert spec.agent == config.agent, where
    assert spec.stable == ids[config.stable], f"{where}: stable {spec.stable} is not {config.stable}"
    assert spec.candidate in ids.values(), f"{where}: candidate {spec.candidate} not in {ids}"
    # ids quoted in the compose file's instructions are real ones too
    if where == "compose":
        quoted = set(re.findall(r"\b[0-9a-f]{12}\b", (DEPLOY / "docker-compose.yaml").read_text()))
        assert quoted and quoted <= set(ids.values()), quoted


def test_dockerfile_is_multistage_non_root_with_outrider_entrypoint() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2
    assert re.search(r"^USER (?!0\b|root\b)\S+", text, re.MULTILINE)
    assert 'ENTRYPOINT ["outrider"]' in text
    assert "pip install './proto[server]' ." in text  # the contract, then the server that needs it
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for item in source.split():
            assert (ROOT / item).exists(), f"COPY source {item} does not exist"


# --- observability --------------------------------------------------------------------------------


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(outrider_[a-z_]+)\b", expr))


def test_prometheus_rules_use_known_metrics() -> None:
    doc = load_docs(DEPLOY / "prometheus" / "rules.yaml")[0]
    alerts = []
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            assert rule["expr"].strip()
            # the full check against the live registries is tests/unit/test_dashboards.py
            assert _metric_names(rule["expr"]) <= METRICS | exposed().samples, rule["expr"]
            if "alert" in rule:
                alerts.append(rule)
                assert rule["labels"]["severity"] in ("info", "warning", "critical")
                assert rule["annotations"]["summary"]
    exprs = " ".join(a["expr"] for a in alerts)
    assert "outrider_errors_total" in exprs and 'phase="rolled_back"' in exprs
    assert "outrider_events_missing_total" in exprs and "outrider_control_rejected_total" in exprs
    for phase in ("hold", "no_data", "rolled_back", "promoted", "aborted"):  # each notified state
        assert f'outrider_rollout_phase{{phase="{phase}"}}' in exprs, phase
    prom = load_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    assert prom["rule_files"] == ["/etc/prometheus/rules.yaml"]


def test_grafana_dashboard_and_provisioning() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "outrider-rollouts.json").read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    used = set().union(*(_metric_names(e) for e in exprs))
    assert used <= METRICS
    assert {
        "outrider_requests_total",
        "outrider_rollout_phase",
        "outrider_request_duration_seconds_bucket",
    } <= used
    assert any("histogram_quantile(0.95" in e for e in exprs)
    assert all("version, role" in e for e in exprs if "outrider_requests_total" in e)
    sources = load_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")[0]
    uids = {d["uid"] for d in sources["datasources"]}
    datasource_var = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert datasource_var["current"]["value"] in uids
    providers = load_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "outrider.yaml")[0]
    compose = load_docs(DEPLOY / "docker-compose.yaml")[0]
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.endswith(providers["providers"][0]["options"]["path"] + ":ro") for m in mounts)


def test_signals_dashboard_uses_the_collectors_metric_set() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "outrider-signals.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert dashboard["uid"] != "outrider-rollouts"
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    used = set().union(*(_metric_names(e) for e in exprs))
    assert used <= METRICS, used - METRICS
    for family in ("feedback", "cost", "safety", "errors", "tool_failures", "deadletter"):
        assert any(family in name for name in used), family
    # per-version panels group by the series labels, never by session or trace ids
    assert not any(re.search(r"session|trace_id", e) for e in exprs)
    # every name the collector exposes that a dashboard or rule may use is one it really serves
    from collector._totals import FAMILY_NAMES

    served = set(FAMILY_NAMES) | {f"{n}_bucket" for n in FAMILY_NAMES}
    served |= {f"{n}_{s}" for n in FAMILY_NAMES for s in ("sum", "count")}
    served |= {n for n in METRICS if n.startswith(("outrider_collector_", "outrider_rollout_"))}
    # and the counters the collector and the sidecar register (issue 10's control-plane metrics)
    from collector._metrics import CollectorMetrics
    from sidecar.telemetry._metrics import SidecarMetrics

    for registry in (CollectorMetrics().registry, SidecarMetrics().registry):
        served |= {f"{m.name}_total" for m in registry.collect() if m.type == "counter"}
    served |= {m.name for m in CollectorMetrics().registry.collect() if m.name.startswith("outrider_shadow_")}
    assert served >= METRICS, METRICS - served


# --- the probe script, against a real gRPC health server -------------------------------------------


async def _probe(address: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(DEPLOY / "grpc_health_check.py"),
        address,
        "--timeout",
        "2",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_health_probe_script() -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert await _probe(address) == 0
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await _probe(address) == 1
    finally:
        await server.stop(None)
    assert await _probe(address) == 1  # nothing listening


def test_agent_example_gives_the_sidecar_its_shutdown_grace() -> None:
    """The pod's grace period outlasts the sidecar's own shutdown grace, so SIGKILL never cuts
    the flush of its telemetry queue and spill."""
    deployment = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "deploy/k8s/examples/agent/agent-deployment.yaml").read_text()
    )
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert isinstance(grace, int) and grace > DEFAULT_SHUTDOWN_GRACE_S
