"""`outrider inject-check --in-cluster` against a stand-in API server over TLS on loopback:
paginated LISTs of namespaces and pods with the ServiceAccount's bearer token."""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from devstack import _kube_list
from tests.integration.test_inject_webhook import ROOT, write_self_signed
from tests.unit.test_inject_check import _cluster

TOKEN = "eyJhbGciOiJSUzI1NiJ9.test-token"
PAGE = 2  # the server's page size, whatever `limit` asks: the client must follow `continue`


def _api(seen: list[tuple[str, str]]) -> web.Application:
    items = _cluster()["items"]

    def lister(kind: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return web.json_response(
                    {"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401
                )
            seen.append((request.path, request.query.get("continue", "")))
            of_kind = [{k: v for k, v in i.items() if k != "kind"} for i in items if i["kind"] == kind]
            start = int(request.query.get("continue") or 0)
            page = of_kind[start : start + PAGE]
            more = start + PAGE < len(of_kind)
            meta = {"resourceVersion": "1234", **({"continue": str(start + PAGE)} if more else {})}
            return web.json_response(
                {"kind": f"{kind}List", "apiVersion": "v1", "metadata": meta, "items": page}
            )

        return handle

    app = web.Application()
    app.router.add_get("/api/v1/pods", lister("Pod"))
    app.router.add_get("/api/v1/namespaces", lister("Namespace"))
    return app


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[str, Path, Path, list[tuple[str, str]]]]:
    cert_file, key_file = write_self_signed(tmp_path, "kubernetes")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    seen: list[tuple[str, str]] = []
    runner = web.AppRunner(_api(seen))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}", token_file, cert_file, seen
    finally:
        await runner.cleanup()


async def test_in_cluster_check_pages_through_the_api_and_names_the_pods(api: Any) -> None:
    url, token_file, ca_file, seen = api
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devstack", "inject-check", "--in-cluster", "--api-server", url,
        "--token-file", str(token_file), "--ca-file", str(ca_file),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            stdout, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1, stderr.decode()
    assert [line.split(" ", 1)[0] for line in stdout.decode().splitlines()] == [
        "support-bot/support-bot-7d9f-k8s7w",
        "team-a/planner-6c5b-aaaaa",
    ]
    assert "2 of 4 pod(s) selected for injection lack the sidecar (8 pod(s) read)" in stderr.decode()
    # 4 namespaces and 8 pods in pages of 2: every page asked for, following `continue`
    assert [p for p, _ in seen].count("/api/v1/namespaces") == 2 and [p for p, _ in seen].count(
        "/api/v1/pods"
    ) == 4


async def test_an_unauthorized_account_is_named_with_the_status(api: Any, tmp_path: Path) -> None:
    url, _, ca_file, _ = api
    with pytest.raises(_kube_list.KubeListError, match="does not hold a bearer token"):
        _kube_list.credentials(ca_file, ca_file)  # a PEM is no token
    (tmp_path / "wrong").write_text("wrong-token")
    token, tls = _kube_list.credentials(tmp_path / "wrong", ca_file)
    with pytest.raises(_kube_list.KubeListError, match=r"/api/v1/namespaces: HTTP 401"):
        await _kube_list.list_objects(url, token=token, tls=tls)
    with pytest.raises(_kube_list.KubeListError, match="service account credentials"):
        _kube_list.credentials(tmp_path / "missing-token", ca_file)
