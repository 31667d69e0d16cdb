"""`outrider inject-webhook`: the sidecar injection as a Kubernetes mutating admission webhook.

The API server POSTs an AdmissionReview v1 for every pod being created that the
MutatingWebhookConfiguration (deploy/k8s/webhook) selects; the answer allows the pod and, when it
should get the sidecar, carries an RFC 6902 JSONPatch (base64) from the pod as sent to the pod as
`outrider inject` would write it. Both run the same function, `_inject.inject_object`, with the
same template (the kustomize component's patch), so the three ways of injecting never drift.

Which pods. An AdmissionReview carries no namespace labels, so the configuration has two
webhooks that call two paths:
  /inject/namespace  pods of namespaces labelled `outrider.io/inject=enabled` (its
                     namespaceSelector): every pod, unless annotated `outrider.io/inject: "false"`
  /inject/pod        pods of other namespaces: only those annotated `outrider.io/inject: "true"`
A pod that already has the sidecar gets no patch (idempotent: a reinvocation, or a pod that
`outrider inject` or the kustomize component already injected).

Answers, chosen so that the webhook can never break pod creation by itself:
  - not JSON, not an AdmissionReview v1, or no request uid: HTTP 400 naming what is wrong. There
    is no uid to answer for, so no valid review can be returned; the API server treats it as a
    call failure and applies failurePolicy (Ignore in deploy/k8s/webhook: the pod is created
    without the sidecar and `outrider inject-check` reports it).
  - a valid review whose pod cannot be injected (no containers list, ...): `allowed: true`
    with no patch and a warning the client (kubectl) shows, so the pod is not blocked on our
    account; the API server would reject such a pod itself anyway.
  - anything but a Pod CREATE: `allowed: true`, no patch.
Nothing of the pod (its env may hold values) is logged: only the uid, namespace, name and the
decision.

TLS from files (cert-manager's Secret mounted as tls.crt / tls.key): they are checked every
`reload_interval` seconds and a changed pair serves new handshakes (the server context's SNI
callback hands each connection the current context); a pair that does not load keeps the
previous one and logs why.

On SIGTERM it drains: /healthz answers 503 while admissions are still served for
`shutdown_delay` seconds, so the Service stops sending calls here before the port closes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from devstack import _inject, _jsonpatch

log = logging.getLogger("outrider.webhook")

PATH_NAMESPACE = "/inject/namespace"
PATH_POD = "/inject/pod"
PATH_HEALTH = "/healthz"
REVIEW_API = "admission.k8s.io/v1"
DEFAULT_RELOAD_INTERVAL_S = 10.0
# after SIGTERM, keep answering while /healthz fails, so the Service drops this replica
# before the port closes (the API server's calls in between would be missed injections)
DEFAULT_SHUTDOWN_DELAY_S = 5.0
# the API server sends at most ~3 MiB objects; room for the review around one
MAX_BODY_BYTES = 8 * 1024 * 1024


class WebhookError(ValueError):
    """A bad AdmissionReview body or TLS files that do not load; the message says which."""


@dataclass(frozen=True)
class Injector:
    """What the webhook injects: the component's template and an optional image override."""

    template: _inject.SidecarTemplate
    image: str | None = None


