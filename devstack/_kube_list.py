"""Pods and namespaces read from the Kubernetes API, for `outrider inject-check --in-cluster`.

Only what the check needs: two paginated LIST calls (`limit` / `continue`) with the pod's
ServiceAccount token, trusting the cluster CA. The API leaves `kind` off the items of a list,
so each item gets it back, as `kubectl get -o json` prints them.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp

PAGE_SIZE = 500
RESOURCES = (("/api/v1/namespaces", "Namespace"), ("/api/v1/pods", "Pod"))


class KubeListError(RuntimeError):
    """The API could not be read; the message names the URL and the status."""


def in_cluster_server() -> str:
    """The API server's URL from the environment every pod gets."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeListError("not in a pod: KUBERNETES_SERVICE_HOST / KUBERNETES_SERVICE_PORT are not set")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def credentials(token_file: Path, ca_file: Path) -> tuple[str, ssl.SSLContext]:
    """The ServiceAccount token (read each run: projected tokens rotate) and the cluster CA."""
    try:
        token = token_file.read_text().strip()
        tls = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise KubeListError(f"service account credentials: {exc}") from exc
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise KubeListError(f"service account credentials: {token_file} does not hold a bearer token")
    return token, tls


async def list_objects(
    server: str, *, token: str, tls: ssl.SSLContext, timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Every Namespace and Pod of the cluster."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    objects: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        for path, kind in RESOURCES:
            cont = ""
            while True:
                params = {"limit": str(PAGE_SIZE), **({"continue": cont} if cont else {})}
                url = server.rstrip("/") + path
                try:
                    async with http.get(url, params=params, ssl=tls) as resp:
                        if resp.status != 200:
                            body = (await resp.text())[:200]
                            raise KubeListError(f"GET {url}: HTTP {resp.status}: {body}")
                        page = await resp.json()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise KubeListError(f"GET {url}: {exc}") from exc
                objects += [{**item, "kind": kind} for item in page.get("items") or []]
                cont = (page.get("metadata") or {}).get("continue") or ""
                if not cont:
                    break
    return objects
