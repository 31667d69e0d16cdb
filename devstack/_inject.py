"""`outrider inject`: the sidecar injection, offline, for GitOps.

Reads Kubernetes YAML (several documents), and into every pod template that asks for it (Pod,
Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob) adds what the kustomize component
deploy/k8s/injection adds: the native sidecar (an init container with `restartPolicy: Always`),
its config, tmp, spill and control-key volumes, env from the key Secrets, gRPC health probes
and resources, plus the pod labels and scrape annotations; and sets
`terminationGracePeriodSeconds` when the pod has none.

One source of truth: the values come from the component's own patch
(deploy/k8s/injection/sidecar-patch.yaml), loaded as the template, so the two never drift.

Which pods: annotated `outrider.io/inject: "true"` (on the pod template or the workload), or
whose workload carries the component's label `outrider.dev/inject: "true"`, or in a Namespace of
the same input labelled or annotated `outrider.io/inject: enabled`; with `inject_all`, every
pod. `outrider.io/inject: "false"` opts a pod out in every case.

Idempotent: a pod that already has the sidecar container is left as it is, and a document that
does not change is written back byte for byte (comments and all).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ANNOTATION = "outrider.io/inject"
COMPONENT_LABEL = "outrider.dev/inject"  # what the kustomize component selects
ENV_TEMPLATE = "OUTRIDER_INJECT_TEMPLATE"
SIDECAR_NAME = "outrider-sidecar"
# the sidecar drains for shutdown_grace (10s in the examples) after the agent stopped; the
# kubelet's budget covers both, with room for the agent's own drain
DEFAULT_GRACE_SECONDS = 30
_TEMPLATE_REL = Path("deploy") / "k8s" / "injection" / "sidecar-patch.yaml"
# the repository (editable installs, tests) and the image (deploy/Dockerfile copies it there)
TEMPLATE_CANDIDATES = (
    Path(__file__).resolve().parents[1] / _TEMPLATE_REL,
    Path("/opt/outrider") / _TEMPLATE_REL,
)
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# `---` at the start of a line always starts a document (the rest of its line belongs to it)
_DOC_SEPARATOR = re.compile(r"^---(?=[ \t\r\n]|\Z)", re.MULTILINE)


class InjectError(ValueError):
    """A manifest or template that cannot be injected; the message names the document."""


@dataclass(frozen=True)
class SidecarTemplate:
    """What the component's patch adds to a pod template."""

    labels: dict[str, str]
    annotations: dict[str, str]
    init_container: dict[str, Any]
    volumes: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path | None = None) -> SidecarTemplate:
        path = path or find_template()
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            meta = doc["spec"]["template"].get("metadata") or {}
            pod = doc["spec"]["template"]["spec"]
            (container,) = [c for c in pod["initContainers"] if c.get("name") == SIDECAR_NAME]
            return cls(
                labels=dict(meta.get("labels") or {}),
                annotations=dict(meta.get("annotations") or {}),
                init_container=container,
                volumes=list(pod.get("volumes") or []),
            )
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
            raise InjectError(f"{path}: not a sidecar injection patch ({exc})") from exc


def find_template() -> Path:
    """The component's patch: $OUTRIDER_INJECT_TEMPLATE, else the repository's, else the image's."""
    if os.environ.get(ENV_TEMPLATE):
        return Path(os.environ[ENV_TEMPLATE])
    for candidate in TEMPLATE_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise InjectError(
        f"no injection template found ({', '.join(map(str, TEMPLATE_CANDIDATES))}); pass --template"
    )


@dataclass
class InjectResult:
    text: str
    injected: list[str] = field(default_factory=list)  # "Kind/name" of every pod template changed
    skipped: list[str] = field(default_factory=list)  # selected but already injected


@dataclass(frozen=True)
class _Doc:
    index: int  # 1-based, as a user counts them
    line: int  # 1-based line where the document starts
    text: str
    data: Any


