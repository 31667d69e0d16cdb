#!/usr/bin/env python3
"""Exit 0 when a gRPC server reports SERVING through the standard grpc.health.v1 service.

Installed in the image as `outrider-health`. It exists for probes that cannot reach the
server from outside: the injected sidecar listens on 127.0.0.1 (or a unix socket), which the
kubelet's own gRPC probe (it dials the pod IP) and Docker's healthcheck cannot see.

    outrider-health [ADDRESS] [--service NAME] [--timeout SECONDS]

ADDRESS is host:port or unix:///path (default 127.0.0.1:50051); the empty service name asks
about the server as a whole.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}", file=sys.stderr)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="outrider-health", description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help="service name to ask about ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds before giving up")
    args = parser.parse_args(argv)
    return check(args.address, args.service, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
