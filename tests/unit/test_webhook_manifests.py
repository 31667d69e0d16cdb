"""deploy/k8s/webhook: every core object validates against the Kubernetes API schemas
(kubernetes-validate, strict: unknown fields fail), the cert-manager objects are checked
structurally (their CRDs are not in those schemas), and the pieces name each other: the
Service the webhooks call, the paths the server serves, the Secret cert-manager writes, the
flags the command takes, the namespaces the check skips."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from devstack import _inject_check, _webhook, _webhook_cli

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK = ROOT / "deploy" / "k8s" / "webhook"
K8S_VERSION = "1.30"  # native sidecars are on by default from 1.29; the lib ships schemas for it
CERT_MANAGER = "cert-manager.io/v1"


def _docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(WEBHOOK.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


DOCS = _docs()
CORE = [(name, d) for name, d in DOCS if d["apiVersion"] != CERT_MANAGER]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def test_the_kustomization_lists_every_file_and_the_kinds_are_there() -> None:
    kustomization = yaml.safe_load((WEBHOOK / "kustomization.yaml").read_text())
    files = {p.name for p in WEBHOOK.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["namespace"] == "outrider"
    kinds = {d["kind"] for _, d in DOCS}
    assert {
        "Deployment",
        "Service",
        "MutatingWebhookConfiguration",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Issuer",
        "Certificate",
    } <= kinds


@pytest.mark.parametrize(
    "doc", [d for _, d in CORE], ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in CORE]
)
def test_core_objects_validate_against_the_api_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_does_reject_a_wrong_field() -> None:
    """A control: the schemas are really applied (a typo'd field fails in strict mode)."""
    config = yaml.safe_load(yaml.safe_dump(_one("MutatingWebhookConfiguration")))
    config["webhooks"][0]["failurePolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(config, K8S_VERSION, strict=True)
    config["webhooks"][0]["failurePolicy"] = "Ignore"
    config["webhooks"][0]["failurPolicy"] = "Ignore"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(config, K8S_VERSION, strict=True)


def test_cert_manager_objects_are_well_formed_and_chain_to_the_serving_secret() -> None:
    issuers = {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == "Issuer"}
    certs = {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == "Certificate"}
    for doc in [*issuers.values(), *certs.values()]:
        assert doc["apiVersion"] == CERT_MANAGER and doc["metadata"]["namespace"] == "outrider"
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    for issuer in issuers.values():
        (mode,) = issuer["spec"]
        assert mode in ("selfSigned", "ca")
        if mode == "ca":  # a CA issuer signs with the key of a Certificate in this kustomization
            assert issuer["spec"]["ca"]["secretName"] in {c["spec"]["secretName"] for c in certs.values()}
    for cert in certs.values():
        ref = cert["spec"]["issuerRef"]
        assert (
            ref["kind"] == "Issuer"
            and ref["name"] in issuers
            and ref.get("group", "cert-manager.io") == "cert-manager.io"
        )
        assert cert["spec"]["secretName"]
        known = {"secretName", "dnsNames", "duration", "renewBefore", "usages", "privateKey", "issuerRef"}
        assert set(cert["spec"]) <= known | {"isCA", "commonName"}
    # the serving certificate is signed by the CA issuer, not self-signed: renewals keep the caBundle
    serving = certs["outrider-webhook"]
    assert issuers[serving["spec"]["issuerRef"]["name"]]["spec"].get("ca")
    service = _one("Service", "outrider-webhook")
    assert (
        f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc" in serving["spec"]["dnsNames"]
    )
    assert "server auth" in serving["spec"]["usages"]
    # the Deployment mounts the Secret it writes, and passes tls.crt / tls.key to the command
    deployment = _one("Deployment", "outrider-webhook")
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == serving["spec"]["secretName"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    args = container["args"]
    assert args[args.index("--tls-cert-file") + 1] == f"{mount['mountPath']}/tls.crt"
    assert args[args.index("--tls-key-file") + 1] == f"{mount['mountPath']}/tls.key"


def test_the_deployment_runs_the_command_it_names_with_probes_and_replicas() -> None:
    deployment = _one("Deployment", "outrider-webhook")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[0] == _webhook_cli.inject_webhook.name
    options = {opt for param in _webhook_cli.inject_webhook.params for opt in param.opts}
    assert {a for a in args if a.startswith("--")} <= options
    port = int(args[args.index("--listen") + 1].rsplit(":", 1)[1])
    (named,) = [p for p in container["ports"] if p["containerPort"] == port]
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get == {"path": _webhook.PATH_HEALTH, "port": named["name"], "scheme": "HTTPS"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    sc = container["securityContext"]
    assert (
        sc["readOnlyRootFilesystem"]
        and not sc["allowPrivilegeEscalation"]
        and sc["capabilities"]["drop"] == ["ALL"]
    )
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    pdb = _one("PodDisruptionBudget")
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_the_webhooks_call_the_service_and_paths_the_server_has() -> None:
    config = _one("MutatingWebhookConfiguration")
    service = _one("Service", "outrider-webhook")
    certificate = _one("Certificate", "outrider-webhook")
    namespace = certificate["metadata"]["namespace"]
    assert (
        config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{namespace}/outrider-webhook"
    )
    hooks = {h["clientConfig"]["service"]["path"]: h for h in config["webhooks"]}
    assert set(hooks) == {_webhook.PATH_NAMESPACE, _webhook.PATH_POD}
    (port,) = service["spec"]["ports"]
    for hook in hooks.values():
        ref = hook["clientConfig"]["service"]
        assert (ref["name"], ref["namespace"], ref["port"]) == (
            service["metadata"]["name"],
            namespace,
            port["port"],
        )
        # the deliberate choices (deploy/README.md)
        assert hook["failurePolicy"] == "Ignore"
        assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
        assert hook["reinvocationPolicy"] == "IfNeeded" and hook["timeoutSeconds"] <= 10
        assert hook["rules"] == [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        (names,) = [
            e
            for e in hook["namespaceSelector"]["matchExpressions"]
            if e["key"] == "kubernetes.io/metadata.name"
        ]
        # kube-system and the webhook's own namespace, the same the check skips
        assert names["operator"] == "NotIn" and set(names["values"]) == set(
            _inject_check.DEFAULT_EXCLUDED
        ) | {namespace}
        assert hook["objectSelector"]["matchExpressions"] == [
            {"key": "outrider.io/inject", "operator": "NotIn", "values": ["false"]}
        ]
    # the namespace hook selects labelled namespaces, the pod hook all the others
    assert hooks[_webhook.PATH_NAMESPACE]["namespaceSelector"]["matchLabels"] == {
        "outrider.io/inject": "enabled"
    }
    assert {"key": "outrider.io/inject", "operator": "NotIn", "values": ["enabled"]} in hooks[
        _webhook.PATH_POD
    ]["namespaceSelector"]["matchExpressions"]


def test_rbac_grants_the_check_list_of_pods_and_namespaces_only() -> None:
    role = _one("ClusterRole", "outrider-inject-check")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list"]}
    ]
    binding = _one("ClusterRoleBinding", "outrider-inject-check")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "outrider-inject-check",
    }
    accounts = {
        (d["metadata"]["namespace"], d["metadata"]["name"]) for _, d in DOCS if d["kind"] == "ServiceAccount"
    }
    for subject in binding["subjects"]:
        assert (subject["namespace"], subject["name"]) in accounts
    deployment = _one("Deployment", "outrider-webhook")
    assert ("outrider", deployment["spec"]["template"]["spec"]["serviceAccountName"]) in accounts
    bound = {s["name"] for _, d in DOCS if d["kind"] == "ClusterRoleBinding" for s in d["subjects"]}
    assert (
        deployment["spec"]["template"]["spec"]["serviceAccountName"] not in bound
    )  # the server needs no API access


def test_the_readmes_name_the_commands_and_flags_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    deploy_readme = (ROOT / "deploy" / "README.md").read_text()
    for command in _webhook_cli.COMMANDS:
        (line,) = [ln for ln in readme.splitlines() if ln.startswith(f"outrider {command.name} ")]
        options = {opt for param in command.params for opt in param.opts}
        assert {w.strip("[]") for w in line.split("#")[0].split() if w.strip("[]").startswith("-")} <= options
    assert "kubectl get pods,namespaces -A -o json | outrider inject-check -f -" in deploy_readme
    assert "failurePolicy: Ignore" in deploy_readme
    for path in ("deploy/k8s/base", "deploy/k8s/webhook"):
        assert f"kubectl apply -k {path}" in deploy_readme
        assert (ROOT / path / "kustomization.yaml").is_file()


def test_the_cronjob_runs_the_check_in_cluster_as_the_check_account() -> None:
    cronjob = _one("CronJob", "outrider-inject-check")
    job = cronjob["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert (
        pod["serviceAccountName"] == "outrider-inject-check" and pod["automountServiceAccountToken"] is True
    )
    assert job["backoffLimit"] == 0 and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = pod["containers"]
    args = container["args"]
    assert args[0] == _webhook_cli.inject_check.name and "--in-cluster" in args
    options = {opt for param in _webhook_cli.inject_check.params for opt in param.opts}
    assert {a for a in args if a.startswith("--")} <= options
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_rendered_kustomization_validates_too() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(WEBHOOK)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(rendered) == len(DOCS)
    for doc in rendered:
        if doc["apiVersion"] != CERT_MANAGER:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"):
            assert doc["metadata"]["namespace"] == "outrider", doc["metadata"]["name"]
