"""`outrider inject-check`: pods that should run the sidecar and do not, from what
`kubectl get pods,namespaces -A -o json` prints."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from devstack import _inject, _inject_check
from devstack.cli import main


def _namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "creationTimestamp": "2026-11-30T09:12:44Z",
            "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def _pod(
    namespace: str,
    name: str,
    *,
    sidecar: bool = False,
    annotations: dict[str, str] | None = None,
    phase: str = "Running",
) -> dict[str, Any]:
    init = (
        [{"name": _inject.SIDECAR_NAME, "image": "outrider:0.1.0", "restartPolicy": "Always"}]
        if sidecar
        else []
    )
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "labels": {"app": name.rsplit("-", 2)[0]},
            "annotations": dict(annotations or {}),
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name.rsplit("-", 1)[0]}
            ],
        },
        "spec": {
            "containers": [{"name": "agent", "image": "agent:1"}],
            "nodeName": "node-1",
            "serviceAccountName": "default",
        },
        "status": {"phase": phase, "podIP": "10.0.0.7"},
    }
    if init:
        pod["spec"]["initContainers"] = init
    return pod


def _cluster() -> dict[str, Any]:
    """A `kubectl get pods,namespaces -A -o json` List: labelled, plain and excluded namespaces."""
    items = [
        _pod("kube-system", "coredns-5d78c9869d-abcde"),
        _pod("support-bot", "support-bot-7d9f-x2x4q", sidecar=True),
        _pod("support-bot", "support-bot-7d9f-k8s7w"),  # created while the webhook was down
        _pod("support-bot", "batch-export-28912345-q9w2z", annotations={"outrider.io/inject": "false"}),
        _pod("team-a", "planner-6c5b-aaaaa", annotations={"outrider.io/inject": "true"}),
        _pod("team-a", "planner-6c5b-bbbbb", annotations={"outrider.io/inject": "true"}, sidecar=True),
        _pod("team-a", "web-5f4d-ccccc"),
        _pod("outrider", "outrider-webhook-7f9c-ddddd"),
        _namespace("kube-system", {"outrider.io/inject": "enabled"}),  # excluded: the webhook never sees it
        _namespace("support-bot", {"outrider.io/inject": "enabled"}),
        _namespace("team-a"),
        _namespace("outrider"),
    ]
    return {"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}}


def test_check_names_the_pods_that_missed_injection() -> None:
    result = _inject_check.check(_inject_check.load_objects(json.dumps(_cluster()), "pods.json"))
    assert [(m.namespace, m.name) for m in result.missing] == [
        ("support-bot", "support-bot-7d9f-k8s7w"),
        ("team-a", "planner-6c5b-aaaaa"),
    ]
    assert "namespace support-bot is labelled outrider.io/inject=enabled" in str(result.missing[0])
    assert 'annotated outrider.io/inject: "true"' in str(result.missing[1])
    assert (result.checked, result.pods, result.namespaces_seen) == (4, 8, True)


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_command_exits_1_naming_namespace_and_pod(fmt: str) -> None:
    cluster = _cluster()
    text = json.dumps(cluster, indent=4) if fmt == "json" else yaml.safe_dump(cluster)
    result = CliRunner().invoke(main, ["inject-check", "-f", "-"], input=text)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "support-bot/support-bot-7d9f-k8s7w (Running): no outrider-sidecar, "
        "but namespace support-bot is labelled outrider.io/inject=enabled",
        'team-a/planner-6c5b-aaaaa (Running): no outrider-sidecar, but annotated outrider.io/inject: "true"',
    ]
    assert "2 of 4 pod(s) selected for injection lack the sidecar (8 pod(s) read)" in result.stderr


def test_command_exits_0_when_every_selected_pod_has_the_sidecar(tmp_path: Any) -> None:
    cluster = _cluster()
    cluster["items"] = [
        i
        for i in cluster["items"]
        if i["metadata"]["name"] not in ("support-bot-7d9f-k8s7w", "planner-6c5b-aaaaa")
    ]
    path = tmp_path / "pods.json"
    path.write_text(json.dumps(cluster))
    result = CliRunner().invoke(main, ["inject-check", "-f", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "0 of 2 pod(s)" in result.stderr
    # --exclude-namespace replaces the defaults: kube-system's labelled namespace now counts
    result = CliRunner().invoke(main, ["inject-check", "-f", str(path), "--exclude-namespace", "outrider"])
    assert result.exit_code == 1 and result.stdout.startswith(
        "kube-system/coredns-5d78c9869d-abcde (Running)"
    )


def test_pods_only_input_checks_annotations_and_warns() -> None:
    pods = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [i for i in _cluster()["items"] if i["kind"] == "Pod"],
    }
    result = CliRunner().invoke(main, ["inject-check", "-f", "-"], input=json.dumps(pods))
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0].startswith("team-a/planner-6c5b-aaaaa")
    assert len(result.stdout.splitlines()) == 1
    assert "lists no Namespaces" in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no Kubernetes objects"),
        ("[1, 2]", "not a Kubernetes object"),
        ("a: [b", "neither JSON nor YAML"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(text: str, expected: str) -> None:
    result = CliRunner().invoke(main, ["inject-check", "-f", "-"], input=text)
    assert result.exit_code == 2 and expected in result.stderr, result.output
