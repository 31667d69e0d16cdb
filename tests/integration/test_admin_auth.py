"""The admin API lets nobody in without a credential, and each role only as far as it goes.

A real collector on the embedded broker, real gRPC: every `outrider.v1.Admin` method with no
credential, a wrong one, the wrong role and the right one, for empty, valid and malformed
requests; mTLS with the role from the certificate's OU or SAN URI; the CLI's token sources.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from collector import Collector
from devstack.broker import EmbeddedBroker
from outrider.v1 import admin_pb2, admin_pb2_grpc, registry_pb2
from tests.integration.test_collector_service import settings_for, spec_yaml, versions_reported
from tests.support import ADMIN_TOKEN, VIEWER_TOKEN, admin_channel, bearer

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("StartRollout", "GetRollout", "AbortRollout", "PushVersion", "ListVersions")
REQUESTS = {
    "StartRollout": admin_pb2.StartRolloutRequest(spec_yaml="agent: x", source_name="r.yaml"),
    "GetRollout": admin_pb2.GetRolloutRequest(agent="support-bot"),
    "AbortRollout": admin_pb2.AbortRolloutRequest(agent="support-bot"),
    "PushVersion": registry_pb2.PushVersionRequest(agent="support-bot", canonical_json="{}"),
    "ListVersions": registry_pb2.ListVersionsRequest(agent="support-bot"),
}
MALFORMED = b"\xff\xff\xff\xff"


async def raw_call(
    channel: grpc.aio.Channel, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.StatusCode:
    call = channel.unary_unary(f"/outrider.v1.Admin/{method}")
    try:
        await call(payload, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", METHODS)
async def test_unauthenticated_for_every_admin_method_and_request(
    broker: EmbeddedBroker, method: str
) -> None:
    async with (
        Collector(settings_for(broker)) as collector,
        admin_channel(collector.admin_address, None) as ch,
    ):
        for payload in (b"", REQUESTS[method].SerializeToString(), MALFORMED):
            assert await raw_call(ch, method, payload) == grpc.StatusCode.UNAUTHENTICATED, payload
            wrong = bearer("not-a-token")
            assert await raw_call(ch, method, payload, wrong) == grpc.StatusCode.UNAUTHENTICATED
            basic = (("authorization", "Basic dXNlcjpwYXNz"),)
            assert await raw_call(ch, method, payload, basic) == grpc.StatusCode.UNAUTHENTICATED
        # viewer: reads pass authentication, writes are denied, before any validation
        viewer = bearer(VIEWER_TOKEN)
        for payload in (b"", MALFORMED):
            code = await raw_call(ch, method, payload, viewer)
            if method in ("GetRollout", "ListVersions"):
                assert code == grpc.StatusCode.INVALID_ARGUMENT
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED
        # operator: in, and then the request is judged
        assert await raw_call(ch, method, MALFORMED, bearer(ADMIN_TOKEN)) == grpc.StatusCode.INVALID_ARGUMENT
        assert await raw_call(ch, method, b"", bearer(ADMIN_TOKEN)) == grpc.StatusCode.INVALID_ARGUMENT


async def test_unauthenticated_when_no_credentials_are_configured_and_no_reflection(
    broker: EmbeddedBroker,
) -> None:
    settings = settings_for(broker, admin_tokens_file=None)
    async with Collector(settings) as collector, admin_channel(collector.admin_address) as ch:
        for method in METHODS:
            assert await raw_call(ch, method, b"", bearer()) == grpc.StatusCode.UNAUTHENTICATED
        reflection = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            call = reflection(iter([b""]))
            await call.read()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_roles_and_decided_by_is_the_caller(broker: EmbeddedBroker) -> None:
    async with Collector(settings_for(broker, admin_reflection=True)) as collector:
        async with admin_channel(collector.admin_address, VIEWER_TOKEN) as viewer_ch:
            viewer = admin_pb2_grpc.AdminStub(viewer_ch)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await viewer.StartRollout(admin_pb2.StartRolloutRequest(spec_yaml=spec_yaml()))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "watcher" in (denied.value.details() or "")
        await versions_reported(broker, collector)
        async with admin_channel(collector.admin_address) as operator_ch:
            operator = admin_pb2_grpc.AdminStub(operator_ch)
            started = await operator.StartRollout(
                admin_pb2.StartRolloutRequest(spec_yaml=spec_yaml(min_duration="10m"), requested_by="mallory")
            )
            assert started.state.decided_by == "token:ci"
        async with admin_channel(collector.admin_address, VIEWER_TOKEN) as viewer_ch:
            status = await admin_pb2_grpc.AdminStub(viewer_ch).GetRollout(
                admin_pb2.GetRolloutRequest(agent="support-bot")
            )
            assert status.state.generation == 1
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await admin_pb2_grpc.AdminStub(viewer_ch).AbortRollout(
                    admin_pb2.AbortRolloutRequest(agent="support-bot")
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- mTLS -------------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: list[x509.NameAttribute],
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    name = x509.Name(subject)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0] if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write_pki(directory: Path) -> dict[str, Path]:
    import ipaddress

    ca_key = _key()
    ca_name = [x509.NameAttribute(NameOID.COMMON_NAME, "outrider test CA")]
    ca = _cert(ca_name, ca_key, None, ca=True)
    issuer = (ca.subject, ca_key)
    files: dict[str, Path] = {}

    def write(label: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        files[f"{label}.crt"] = directory / f"{label}.crt"
        files[f"{label}.key"] = directory / f"{label}.key"
        files[f"{label}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{label}.key"].write_bytes(_pem(key))

    files["ca.crt"] = directory / "ca.crt"
    files["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_key = _key()
    write(
        "server",
        _cert(
            [x509.NameAttribute(NameOID.COMMON_NAME, "collector")],
            server_key,
            issuer,
            sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ),
        server_key,
    )
    for label, attrs, sans in (
        (
            "ou-operator",
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "operator"),
            ],
            None,
        ),
        (
            "uri-viewer",
            [x509.NameAttribute(NameOID.COMMON_NAME, "grafana")],
            [x509.UniformResourceIdentifier("outrider://role/viewer")],
        ),
        ("no-role", [x509.NameAttribute(NameOID.COMMON_NAME, "nobody")], None),
    ):
        key = _key()
        write(label, _cert(attrs, key, issuer, sans=sans), key)
    return files


async def test_mtls_role_from_ou_or_san_uri_and_unauthenticated_without_a_role(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    pki = _write_pki(tmp_path)
    settings = settings_for(
        broker,
        admin_tls_cert=pki["server.crt"],
        admin_tls_key=pki["server.key"],
        admin_tls_client_ca=pki["ca.crt"],
    )
    async with Collector(settings) as collector:
        port = collector.admin_address.rpartition(":")[2]

        def channel(label: str) -> grpc.aio.Channel:
            creds = grpc.ssl_channel_credentials(
                pki["ca.crt"].read_bytes(), pki[f"{label}.key"].read_bytes(), pki[f"{label}.crt"].read_bytes()
            )
            return grpc.aio.secure_channel(f"localhost:{port}", creds)

        await versions_reported(broker, collector)
        async with channel("ou-operator") as ch:
            started = await admin_pb2_grpc.AdminStub(ch).StartRollout(
                admin_pb2.StartRolloutRequest(spec_yaml=spec_yaml(min_duration="10m"), requested_by="x")
            )
            assert started.state.decided_by == "cert:alice"
        async with channel("uri-viewer") as ch:
            stub = admin_pb2_grpc.AdminStub(ch)
            assert (
                await stub.GetRollout(admin_pb2.GetRolloutRequest(agent="support-bot"))
            ).state.generation == 1
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.AbortRollout(admin_pb2.AbortRolloutRequest(agent="support-bot"))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        async with channel("no-role") as ch:
            for method in METHODS:
                assert await raw_call(ch, method, b"") == grpc.StatusCode.UNAUTHENTICATED
            # a bearer token still works over the mTLS connection
            assert (
                await raw_call(ch, "GetRollout", b"", bearer(VIEWER_TOKEN))
                == grpc.StatusCode.INVALID_ARGUMENT
            )


# -- the CLI ----------------------------------------------------------------------------------


async def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI in a thread: the collector it calls runs on this test's event loop."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_ADMIN")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "devstack", *args],
        cwd=cwd,
        env={**base, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_unauthenticated_without_a_token_then_env_file_and_dev_token(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with Collector(settings_for(broker)) as collector:
        admin = collector.admin_address
        spec = tmp_path / "rollout.yaml"
        spec.write_text(spec_yaml(min_duration="10m"))
        run = await _cli("rollout", "status", "support-bot", "--admin", admin, cwd=tmp_path, env={})
        assert run.returncode == 5 and "UNAUTHENTICATED" in run.stderr  # 5: the collector refused, run.stderr
        run = await _cli(
            "rollout", "status", "support-bot", "--admin", admin, cwd=tmp_path,
            env={"OUTRIDER_ADMIN_TOKEN": VIEWER_TOKEN},
        )  # fmt: skip
        assert run.returncode == 5 and "NOT_FOUND" in run.stderr, run.stderr
        run = await _cli(
            "rollout", "start", str(spec), "--admin", admin, cwd=tmp_path,
            env={"OUTRIDER_ADMIN_TOKEN": VIEWER_TOKEN},
        )  # fmt: skip
        assert run.returncode == 5 and "PERMISSION_DENIED" in run.stderr, run.stderr
        await versions_reported(broker, collector)
        token_file = tmp_path / "token"
        token_file.write_text(ADMIN_TOKEN + "\n")
        args = ("rollout", "start", str(spec), "--admin", admin, "--token-file", str(token_file), "--json")
        run = await _cli(*args, cwd=tmp_path, env={})
        assert run.returncode == 0, run.stderr
        assert yaml.safe_load(run.stdout)["state"]["decided_by"] == "token:ci"
        # the file `outrider dev` writes is found without flags
        (tmp_path / ".outrider" / "dev").mkdir(parents=True)
        (tmp_path / ".outrider" / "dev" / "admin-token").write_text(ADMIN_TOKEN)
        run = await _cli("rollout", "abort", "support-bot", "--admin", admin, "--json", cwd=tmp_path, env={})
        assert run.returncode == 0, run.stderr
        assert yaml.safe_load(run.stdout)["state"]["decided_by"] == "token:ci"
