"""The gateway in the rendered Kubernetes overlays: a second container of the pod (same image),
native gRPC probes on its health service, the typed API in the Service and the NetworkPolicy,
its metrics scraped, TorchServe's raw gRPC off the pod network, grace periods that fit."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ["cpu-dev", "gpu", "gpu-gke", "gpu-eks", "gpu-prometheus-adapter"]
API_PORT, METRICS_PORT = 50051, 9095


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not on PATH (tests/test_deploy.py fails with the reason)")
    sys.path.insert(0, str(ROOT / "deploy" / "scripts"))
    import k8s_validate

    return k8s_validate.render(ROOT / "k8s" / "overlays" / overlay, "kubectl")


def arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_container(overlay: str) -> None:
    docs = render(overlay)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    gw, ts = containers["gateway"], containers["torchserve"]
    assert gw["image"] == ts["image"]  # same image, no second build
    assert gw["command"] == ["python", "-m", "lvlm_attribution.gateway"]
    args = gw["args"]
    assert arg(args, "--torchserve-grpc") == "127.0.0.1:7070"
    assert arg(args, "--management") == "http://127.0.0.1:8081"
    assert int(arg(args, "--port")) == API_PORT and int(arg(args, "--metrics-port")) == METRICS_PORT
    # its health checks the worker's pid: it must see TorchServe's processes
    assert pod["shareProcessNamespace"] is True
    assert gw["readinessProbe"]["grpc"] == {"port": API_PORT}
    assert gw["readinessProbe"]["failureThreshold"] == 1
    assert gw["livenessProbe"]["grpc"] == {"port": API_PORT, "service": "liveness"}
    # drain delay + grace inside the pod's termination grace period
    shutdown = float(arg(args, "--drain-delay-s")) + float(arg(args, "--grace-s"))
    assert shutdown + 5 <= pod["terminationGracePeriodSeconds"]
    assert {p["name"]: p["containerPort"] for p in gw["ports"]} == {
        "grpc-api": API_PORT, "gw-metrics": METRICS_PORT}

    service = next(d for d in docs if d["kind"] == "Service")
    api = next(p for p in service["spec"]["ports"] if p["port"] == API_PORT)
    assert api["targetPort"] == "grpc-api" and api["appProtocol"] == "kubernetes.io/h2c"
    assert 7070 not in {p["port"] for p in service["spec"]["ports"]}

    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert {"grpc-api", "gw-metrics"} <= open_ports and "grpc" not in open_ports

    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    for monitor in monitors:
        assert "gw-metrics" in {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}


def test_pod_config_keeps_raw_grpc_on_loopback() -> None:
    props = dict(line.split("=", 1) for line in
                 (ROOT / "k8s" / "base" / "config.properties").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert props["grpc_inference_address"] == "127.0.0.1"
