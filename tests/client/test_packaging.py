"""The contract and the client as distributions: the server and the client share one copy of
`outrider.v1` in a process, and `pip install ./proto ./client` into a fresh venv gives a
working client without any of the server's dependencies."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devstack.simprovider import SimProvider
from sidecar import Sidecar
from tests.integration.test_sidecar_api import API_KEY, sidecar_config, sim_models

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("aiokafka", "scipy", "numpy", "pydantic", "cryptography", "sidecar", "collector", "devstack")


def test_server_and_client_in_one_process_share_one_contract() -> None:
    from google.protobuf import descriptor_pool

    import collector  # noqa: F401 - the server's registrations, google.rpc included
    import devstack.simprovider  # noqa: F401
    import outrider_client
    import sidecar  # noqa: F401
    from outrider import RETRY_AFTER_MS_KEY, SESSION_DRAINED
    from outrider.v1 import sidecar_pb2
    from outrider_client._errors import retry_after_of
    from outrider_client._status import parse_details
    from sidecar.resilience._user_quotas import Refusal
    from sidecar.routing._drain import precondition_status

    spec = importlib.util.find_spec("outrider")
    assert spec is not None and list(spec.submodule_search_locations or []) == [
        str(ROOT / "proto" / "outrider")
    ]
    assert descriptor_pool.Default().FindFileByName("outrider/v1/sidecar.proto") is sidecar_pb2.DESCRIPTOR
    assert outrider_client.Client.__module__ == "outrider_client._sync"
    # the server's rich statuses (real google.rpc types) read by the client's private pool
    drained = precondition_status(SESSION_DRAINED, "drained", {"version_id": "v9"})
    status = parse_details(drained.trailing_metadata)
    assert (status.reason, dict(status.metadata)) == (SESSION_DRAINED, {"version_id": "v9"})
    import grpc

    refused = Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "user quota", 2.5).status()
    assert RETRY_AFTER_MS_KEY in dict(refused.trailing_metadata)
    assert retry_after_of(refused.trailing_metadata, parse_details(refused.trailing_metadata)) == 2.5
    assert parse_details([("grpc-status-details-bin", b"\xff\xff")]).reason == ""  # garbage ignored


@pytest.fixture
async def sidecar() -> AsyncIterator[Sidecar]:
    async with (
        SimProvider(sim_models(), api_key=API_KEY, seed=1) as sim,
        Sidecar(sidecar_config(sim), sidecar_id="client-venv") as s,
    ):
        yield s


AGENT = """
import importlib.metadata, importlib.util, json, sys
from outrider_client import Client
absent = [m for m in sys.argv[2].split(",") if importlib.util.find_spec(m) is not None]
with Client(sys.argv[1], timeout=20) as client, client.session(user_id="venv") as s:
    loop = s.run_tools('/tool lookup_order {"order_id": "A1"}')
    files = [str(f) for f in importlib.metadata.files("outrider-contract") or ()]
    print(json.dumps({
        "present": absent,
        "answer": loop.content,
        "tools": [r.name for r in loop.tool_results],
        "dists": sorted(d.metadata["Name"] for d in importlib.metadata.distributions()),
        "contract_has_pb2": "outrider/v1/sidecar_pb2.py" in files,
        "client_files": [str(f) for f in importlib.metadata.files("outrider-client") or ()],
    }))
"""


async def _run(*args: str, cwd: Path, timeout_s: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()  # by its PID
        await proc.wait()
        raise AssertionError(f"{args[:3]} did not finish in {timeout_s} s") from None
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.xdist_group("client-venv")
@pytest.mark.timeout(400)
async def test_pip_install_proto_and_client_into_a_fresh_venv(tmp_path: Path, sidecar: Sidecar) -> None:
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for part in ("proto", "client"):  # built from copies: nothing lands in the checkout
        shutil.copytree(ROOT / part, tmp_path / part, ignore=skip)
    venv = tmp_path / "venv"
    # no pip of its own (ensurepip is slow): this venv's pip installs into it with --python
    code, out = await _run(
        sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=tmp_path, timeout_s=60
    )
    assert code == 0, out
    python = str(venv / "bin" / "python")
    pip = (sys.executable, "-m", "pip", "--python", python)
    code, out = await _run(
        *pip, "install", "-q", "--no-input", "./proto", "./client", cwd=tmp_path, timeout_s=300
    )
    assert code == 0, out
    code, out = await _run(
        python, "-c", AGENT, sidecar.address, ",".join(SERVER_ONLY), cwd=tmp_path, timeout_s=60
    )
    assert code == 0, out
    got = json.loads(out.strip().splitlines()[-1])
    assert got["present"] == [], f"server-side modules in the client's venv: {got['present']}"
    assert got["tools"] == ["lookup_order"] and got["answer"].startswith("Simulated reply")
    assert {"outrider-contract", "outrider-client", "grpcio", "protobuf"} <= set(got["dists"])
    assert "outrider" not in got["dists"]
    # one copy of the generated code: the contract's; the client ships none
    assert got["contract_has_pb2"]
    assert not [f for f in got["client_files"] if f.startswith("outrider/")]
