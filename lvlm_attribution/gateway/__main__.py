"""python -m lvlm_attribution.gateway --torchserve-grpc 127.0.0.1:7070 \\
       --torchserve-rest http://127.0.0.1:8080 --management http://127.0.0.1:8081 \\
       --port 50051 --metrics-port 9095"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .server import GatewayConfig, serve
from .service import Limits


def parse_args(argv: list[str] | None = None) -> GatewayConfig:
    d, dl = GatewayConfig(), Limits()
    p = argparse.ArgumentParser(prog="python -m lvlm_attribution.gateway",
                                description="lvlm.v1.Explainer (typed gRPC, health, reflection) "
                                            "in front of TorchServe")
    p.add_argument("--torchserve-grpc", default=d.torchserve_grpc,
                   help="TorchServe's gRPC inference address (default: %(default)s)")
    p.add_argument("--torchserve-rest", default=d.torchserve_rest,
                   help="TorchServe's REST inference URL, for ExplainStream (default: %(default)s)")
    p.add_argument("--management", default=d.management,
                   help="TorchServe's management URL, for health (default: %(default)s)")
    p.add_argument("--model", default=d.model, help="TorchServe model name (default: %(default)s)")
    p.add_argument("--host", default=d.host, help="listen address (default: %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (default: %(default)s)")
    p.add_argument("--metrics-host", default=d.metrics_host,
                   help="metrics listen address (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help="Prometheus /metrics port, 0 = none (default: %(default)s)")
    p.add_argument("--health-interval-s", type=float, default=d.health_interval_s,
                   help="how often the model's workers are checked (default: %(default)s)")
    p.add_argument("--no-pid-check", dest="check_pid", action="store_false",
                   help="trust TorchServe's READY (only where its processes are invisible)")
    p.add_argument("--busy-retry-s", type=float, default=dl.busy_retry_s,
                   help="ask a busy refusal again for up to this long (default: %(default)s)")
    p.add_argument("--deadline-margin-ms", type=float, default=dl.deadline_margin_s * 1000,
                   help="kept back from the caller's deadline for the reply (default: "
                        "%(default)s)")
    p.add_argument("--upstream-timeout-s", type=float, default=dl.upstream_timeout_s,
                   help="upstream timeout when the caller sets no deadline (default: %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=dl.max_request_bytes,
                   help="largest ExplainRequest accepted; keep it below TorchServe's "
                        "max_request_size (default: %(default)s)")
    p.add_argument("--max-response-bytes", type=int, default=d.max_response_bytes,
                   help="largest response sent (default: %(default)s)")
    p.add_argument("--drain-delay-s", type=float, default=d.drain_delay_s,
                   help="after SIGTERM, keep accepting calls this long (default: %(default)s)")
    p.add_argument("--grace-s", type=float, default=d.grace_s,
                   help="then wait this long for calls in flight (default: %(default)s)")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(busy_retry_s=a.busy_retry_s, deadline_margin_s=a.deadline_margin_ms / 1000,
                    upstream_timeout_s=a.upstream_timeout_s,
                    max_request_bytes=a.max_request_bytes)
    return GatewayConfig(
        torchserve_grpc=a.torchserve_grpc, torchserve_rest=a.torchserve_rest,
        management=a.management, model=a.model, host=a.host, port=a.port,
        metrics_host=a.metrics_host, metrics_port=a.metrics_port,
        health_interval_s=a.health_interval_s, check_pid=a.check_pid,
        drain_delay_s=a.drain_delay_s, grace_s=a.grace_s,
        max_response_bytes=a.max_response_bytes, limits=limits)


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
