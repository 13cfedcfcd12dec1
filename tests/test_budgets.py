"""Budgets instead of deaths: the serving core with the real embedded model (no TorchServe).

Every request that would hold the only worker too long, produce a frame TorchServe cannot send,
or push a method past its cost limits ends with a clear error naming the field and the limit, and
the next request is served normally.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.deadline import Deadline, DeadlineExceeded
from lvlm_attribution.methods.registry import SettingError, get_method, list_methods
from lvlm_attribution.service import ExplainService, ServiceConfig
from lvlm_attribution.service.errors import (
    DeadlineExceeded as ServiceDeadlineExceeded,
)
from lvlm_attribution.service.errors import (
    InvalidRequest,
    ResponseTooLarge,
)
from lvlm_attribution.service.inflight import InflightJournal
from lvlm_attribution.world.scenes import generate

SCENE = generate(3, "color")


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def request(**fields) -> pb.ExplainRequest:
    fields.setdefault("image", png(SCENE.image))
    fields.setdefault("question", SCENE.question)
    fields.setdefault("methods", ["dexar"])
    return pb.ExplainRequest(**fields)


def serve(service: ExplainService, req: pb.ExplainRequest, transport: str = "grpc",
          can_stream: bool = True):
    call = service.call({"request": req.SerializeToString()}, transport, can_stream=can_stream)
    return call, [pb.ExplainResponse.FromString(r.body) for r in call.replies()]


@pytest.fixture(scope="module")
def service(embedded_explainer) -> ExplainService:
    return ExplainService(embedded_explainer, ServiceConfig())


def outcome(call) -> str:
    return next(o.labels["outcome"] for o in call.observations if o.name == "lvlm_requests_total")


def test_ordinary_request_still_answers(service) -> None:
    call, [resp] = serve(service, request())
    assert resp.answer == SCENE.answer and outcome(call) == "ok"


# ---- method settings: types, finiteness and cost limits, before any model work -----------------
@pytest.mark.parametrize(("settings", "field", "message"), [
    ({"igos": {"iterations": 60}}, "method_settings.igos.iterations", "exceeds the limit of 20"),
    ({"igos": {"ig_iter": 10_000}}, "method_settings.igos.ig_iter", "exceeds the limit of 32"),
    ({"igos": {"mask_size": 4096}}, "method_settings.igos.mask_size", "exceeds the limit"),
    ({"igos": {"batch_size": 999}}, "method_settings.igos.batch_size", "exceeds the limit"),
    ({"igos": {"iterations": "5"}}, "method_settings.igos.iterations", "expected an integer"),
    ({"igos": {"iterations": 2.5}}, "method_settings.igos.iterations", "expected an integer"),
    ({"igos": {"gnc": 1}}, "method_settings.igos.gnc", "expected true/false"),
    ({"igos": {"lr": {"a": 1}}}, "method_settings.igos.lr", "expected a number, got an object"),
    ({"glimpse": {"token_chunk": 10**6}}, "method_settings.glimpse.token_chunk", "limit of 64"),
    ({"glimpse": {"tau": "hot"}}, "method_settings.glimpse.tau", "expected a number"),
    ({"dexar": {"last_k_layers": [1]}}, "method_settings.dexar.last_k_layers", "a list"),
    ({"dexar": {"normalization": "nope"}}, "method_settings.dexar.normalization", "paper"),
])
def test_method_settings_are_checked_before_generation(service, settings, field,
                                                       message) -> None:
    req = request(methods=list(settings))
    for name, values in settings.items():
        req.method_settings[name].update(values)
    started = time.perf_counter()
    with pytest.raises(InvalidRequest) as info:
        serve(service, req)
    assert info.value.field == field and message in info.value.message, info.value.message
    assert "0x" not in info.value.message and "'>'" not in info.value.message
    assert time.perf_counter() - started < 1.0  # refused before any forward pass


def test_every_registered_cost_limit_is_a_real_setting_and_enforced() -> None:
    for name in list_methods():
        spec = get_method(name)
        for key, limit in spec.limits.items():
            spec.make_config({key: int(limit)})  # the limit itself is allowed
            with pytest.raises(SettingError, match="exceeds the limit"):
                spec.make_config({key: int(limit) + 1})


def test_a_deployment_can_tighten_a_limit(embedded_explainer) -> None:
    tight = ExplainService(embedded_explainer,
                           ServiceConfig(method_limits={"igos": {"iterations": 2}}))
    req = request(methods=["igos"])
    req.method_settings["igos"].update({"iterations": 3})
    with pytest.raises(InvalidRequest, match="3 exceeds the limit of 2"):
        serve(tight, req)


def test_settings_that_make_a_map_non_finite_are_the_callers_400(service) -> None:
    req = request(methods=["glimpse"])
    req.method_settings["glimpse"].update({"tau": 1e-300})
    try:
        _, [resp] = serve(service, req)
    except InvalidRequest as err:  # NaN/inf maps are refused, naming the method's settings
        assert err.field == "method_settings.glimpse" and "non-finite" in err.message
    else:  # or the method copes: then the map must be finite
        assert resp.heatmaps[0].max_value == resp.heatmaps[0].max_value


# ---- deadlines ----------------------------------------------------------------------------------
def test_deadline_stops_a_long_request_and_the_next_one_is_served(service) -> None:
    slow = request(methods=["igos"], timeout_ms=1500)
    slow.method_settings["igos"].update({"iterations": 20})  # ~4 s on an idle 2-core CPU
    started = time.perf_counter()
    with pytest.raises(ServiceDeadlineExceeded) as info:
        call, _ = serve(service, slow)
    elapsed = time.perf_counter() - started
    assert info.value.status == 504 and info.value.grpc_code == "DEADLINE_EXCEEDED"
    assert "deadline is 1.5 s" in info.value.message and "at stage" in info.value.message
    assert elapsed < 4.0, elapsed  # stopped at the next layer forward, not at the end
    _, [resp] = serve(service, request())
    assert resp.answer == SCENE.answer


def test_server_deadline_caps_the_callers_timeout(embedded_explainer) -> None:
    strict = ExplainService(embedded_explainer, ServiceConfig(request_deadline_s=0.05))
    slow = request(methods=["igos"], timeout_ms=600_000)
    with pytest.raises(ServiceDeadlineExceeded, match="deadline is 0.05 s"):
        serve(strict, slow)


def test_deadline_hooks_are_always_removed(embedded_explainer) -> None:
    layers = embedded_explainer.adapter.decoder_layers()
    deadline = Deadline(1e-9)
    time.sleep(0.001)
    with pytest.raises(DeadlineExceeded):
        embedded_explainer.generate(Image.fromarray(SCENE.image), SCENE.question, 4,
                                    deadline=deadline)
    assert all(not layer._forward_pre_hooks for layer in layers)


def test_config_refuses_a_deadline_that_outlives_the_server_timeout() -> None:
    with pytest.raises(ValueError, match="80% of responseTimeout"):
        ServiceConfig(request_deadline_s=110).check_server_limits(120)
    ServiceConfig(request_deadline_s=60).check_server_limits(120)


# ---- response size ------------------------------------------------------------------------------
def test_response_over_the_size_budget_names_the_option(embedded_explainer) -> None:
    small = ExplainService(embedded_explainer, ServiceConfig(max_response_bytes=20_000))
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    req = request(image=png(noise), heatmaps=pb.HeatmapOptions(overlay=True))
    with pytest.raises(ResponseTooLarge) as info:
        serve(small, req)
    assert info.value.status == 400 and info.value.field == "heatmaps.overlay"
    assert "over the limit of 20,000 bytes; ask without heatmaps.overlay" in info.value.message
    _, [resp] = serve(small, request())
    assert resp.answer == SCENE.answer


def test_overlay_resolution_is_capped(service) -> None:
    big = np.asarray(Image.fromarray(SCENE.image).resize((2000, 1500), Image.NEAREST))
    _, [resp] = serve(service, request(image=png(big), heatmaps=pb.HeatmapOptions(overlay=True)))
    overlay = Image.open(io.BytesIO(resp.heatmaps[0].overlay_png))
    assert max(overlay.size) <= ServiceConfig().max_overlay_side


# ---- answers and questions ---------------------------------------------------------------------
def test_long_audit_answer_is_refused_by_token_count(embedded_explainer) -> None:
    service = ExplainService(embedded_explainer, ServiceConfig(max_answer_tokens=8))
    with pytest.raises(InvalidRequest, match="answer: .* tokens exceeds the limit of 8"):
        serve(service, request(answer=" ".join(["the circle is blue"] * 10)))


@pytest.mark.parametrize("field", ["question", "answer"])
def test_special_tokens_cannot_be_smuggled_in(service, field) -> None:
    with pytest.raises(InvalidRequest, match=f"{field}: contains the model's special token"):
        serve(service, request(**{field: "what <image> is the circle ?"}))


# ---- streaming ----------------------------------------------------------------------------------
def test_transport_that_cannot_stream_answers_once_with_a_warning(service) -> None:
    _, replies = serve(service, request(stream=True), can_stream=False)
    assert len(replies) == 1 and replies[0].heatmaps
    assert replies[0].part == pb.ExplainResponse.PART_COMPLETE
    assert "cannot stream" in replies[0].warnings[0]


def test_failure_after_the_streamed_answer_is_the_streams_last_message(embedded_explainer) -> None:
    small = ExplainService(embedded_explainer, ServiceConfig(max_response_bytes=2_000))
    noise = np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    req = request(image=png(noise), heatmaps=pb.HeatmapOptions(overlay=True), stream=True,
                  request_id="s1")
    call, replies = serve(small, req)
    assert [r.part for r in replies] == [pb.ExplainResponse.PART_ANSWER,
                                         pb.ExplainResponse.PART_ERROR]
    err = replies[1].error
    assert (err.http_status, err.grpc_code, err.field) == (400, "INVALID_ARGUMENT",
                                                           "heatmaps.overlay")
    assert replies[1].request_id == "s1" and outcome(call) == "response_too_large"


# ---- requests whose worker died are counted by the next worker ----------------------------------
def test_inflight_journal_counts_a_dead_workers_request_once(tmp_path, embedded_explainer) -> None:
    code = ("import sys, os; from lvlm_attribution.service.inflight import InflightJournal;"
            "InflightJournal(sys.argv[1]).begin('rest'); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   env={**os.environ, "PYTHONPATH": os.getcwd()})
    alive = InflightJournal(tmp_path).begin("grpc")  # our own in-flight request: not dead
    first = ExplainService(embedded_explainer, ServiceConfig(), InflightJournal(tmp_path))
    second = ExplainService(embedded_explainer, ServiceConfig(), InflightJournal(tmp_path))
    counted = first.recovered_observations() + second.recovered_observations()
    assert [(o.name, o.labels) for o in counted] == [
        ("lvlm_requests_total", {"outcome": "worker_died", "transport": "rest"})]
    assert alive is not None and alive.exists()


def test_every_call_is_journaled_while_in_flight_only(tmp_path, embedded_explainer) -> None:
    journal = InflightJournal(tmp_path)
    service = ExplainService(embedded_explainer, ServiceConfig(), journal)
    seen = []
    calls = [service.call({"request": request(stream=True).SerializeToString()}, "rest"),
             service.call({"request": request(stream=True).SerializeToString()}, "grpc",
                          can_stream=False)]
    service.serve(calls, lambda call, reply: seen.append(len(list(tmp_path.glob("inflight-*")))))
    assert seen == [2] and not list(tmp_path.glob("inflight-*"))  # grpc cannot stream
    assert all(c.final is not None and c.outcome == "ok" for c in calls)
    with pytest.raises(InvalidRequest):
        list(service.call({"request": request(question="").SerializeToString()},
                          "rest").replies())
    assert not list(tmp_path.glob("inflight-*"))


def test_error_part_is_valid_json_too(embedded_explainer) -> None:
    small = ExplainService(embedded_explainer, ServiceConfig(max_response_bytes=2_000))
    noise = np.random.default_rng(2).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    req = request(image=png(noise), heatmaps=pb.HeatmapOptions(overlay=True), stream=True)
    call = small.call({"body": json_format.MessageToDict(req)}, "rest")
    bodies = [json.loads(r.body) for r in call.replies()]
    assert bodies[-1]["part"] == "PART_ERROR" and bodies[-1]["error"]["httpStatus"] == 400
