"""Wait until a gateway's grpc.health.v1 says SERVING (`make serve`, scripts, tests).

    python -m lvlm_attribution.gateway.probe 127.0.0.1:50051 [--service ""] [--wait-s 60]

Exit 0 once SERVING, 1 when it is not by --wait-s (the last status or error on stderr).
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def status(target: str, service: str = "", timeout: float = 2.0) -> str:
    """The health status name (SERVING, NOT_SERVING, ...); raises grpc.RpcError."""
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(target: str, service: str = "", wait_s: float = 60.0) -> tuple[bool, str]:
    """(True, "SERVING") as soon as it is; (False, last status or error) after `wait_s`."""
    deadline = time.monotonic() + wait_s
    last = "no answer"
    while True:
        try:
            last = status(target, service)
        except grpc.RpcError as err:
            last = f"{err.code().name}: {err.details()}"
        if last == "SERVING":
            return True, last
        if time.monotonic() >= deadline:
            return False, last
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port of the gateway")
    parser.add_argument("--service", default="", help='health service name (default: "")')
    parser.add_argument("--wait-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    ok, last = wait_serving(args.target, args.service, args.wait_s)
    if not ok:
        print(f"{args.target}: not SERVING after {args.wait_s:g} s ({last})", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
