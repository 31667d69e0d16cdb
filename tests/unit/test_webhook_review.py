"""The webhook's answer without a server: the RFC 6902 diff it sends, and what it does with
requests that are not a pod being created."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch
from hypothesis import given
from hypothesis import strategies as st

from devstack import _inject, _jsonpatch, _webhook

KEYS = st.sampled_from(["a", "b", "a/b", "~0", "~1/x", "kubectl.kubernetes.io/default-container", ""])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


@given(JSON, JSON)
def test_diff_applied_by_an_independent_implementation_gives_the_target(before: Any, after: Any) -> None:
    patch = _jsonpatch.diff(before, after)
    assert jsonpatch.apply_patch(before, patch) == after
    assert (patch == []) == (before == after)


def test_pointer_tokens_escape_tilde_before_slash() -> None:
    assert _jsonpatch.pointer_token("a~/b") == "a~0~1b"
    ops = _jsonpatch.diff({"metadata": {}}, {"metadata": {"annotations": {"x.io/y": "1"}}})
    assert ops == [{"op": "add", "path": "/metadata/annotations", "value": {"x.io/y": "1"}}]


def _review(kind: str = "Pod", operation: str = "CREATE", obj: Any = None) -> dict[str, Any]:
    pod = (
        obj
        if obj is not None
        else {"metadata": {"generateName": "bot-"}, "spec": {"containers": [{"name": "agent"}]}}
    )
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"kind": kind},
            "operation": operation,
            "namespace": "ns",
            "object": pod,
        },
    }


INJECTOR = _webhook.Injector(_inject.SidecarTemplate.load(), image="registry.example/outrider:9.9")


def test_only_pod_creates_are_patched_and_the_image_override_applies() -> None:
    for kind, operation in (("Deployment", "CREATE"), ("Pod", "UPDATE"), ("Pod", "DELETE")):
        answer = _webhook.review(_review(kind, operation), INJECTOR, namespace_enabled=True)
        assert answer["response"] == {"uid": "u-1", "allowed": True}
    answer = _webhook.review(_review(), INJECTOR, namespace_enabled=True)
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    pod = jsonpatch.apply_patch(_review()["request"]["object"], patch)
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["image"] == "registry.example/outrider:9.9"


def test_a_request_without_a_pod_object_is_allowed_with_a_warning() -> None:
    answer = _webhook.review(_review(obj="not a pod"), INJECTOR, namespace_enabled=True)
    assert answer["response"]["allowed"] is True and "patch" not in answer["response"]
    assert "no pod object" in answer["response"]["warnings"][0]


def test_a_malformed_pod_is_allowed_unchanged_with_a_warning() -> None:
    for pod in (
        {"metadata": {"labels": "app=x"}, "spec": {"containers": [{"name": "agent"}]}},
        {"metadata": {}, "spec": {"containers": ["agent"]}},
        {"metadata": [], "spec": {"containers": [{"name": "agent"}]}},
    ):
        answer = _webhook.review(_review(obj=pod), INJECTOR, namespace_enabled=True)
        assert answer["response"]["allowed"] is True and "patch" not in answer["response"], pod
        assert answer["response"]["warnings"][0].startswith("outrider: sidecar not injected"), pod