def review(body: Any, injector: Injector, *, namespace_enabled: bool) -> dict[str, Any]:
    """The AdmissionReview answering `body`; raises WebhookError when there is none to answer."""
    if not isinstance(body, dict):
        raise WebhookError(f"expected an AdmissionReview object, got {type(body).__name__}")
    if body.get("apiVersion") != REVIEW_API or body.get("kind") != "AdmissionReview":
        raise WebhookError(
            f"expected apiVersion {REVIEW_API} kind AdmissionReview, "
            f"got apiVersion {body.get('apiVersion')!r} kind {body.get('kind')!r}"
        )
    request = body.get("request")
    if not isinstance(request, dict):
        raise WebhookError("AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise WebhookError("AdmissionReview request has no uid")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    patch, warning = _patch_for(request, injector, namespace_enabled)
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if warning:
        response["warnings"] = [warning]
    return {"apiVersion": REVIEW_API, "kind": "AdmissionReview", "response": response}


def _patch_for(
    request: dict[str, Any], injector: Injector, namespace_enabled: bool
) -> tuple[list[_jsonpatch.Op], str | None]:
    kind = request.get("kind") or {}
    pod = request.get("object")
    namespace = str(request.get("namespace") or "")
    uid = request["uid"]
    if not isinstance(kind, dict) or kind.get("kind") != "Pod" or request.get("operation") != "CREATE":
        return [], None
    if not isinstance(pod, dict):
        return [], "outrider: sidecar not injected: the request carries no pod object"
    # request.kind is authoritative; the serialized object may omit its own TypeMeta
    pod = {**pod, "kind": "Pod"}
    meta: dict[str, Any] = pod["metadata"] if isinstance(pod.get("metadata"), dict) else {}
    name = meta.get("name") or meta.get("generateName") or request.get("name") or "?"
    where = f"pod {namespace}/{name}"
    injected = copy_of(pod)
    try:
        done, skipped = _inject.inject_object(
            injected,
            injector.template,
            where=where,
            namespaces={namespace} if namespace_enabled else set(),
            image=injector.image,
            default_namespace=namespace,
        )
    except _inject.InjectError as exc:
        log.warning("admission %s: %s", uid, exc)
        return [], f"outrider: sidecar not injected: {exc}"
    except (AttributeError, TypeError, KeyError) as exc:
        # a field of the wrong JSON type that the API server's validation would reject anyway;
        # allowing it unchanged keeps that verdict the API server's
        log.warning("admission %s: %s is malformed (%s)", uid, where, type(exc).__name__)
        return [], f"outrider: sidecar not injected: {where} is malformed"
    if done or skipped:
        log.info("admission %s: %s %s", uid, where, "injected" if done else "already has the sidecar")
    else:  # the pod hook sees nearly every pod of the cluster: not worth a line each
        log.debug("admission %s: %s not selected", uid, where)
    return _jsonpatch.diff(pod, injected), None


def copy_of(obj: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a JSON object (what came off the wire is JSON: the fastest exact copy)."""
    copied: dict[str, Any] = json.loads(json.dumps(obj))
    return copied


@dataclass
class Health:
    draining: bool = False  # /healthz fails (503) while admissions are still answered


def make_app(injector: Injector, health: Health | None = None) -> web.Application:
    """The webhook's routes: the two injection paths and /healthz."""
    health = health or Health()

    def handler(namespace_enabled: bool) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                return _bad_request(f"body is not JSON: {exc}")
            try:
                answer = review(body, injector, namespace_enabled=namespace_enabled)
            except WebhookError as exc:
                return _bad_request(str(exc))
            return web.json_response(answer)

        return handle

    async def healthz(_: web.Request) -> web.Response:
        if health.draining:
            return web.Response(status=503, text="shutting down\n")
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post(PATH_NAMESPACE, handler(True))
    app.router.add_post(PATH_POD, handler(False))
    app.router.add_get(PATH_HEALTH, healthz)
    return app


def _bad_request(message: str) -> web.Response:
    log.warning("bad admission request: %s", message)
    return web.json_response({"error": message}, status=400)


class ReloadingTLS:
    """A server SSL context whose certificate follows the files (cert-manager rotates them)."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._stamp = self._files_stamp()
        self._current = self._load()
        # the listener's context holds the first pair too; each handshake is then handed the
        # context current at that moment (the callback runs for every ClientHello, SNI or not)
        self.context = self._load()
        self.context.sni_callback = self._pick

    def _pick(self, conn: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        conn.context = self._current

    @staticmethod
    def _new_context() -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...]:
        try:
            stats = [os.stat(self.cert_file), os.stat(self.key_file)]  # follows the Secret's symlinks
        except OSError as exc:
            raise WebhookError(f"TLS files: {exc}") from exc
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def _load(self) -> ssl.SSLContext:
        context = self._new_context()
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise WebhookError(
                f"TLS certificate {self.cert_file} / key {self.key_file} do not load: {exc}"
            ) from exc
        return context

    def reload_if_changed(self) -> bool:
        """Load the files again when they changed; True when new handshakes use a new pair."""
        try:
            stamp = self._files_stamp()
            if stamp == self._stamp:
                return False
            current = self._load()
        except WebhookError as exc:
            log.warning("keeping the current TLS certificate: %s", exc)
            return False
        self._stamp, self._current = stamp, current
        log.info("TLS certificate reloaded from %s", self.cert_file)
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()


@dataclass
class RunningWebhook:
    runner: web.AppRunner
    tls: ReloadingTLS
    host: str
    port: int
    health: Health
    _watcher: asyncio.Task[None]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    async def stop(self) -> None:
        self._watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watcher
        await self.runner.cleanup()


async def start(
    host: str,
    port: int,
    *,
    cert_file: Path,
    key_file: Path,
    injector: Injector,
    reload_interval: float = DEFAULT_RELOAD_INTERVAL_S,
) -> RunningWebhook:
    """Serve the webhook over TLS on host:port (0 picks a free port); stop() ends it."""
    tls = ReloadingTLS(cert_file, key_file)
    health = Health()
    runner = web.AppRunner(make_app(injector, health), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls.context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    watcher = asyncio.create_task(tls.watch(reload_interval), name="outrider-webhook-tls-reload")
    return RunningWebhook(runner, tls, host, int(bound[1]), health, watcher)


async def serve(
    host: str,
    port: int,
    *,
    cert_file: Path,
    key_file: Path,
    injector: Injector,
    reload_interval: float = DEFAULT_RELOAD_INTERVAL_S,
    shutdown_delay: float = DEFAULT_SHUTDOWN_DELAY_S,
    on_ready: Callable[[RunningWebhook], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT (the kubelet's stop), drain for `shutdown_delay` seconds
    (a second signal cuts it short), then close the listener."""
    webhook = await start(
        host, port, cert_file=cert_file, key_file=key_file, injector=injector, reload_interval=reload_interval
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        if on_ready:
            on_ready(webhook)
        await stopping.wait()
        webhook.health.draining = True
        log.info("stopping: /healthz fails, admissions answered for %.1f s more", shutdown_delay)
        stopping.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), shutdown_delay)
    finally:
        await webhook.stop()
