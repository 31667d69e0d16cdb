"""`outrider inject-webhook` over real TLS on loopback: AdmissionReview v1 in, a JSONPatch out
that, applied to the pod, gives exactly what `outrider inject` writes for the same pod."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devstack import _inject, _webhook
from devstack.cli import main

ROOT = Path(__file__).resolve().parents[2]


def write_self_signed(directory: Path, common_name: str) -> tuple[Path, Path]:
    """tls.crt / tls.key (cert-manager's names) for localhost and 127.0.0.1, written atomically."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    for path, data in (
        (
            key_file,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        ),
        (cert_file, cert.public_bytes(serialization.Encoding.PEM)),
    ):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return cert_file, key_file


def admission_pod(
    *, annotations: dict[str, str] | None = None, generate_name: str = "support-bot-7d9f-"
) -> dict[str, Any]:
    """A pod as the API server sends it to a mutating webhook: created by a ReplicaSet (only
    generateName, no namespace yet), defaults applied, the service-account volume mounted."""
    pod: dict[str, Any] = {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": generate_name,
            "creationTimestamp": None,
            "labels": {"app": "support-bot", "pod-template-hash": "7d9f"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "support-bot-7d9f",
                    "uid": "0b7c8a52-5a0e-4a55-9d8e-2f1c9b6d3e11",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "volumes": [
                {
                    "name": "kube-api-access-abcde",
                    "projected": {
                        "sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}],
                        "defaultMode": 420,
                    },
                }
            ],
            "containers": [
                {
                    "name": "agent",
                    "image": "support-bot:1.4.2",
                    "env": [{"name": "OUTRIDER_ADDRESS", "value": "127.0.0.1:50051"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                    "volumeMounts": [
                        {
                            "name": "kube-api-access-abcde",
                            "readOnly": True,
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        }
                    ],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {},
    }
    if annotations:
        pod["metadata"]["annotations"] = dict(annotations)
    return pod


def admission_review(pod: dict[str, Any], namespace: str = "support-bot") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


def offline_inject(pod: dict[str, Any], *, inject_all: bool) -> dict[str, Any]:
    """What `outrider inject` (the command) writes for the same pod."""
    result = CliRunner().invoke(
        main, ["inject", "-f", "-", *(["--all"] if inject_all else [])], input=yaml.safe_dump(pod)
    )
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = yaml.safe_load(result.stdout)
    return out


@pytest.fixture
async def webhook(tmp_path: Path) -> AsyncIterator[tuple[_webhook.RunningWebhook, ssl.SSLContext]]:
    cert_file, key_file = write_self_signed(tmp_path, "outrider-webhook-test")
    injector = _webhook.Injector(_inject.SidecarTemplate.load())
    running = await _webhook.start(
        "127.0.0.1", 0, cert_file=cert_file, key_file=key_file, injector=injector, reload_interval=0.05
    )
    client_tls = ssl.create_default_context(cafile=str(cert_file))  # verifies the chain and 127.0.0.1
    try:
        yield running, client_tls
    finally:
        await running.stop()


async def post(
    running: _webhook.RunningWebhook, client_tls: ssl.SSLContext, path: str, body: bytes
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            running.url + path, data=body, headers={"content-type": "application/json"}, ssl=client_tls
        ) as resp,
    ):
        return resp.status, await resp.json()


def applied(pod: dict[str, Any], answer: dict[str, Any], uid: str) -> dict[str, Any]:
    """The pod after the API server applied the answer; checks the review's envelope on the way."""
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == uid and response["allowed"] is True
    if "patch" not in response:
        assert "patchType" not in response
        return pod
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    assert all(op["op"] in ("add", "replace", "remove") for op in patch)
    result: dict[str, Any] = jsonpatch.apply_patch(pod, patch)
    return result


async def test_pod_in_labelled_namespace_gets_what_outrider_inject_writes(webhook: Any) -> None:
    running, client_tls = webhook
    pod = admission_pod()
    review = admission_review(pod)
    status, answer = await post(running, client_tls, _webhook.PATH_NAMESPACE, json.dumps(review).encode())
    assert status == 200
    patched = applied(pod, answer, review["request"]["uid"])
    assert patched == offline_inject(pod, inject_all=True)
    (sidecar,) = [c for c in patched["spec"]["initContainers"] if c["name"] == _inject.SIDECAR_NAME]
    assert sidecar["restartPolicy"] == "Always"
    # the annotation key with a `/` went through a JSON pointer (~1) intact
    assert patched["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "agent"
    assert "namespace" not in patched["metadata"]  # the webhook adds nothing it does not own
    # the same pod on the other path (namespace not labelled) is not injected
    review = admission_review(pod)
    status, answer = await post(running, client_tls, _webhook.PATH_POD, json.dumps(review).encode())
    assert status == 200 and applied(pod, answer, review["request"]["uid"]) == pod


async def test_annotated_pod_opted_out_pod_and_already_injected_pod(webhook: Any) -> None:
    running, client_tls = webhook
    annotated = admission_pod(annotations={"outrider.io/inject": "true"})
    review = admission_review(annotated, namespace="team-a")
    status, answer = await post(running, client_tls, _webhook.PATH_POD, json.dumps(review).encode())
    assert status == 200
    patched = applied(annotated, answer, review["request"]["uid"])
    assert patched == offline_inject(annotated, inject_all=False)
    assert patched != annotated

    # opted out: no patch on either path, even in a labelled namespace
    opted_out = admission_pod(annotations={"outrider.io/inject": "false"})
    for path in (_webhook.PATH_NAMESPACE, _webhook.PATH_POD):
        review = admission_review(opted_out)
        status, answer = await post(running, client_tls, path, json.dumps(review).encode())
        assert status == 200 and "patch" not in answer["response"]

    # never twice: the injected pod sent again (a reinvocation) gets no patch
    review = admission_review(patched)
    status, answer = await post(running, client_tls, _webhook.PATH_NAMESPACE, json.dumps(review).encode())
    assert status == 200 and applied(patched, answer, review["request"]["uid"]) == patched


async def test_garbage_bodies_get_400_naming_the_problem_and_health_answers(webhook: Any) -> None:
    running, client_tls = webhook
    cases = {
        b"\x00\xffnot json": "not JSON",
        b"[1, 2]": "expected an AdmissionReview object",
        json.dumps(
            {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}
        ).encode(): "apiVersion",
        json.dumps(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}
        ).encode(): "uid",
    }
    for body, expected in cases.items():
        status, answer = await post(running, client_tls, _webhook.PATH_NAMESPACE, body)
        assert status == 400 and expected in answer["error"], (body, answer)
    # a pod that cannot be injected is allowed as it is, with a warning kubectl shows
    broken = admission_pod()
    del broken["spec"]["containers"]
    review = admission_review(broken)
    status, answer = await post(running, client_tls, _webhook.PATH_NAMESPACE, json.dumps(review).encode())
    assert status == 200 and answer["response"]["allowed"] is True and "patch" not in answer["response"]
    assert "containers" in answer["response"]["warnings"][0]
    async with aiohttp.ClientSession() as http, http.get(running.url + "/healthz", ssl=client_tls) as resp:
        assert resp.status == 200


async def _served_cert(running: _webhook.RunningWebhook) -> str:
    pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", running.port), timeout=5)
    return x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()


async def test_rotated_certificate_serves_new_handshakes(webhook: Any, tmp_path: Path) -> None:
    running, _ = webhook
    assert await _served_cert(running) == "CN=outrider-webhook-test"
    (tmp_path / "tls.crt").write_text("half-written")  # a bad pair keeps the current one
    assert not running.tls.reload_if_changed()
    assert await _served_cert(running) == "CN=outrider-webhook-test"
    write_self_signed(tmp_path, "outrider-webhook-rotated")  # what cert-manager's renewal does
    async with asyncio.timeout(10):
        while True:
            if await _served_cert(running) == "CN=outrider-webhook-rotated":
                break
            await asyncio.sleep(0.05)


async def test_command_serves_over_tls_drains_on_sigterm_and_stops_on_the_second(tmp_path: Path) -> None:
    cert_file, key_file = write_self_signed(tmp_path, "outrider-webhook-test")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devstack", "inject-webhook", "--shutdown-delay", "600",
        "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file), "--listen", "127.0.0.1:0",
        cwd=ROOT, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None

        async def line_with(text: str) -> str:
            async with asyncio.timeout(30):
                line = ""
                while text not in line:
                    line = (await proc.stderr.readline()).decode()  # type: ignore[union-attr]
                    assert line, f"the webhook exited before printing {text!r}"
                return line

        line = await line_with("inject-webhook on https://")
        url = line.split(" on ", 1)[1].split()[0]
        client_tls = ssl.create_default_context(cafile=str(cert_file))
        pod = admission_pod(annotations={"outrider.io/inject": "true"})
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/healthz", ssl=client_tls) as resp:
                assert resp.status == 200 and await resp.text() == "ok\n"
            proc.terminate()
            await line_with("stopping: /healthz fails")
            # draining: the probe fails so the Service drops the replica, admissions still answered
            async with http.get(url + "/healthz", ssl=client_tls) as resp:
                assert resp.status == 503
            review = admission_review(pod)
            async with http.post(url + _webhook.PATH_POD, json=review, ssl=client_tls) as resp:
                assert resp.status == 200 and "patch" in (await resp.json())["response"]
        proc.terminate()  # a second signal ends the drain
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_command_names_tls_files_that_do_not_load(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_text("not a certificate")
    (tmp_path / "tls.key").write_text("not a key")
    out = subprocess.run(
        [sys.executable, "-m", "devstack", "inject-webhook", "--listen", "127.0.0.1:0",
         "--tls-cert-file", str(tmp_path / "tls.crt"), "--tls-key-file", str(tmp_path / "tls.key")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert out.returncode == 1 and "tls.crt" in out.stderr and "do not load" in out.stderr, out.stderr