def _split(text: str, source: str) -> list[_Doc]:
    docs = []
    marks = list(_DOC_SEPARATOR.finditer(text))
    starts = [0] + [m.end() for m in marks]
    ends = [m.start() for m in marks] + [len(text)]
    for index, (start, end) in enumerate(zip(starts, ends, strict=True), start=1):
        chunk = text[start:end]
        base = text.count("\n", 0, start) + 1  # the line the chunk starts on (its `---` line)
        line = base + 1 if index > 1 and _separator_rest(chunk) is not None else base
        try:
            data = yaml.safe_load(chunk)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {base + mark.line}" if mark is not None else f"starting at line {line}"
            problem = getattr(exc, "problem", None) or str(exc)
            raise InjectError(f"{source}: document {index} ({where}): invalid YAML: {problem}") from exc
        if data is not None and not isinstance(data, dict):
            raise InjectError(
                f"{source}: document {index} (line {line}): expected a mapping, got {type(data).__name__}"
            )
        docs.append(_Doc(index, line, chunk, data))
    return docs


def _pod_templates(
    doc: dict[str, Any], where: str
) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(workload, pod metadata, pod spec) of every pod an object defines; none for other kinds."""
    kind = doc.get("kind")
    if kind == "List":
        for n, item in enumerate(doc.get("items") or [], start=1):
            if isinstance(item, dict):
                yield from _pod_templates(item, f"{where} item {n}")
        return
    if kind == "Pod":
        holder = doc
    elif kind in POD_TEMPLATE_KINDS:
        holder = _mapping(doc, ("spec", "template"), where)
    elif kind == "CronJob":
        holder = _mapping(doc, ("spec", "jobTemplate", "spec", "template"), where)
    else:
        return
    spec = holder.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list):
        raise InjectError(f"{where}: the pod has no spec.containers list")
    meta = holder.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise InjectError(f"{where}: the pod's metadata is not a mapping")
    yield doc, meta, spec


def _mapping(doc: dict[str, Any], path: tuple[str, ...], where: str) -> dict[str, Any]:
    node = doc
    for key in path:
        child = node.get(key)
        if not isinstance(child, dict):
            raise InjectError(f"{where}: {'.'.join(path)} is missing or not a mapping")
        node = child
    return node


def _flag(meta: dict[str, Any], key: str, name: str) -> str | None:
    values = meta.get(key) or {}
    value = values.get(name) if isinstance(values, dict) else None
    return None if value is None else str(value).strip().lower()


def enabled_namespaces(objects: Iterable[Any]) -> set[str]:
    """Namespaces among `objects` that opt every pod in (what the webhook selects on the cluster)."""
    names = set()
    for obj in objects:
        if isinstance(obj, dict) and obj.get("kind") == "Namespace":
            meta = obj.get("metadata") or {}
            if "enabled" in (_flag(meta, "labels", ANNOTATION), _flag(meta, "annotations", ANNOTATION)):
                names.add(str(meta.get("name")))
    return names


def selected(
    obj: dict[str, Any],
    pod_meta: dict[str, Any],
    namespaces: set[str],
    inject_all: bool = False,
    default_namespace: str | None = None,
) -> bool:
    """Whether a pod (of workload `obj`) should get the sidecar; `namespaces` opt every pod in.
    `default_namespace` is the namespace of an object that names none (an admission request's)."""
    meta = obj.get("metadata") or {}
    choices = [_flag(pod_meta, "annotations", ANNOTATION), _flag(meta, "annotations", ANNOTATION)]
    if "false" in choices:
        return False
    namespace = meta.get("namespace") or default_namespace
    return (
        inject_all
        or "true" in choices
        or _flag(meta, "labels", COMPONENT_LABEL) == "true"
        or (namespace is not None and str(namespace) in namespaces)
    )


def has_sidecar(pod_spec: dict[str, Any]) -> bool:
    """Whether a pod spec already runs the sidecar (as a native sidecar or a plain container)."""
    containers = [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]
    return any(isinstance(c, dict) and c.get("name") == SIDECAR_NAME for c in containers)


def inject_pod(
    pod_meta: dict[str, Any], pod_spec: dict[str, Any], template: SidecarTemplate, image: str | None
) -> bool:
    """Add the sidecar to one pod template in place; False when it already has one."""
    if has_sidecar(pod_spec):
        return False
    init = pod_spec.get("initContainers") or []
    sidecar = copy.deepcopy(template.init_container)
    if image:
        sidecar["image"] = image
    # first: a native sidecar is started (and ready) before the init containers after it
    pod_spec["initContainers"] = [sidecar, *init]
    have = {v.get("name") for v in pod_spec.get("volumes") or [] if isinstance(v, dict)}
    pod_spec["volumes"] = list(pod_spec.get("volumes") or []) + [
        copy.deepcopy(v) for v in template.volumes if v["name"] not in have
    ]
    pod_spec.setdefault("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    labels = pod_meta.setdefault("labels", {})
    for key, value in template.labels.items():
        labels.setdefault(key, value)
    annotations = pod_meta.setdefault("annotations", {})
    for key, value in template.annotations.items():
        if key == "kubectl.kubernetes.io/default-container":
            value = pod_spec["containers"][0].get("name", value)  # the agent, whatever its name
        annotations.setdefault(key, value)
    return True


def inject_object(
    data: dict[str, Any],
    template: SidecarTemplate,
    *,
    where: str,
    namespaces: set[str],
    inject_all: bool = False,
    image: str | None = None,
    default_namespace: str | None = None,
) -> tuple[list[str], list[str]]:
    """Inject, in place, into every selected pod one object defines: the one injection both
    `outrider inject` and the admission webhook run. Returns the "Kind/name" of each pod
    template injected, and of each selected one that already had the sidecar."""
    injected: list[str] = []
    skipped: list[str] = []
    for owner, pod_meta, pod_spec in _pod_templates(data, where):
        if not selected(owner, pod_meta, namespaces, inject_all, default_namespace):
            continue
        meta = owner.get("metadata") or {}
        owner_name = f"{owner.get('kind')}/{meta.get('name') or meta.get('generateName') or ''}"
        (injected if inject_pod(pod_meta, pod_spec, template, image) else skipped).append(owner_name)
    return injected, skipped


def inject_text(
    text: str,
    *,
    source: str = "<stdin>",
    template: SidecarTemplate | None = None,
    inject_all: bool = False,
    image: str | None = None,
) -> InjectResult:
    """Inject into every selected pod of a multi-document manifest; untouched documents keep
    their original text."""
    template = template or SidecarTemplate.load()
    docs = _split(text, source)
    namespaces = enabled_namespaces(doc.data for doc in docs)
    result = InjectResult(text="")
    out: list[str] = []
    for doc in docs:
        if not isinstance(doc.data, dict):
            out.append(doc.text)
            continue
        data = copy.deepcopy(doc.data)
        name = f"{data.get('kind')}/{(data.get('metadata') or {}).get('name')}"
        where = f"{source}: document {doc.index} (line {doc.line}, {name})"
        injected, skipped = inject_object(
            data, template, where=where, namespaces=namespaces, inject_all=inject_all, image=image
        )
        result.injected += injected
        result.skipped += skipped
        if injected:
            dumped = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)
            # after a `---`, keep a comment on its line
            out.append(
                dumped if doc.index == 1 else (_separator_rest(doc.text) or "").rstrip() + "\n" + dumped
            )
        else:
            out.append(doc.text)
    result.text = _join(out)
    return result


def _separator_rest(chunk: str) -> str | None:
    """What follows `---` on its line when it holds no content (blank or a comment), else None."""
    rest = chunk.split("\n", 1)[0]
    return rest if not rest.strip() or rest.strip().startswith("#") else None


def _join(chunks: list[str]) -> str:
    parts = [chunks[0]]
    for chunk in chunks[1:]:
        if parts[-1] and not parts[-1].endswith("\n"):
            parts.append("\n")
        parts += ["---", chunk]
    return "".join(parts)
