"""What the gateway asks the handler (a "describe" item -> DescribeResponse), the light health
module the gateway and the probes share, and the client's URL schemes."""

from __future__ import annotations

import subprocess
import sys

from lvlm_attribution.api.v1 import explainer_pb2 as api
from lvlm_attribution.client import ExplainerClient, GrpcClient, connect
from lvlm_attribution.methods.registry import get_method
from lvlm_attribution.service import ExplainService, ServiceConfig


def test_a_describe_item_is_answered_with_a_describe_response(embedded_explainer) -> None:
    config = ServiceConfig(allowed_methods=("glimpse", "dexar", "igos"),
                           method_limits={"igos": {"iterations": 10}})
    service = ExplainService(embedded_explainer, config)
    call = service.call({"describe": b""}, transport="grpc")
    (reply,) = list(call.replies())
    assert reply.final and reply.content_type == "application/x-protobuf"
    assert call.observations == []  # not a request: no outcome, no latency sample
    msg = api.DescribeResponse.FromString(reply.body)
    assert (msg.model.name, msg.model.version) == (embedded_explainer.model_name,
                                                   embedded_explainer.model_version)
    assert [m.name for m in msg.methods] == ["glimpse", "dexar", "igos"]
    assert list(msg.default_methods) == ["glimpse", "dexar"]
    igos = next(m for m in msg.methods if m.name == "igos")
    assert igos.cost_limits["iterations"] == 10  # the deployment's override wins
    assert igos.cost_limits["ig_iter"] == get_method("igos").limits["ig_iter"]
    assert dict(igos.default_settings) == {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in embedded_explainer.default_settings("igos").items()}
    assert not igos.is_default and igos.summary
    assert msg.limits.max_image_bytes == config.max_image_bytes
    assert msg.limits.request_deadline_s == config.request_deadline_s
    assert msg.limits.max_request_bytes == 0  # the gateway fills in its own receive limit


def test_health_module_stays_light() -> None:
    """The probes run every few seconds: importing the shared health check must not pull in the
    engine, numpy, protobuf or gRPC."""
    code = ("import sys, lvlm_attribution.health; heavy = [m for m in ('torch', 'numpy', "
            "'grpc', 'google.protobuf', 'PIL', 'yaml') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_connect_schemes() -> None:
    with connect("grpc://127.0.0.1:1") as typed:
        assert isinstance(typed, ExplainerClient)
    with connect("torchserve-grpc://127.0.0.1:1", model="m") as raw:
        assert isinstance(raw, GrpcClient) and raw.model == "m"
