"""`outrider inject-check`: pods that should run the sidecar and do not.

The webhook's failurePolicy is Ignore (deploy/README.md): while it is down, or for pods created
before their namespace was labelled, pods start without the sidecar. This finds them in what
`kubectl get pods,namespaces -A -o json` (or `-o yaml`) prints, or in the same objects read from
the API (`--in-cluster`, devstack._kube_list, the CronJob in deploy/k8s/webhook), with the
selection the webhook and `outrider inject` use (`_inject.selected`): a pod in a namespace labelled
`outrider.io/inject=enabled`, or annotated `outrider.io/inject: "true"`, and not opted out.
Namespaces the webhook configuration excludes (kube-system, its own) are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from devstack import _inject

# what deploy/k8s/webhook's MutatingWebhookConfiguration never sends to the webhook
DEFAULT_EXCLUDED = ("kube-system", "outrider")


class CheckInputError(ValueError):
    """Input that is not Kubernetes objects; the message names the source."""


@dataclass(frozen=True)
class Missing:
    namespace: str
    name: str
    phase: str
    reason: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} ({self.phase}): no {_inject.SIDECAR_NAME}, but {self.reason}"


@dataclass
class CheckResult:
    missing: list[Missing]
    checked: int  # pods that should have the sidecar
    pods: int  # every pod in the input
    namespaces_seen: bool  # whether the input listed Namespaces (else only annotations count)


def load_objects(text: str, source: str) -> list[dict[str, Any]]:
    """Every object of a JSON document or of (multi-document) YAML, Lists flattened."""
    try:
        docs: list[Any] = [json.loads(text)]
    except json.JSONDecodeError:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise CheckInputError(f"{source}: neither JSON nor YAML: {exc}") from exc
    objects = list(_flatten(d for d in docs if d is not None))
    if not objects:
        raise CheckInputError(
            f"{source}: no Kubernetes objects (expected `kubectl get pods,namespaces -A -o json`)"
        )
    return objects


def _flatten(docs: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc:
            raise CheckInputError(f"not a Kubernetes object: {str(doc)[:80]!r}")
        if str(doc["kind"]).endswith("List") and isinstance(doc.get("items"), list):
            yield from _flatten(doc["items"])  # List, PodList, NamespaceList
        else:
            yield doc


def check(objects: list[dict[str, Any]], *, excluded: Iterable[str] = DEFAULT_EXCLUDED) -> CheckResult:
    """The pods among `objects` that are selected for injection and lack the sidecar."""
    skip = set(excluded)
    namespaces = _inject.enabled_namespaces(objects)
    result = CheckResult(
        missing=[], checked=0, pods=0, namespaces_seen=any(o.get("kind") == "Namespace" for o in objects)
    )
    for pod in (o for o in objects if o.get("kind") == "Pod"):
        result.pods += 1
        meta = _member(pod, "metadata")
        namespace = str(meta.get("namespace") or "default")
        if namespace in skip or not _inject.selected(pod, meta, namespaces, default_namespace=namespace):
            continue
        result.checked += 1
        spec = _member(pod, "spec")
        if _inject.has_sidecar(spec):
            continue
        opted_in = str(_member(meta, "annotations").get(_inject.ANNOTATION, "")).strip().lower() == "true"
        reason = (
            f'annotated {_inject.ANNOTATION}: "true"'
            if opted_in
            else f"namespace {namespace} is labelled {_inject.ANNOTATION}=enabled"
            if namespace in namespaces
            else f'labelled {_inject.COMPONENT_LABEL}: "true"'
        )
        phase = str(_member(pod, "status").get("phase") or "Unknown")
        result.missing.append(Missing(namespace, str(meta.get("name") or "?"), phase, reason))
    result.missing.sort(key=lambda m: (m.namespace, m.name))
    return result


def _member(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}
