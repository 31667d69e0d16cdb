"""`outrider inject`: offline sidecar injection into Kubernetes manifests, with the values of
the kustomize component (deploy/k8s/injection) and nothing else."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from devstack import _inject
from devstack.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "k8s" / "examples"
PATCH = ROOT / "deploy" / "k8s" / "injection" / "sidecar-patch.yaml"
POD = {"containers": [{"name": "agent", "image": "agent:1"}]}


def _workload(kind: str, name: str, *, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A minimal object of `kind` whose pod asks for the sidecar through `annotations`."""
    pod: dict[str, Any] = {"metadata": {"annotations": dict(annotations or {})}, "spec": dict(POD)}
    api = {"Pod": "v1", "Job": "batch/v1", "CronJob": "batch/v1"}.get(kind, "apps/v1")
    doc: dict[str, Any] = {"apiVersion": api, "kind": kind, "metadata": {"name": name}}
    if kind == "Pod":
        doc["metadata"].update(pod["metadata"])
        doc["spec"] = pod["spec"]
    elif kind == "CronJob":
        doc["spec"] = {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": pod}}}
    else:
        doc["spec"] = {"template": pod}
    return doc


def _pods(doc: dict[str, Any]) -> dict[str, Any]:
    """The pod (metadata and spec) a workload defines."""
    if doc["kind"] == "Pod":
        return doc
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[no-any-return]
    return doc["spec"]["template"]  # type: ignore[no-any-return]


def _dump(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def _sidecar(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in pod_spec.get("initContainers", []) if c["name"] == _inject.SIDECAR_NAME]
    return sidecar  # type: ignore[no-any-return]


def _assert_well_formed_pod(pod_spec: dict[str, Any]) -> None:
    """What the API server would reject: duplicate names, mounts of undefined volumes."""
    containers = pod_spec["containers"] + pod_spec.get("initContainers", [])
    names = [c["name"] for c in containers]
    assert len(names) == len(set(names)), names
    volumes = [v["name"] for v in pod_spec.get("volumes", [])]
    assert len(volumes) == len(set(volumes)), volumes
    for container in containers:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, (container["name"], mount["name"])
    assert isinstance(pod_spec["terminationGracePeriodSeconds"], int)


def test_inject_example_agent_gets_the_components_native_sidecar() -> None:
    source = (EXAMPLES / "agent" / "agent-deployment.yaml").read_text()
    result = _inject.inject_text(source)
    assert result.injected == ["Deployment/support-bot"]
    (doc,) = [d for d in yaml.safe_load_all(result.text) if d]
    pod = doc["spec"]["template"]
    sidecar = _sidecar(pod["spec"])
    # the component's own values: one source of truth
    patch_pod = yaml.safe_load(PATCH.read_text())["spec"]["template"]
    assert sidecar == patch_pod["spec"]["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"  # the native sidecar
    assert pod["spec"]["initContainers"][0]["name"] == _inject.SIDECAR_NAME
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["exec"]["command"][0] == "outrider-health"  # grpc.health.v1
    assert sidecar["resources"]["requests"] and sidecar["resources"]["limits"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["outrider-sidecar-config"]["configMap"]["name"] == "outrider-sidecar-config"
    assert "emptyDir" in volumes["outrider-sidecar-spill"]
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in sidecar["env"] if "valueFrom" in e}
    assert secrets == {"outrider-sidecar-secrets", "outrider-session-key"}
    assert pod["spec"]["terminationGracePeriodSeconds"] == _inject.DEFAULT_GRACE_SECONDS
    assert pod["metadata"]["labels"]["outrider.dev/sidecar"] == "true"
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "agent"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9464"
    # the agent's own settings are kept
    assert pod["spec"]["containers"][0]["name"] == "agent"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    _assert_well_formed_pod(pod["spec"])


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.name)
def test_inject_examples_is_idempotent_and_leaves_others_byte_for_byte(path: Path) -> None:
    source = path.read_text()
    once = _inject.inject_text(source)
    twice = _inject.inject_text(once.text)
    assert twice.text == once.text
    assert twice.injected == []
    assert twice.skipped == once.injected
    if not once.injected:
        assert once.text == source  # comments and all
    for doc in yaml.safe_load_all(once.text):
        if doc and doc.get("kind") == "Deployment":
            has = any(
                c["name"] == _inject.SIDECAR_NAME
                for c in doc["spec"]["template"]["spec"].get("initContainers", [])
            )
            assert has == (f"Deployment/{doc['metadata']['name']}" in once.injected)


@pytest.mark.parametrize("kind", ["Pod", "Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"])
def test_inject_every_pod_template_kind_when_annotated(kind: str) -> None:
    asking = _workload(kind, "asking", annotations={"outrider.io/inject": "true"})
    _pods(asking)["spec"]["terminationGracePeriodSeconds"] = 45  # the user's value is kept
    plain = _workload(kind, "plain")
    result = _inject.inject_text(_dump(asking, plain))
    assert result.injected == [f"{kind}/asking"]
    injected, untouched = yaml.safe_load_all(result.text)
    pod_spec = _pods(injected)["spec"]
    assert _sidecar(pod_spec)["restartPolicy"] == "Always"
    assert pod_spec["terminationGracePeriodSeconds"] == 45
    _assert_well_formed_pod(pod_spec)
    assert untouched == plain
    assert _inject.inject_text(result.text).text == result.text


def test_inject_all_and_opt_out_and_namespace_selection() -> None:
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "agents", "labels": {"outrider.io/inject": "enabled"}},
    }
    in_ns = _workload("Deployment", "in-ns")
    in_ns["metadata"]["namespace"] = "agents"
    elsewhere = _workload("Deployment", "elsewhere")
    opted_out = _workload("Deployment", "opted-out", annotations={"outrider.io/inject": "false"})
    text = _dump(namespace, in_ns, elsewhere, opted_out)
    assert _inject.inject_text(text).injected == ["Deployment/in-ns"]
    assert _inject.inject_text(text, inject_all=True).injected == ["Deployment/in-ns", "Deployment/elsewhere"]


def test_inject_keeps_existing_init_containers_and_volumes_after_the_sidecar() -> None:
    doc = _workload("Deployment", "agent", annotations={"outrider.io/inject": "true"})
    spec = doc["spec"]["template"]["spec"]
    spec["initContainers"] = [{"name": "migrate", "image": "m:1"}]
    spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    out = next(yaml.safe_load_all(_inject.inject_text(_dump(doc), image="outrider:9.9").text))
    pod_spec = out["spec"]["template"]["spec"]
    assert [c["name"] for c in pod_spec["initContainers"]] == [_inject.SIDECAR_NAME, "migrate"]
    assert pod_spec["volumes"][0] == {"name": "data", "emptyDir": {}}
    assert _sidecar(pod_spec)["image"] == "outrider:9.9"
    _assert_well_formed_pod(pod_spec)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Pod\n---\nkind: Deployment\n  spec: [\n", "document 2 (line 4): invalid YAML"),
        ("kind: Service\n---\n- a\n- b\n", "document 2 (line 3): expected a mapping"),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 1}\n",
            "document 1 (line 1, Deployment/web): spec.template is missing",
        ),
        ("kind: Pod\nmetadata: {name: p}\nspec: {}\n", "Pod/p): the pod has no spec.containers"),
    ],
)
def test_inject_errors_name_the_document(text: str, message: str) -> None:
    with pytest.raises(_inject.InjectError, match=r"manifest\.yaml: ") as info:
        _inject.inject_text(text, source="manifest.yaml", inject_all=True)
    assert message in str(info.value)


def test_inject_command_writes_the_file_and_reports_errors(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text((EXAMPLES / "agent" / "agent-deployment.yaml").read_text())
    out = tmp_path / "out.yaml"
    runner = CliRunner()
    result = runner.invoke(main, ["inject", "-f", str(manifest), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "injected 1 pod template(s)" in result.output
    assert _inject.SIDECAR_NAME in out.read_text()
    again = runner.invoke(main, ["inject", "-f", str(out)])
    assert again.exit_code == 0, again.output
    assert again.stdout == out.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("kind: Pod\n---\n a: b\n c\n"))
    failed = runner.invoke(main, ["inject", "-f", str(bad)])
    assert failed.exit_code == 1
    assert "bad.yaml: document 2 (line 5): invalid YAML" in failed.output


def test_inject_template_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "patch.yaml"
    broken.write_text("kind: Deployment\nspec: {}\n")
    with pytest.raises(_inject.InjectError, match=r"patch\.yaml: not a sidecar injection patch"):
        _inject.SidecarTemplate.load(broken)


def test_inject_keeps_separators_comments_and_inline_documents() -> None:
    text = textwrap.dedent(
        """\
        # the header of an untouched document stays
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        --- # a comment on the separator
        apiVersion: v1
        kind: Pod
        metadata: {name: a, annotations: {outrider.io/inject: "true"}}
        spec: {containers: [{name: c, image: i}]}
        --- {apiVersion: v1, kind: Pod, metadata: {name: b}, spec: {containers: [{name: c, image: i}]}}
        ---
        # nothing but a comment
        """
    )
    result = _inject.inject_text(text, inject_all=True)
    assert result.injected == ["Pod/a", "Pod/b"]
    assert result.text.startswith(text.split("--- #")[0] + "--- # a comment on the separator\n")
    assert result.text.endswith("---\n# nothing but a comment\n")
    docs = list(yaml.safe_load_all(result.text))
    assert [d["metadata"]["name"] for d in docs if d] == ["web", "a", "b"]
    assert _inject.inject_text(result.text, inject_all=True).text == result.text


def test_inject_into_a_list_selects_by_each_item() -> None:
    items = [
        _workload("Deployment", "asking", annotations={"outrider.io/inject": "true"}),
        _workload("Job", "plain"),
    ]
    text = _dump({"apiVersion": "v1", "kind": "List", "items": items})
    result = _inject.inject_text(text)
    assert result.injected == ["Deployment/asking"]
    (doc,) = yaml.safe_load_all(result.text)
    assert _sidecar(doc["items"][0]["spec"]["template"]["spec"])
    assert doc["items"][1] == items[1]
