"""The TorchServe handler without a server: TorchServe's own Context and metrics cache, the
service core and the real embedded model. Covers what a CPU server cannot show (out of memory)
and TorchServe batches with their per-item statuses."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
from test_service_core import CFG, SCENE, Failing, request, scene_request
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.utils.util import PredictionException

from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.service import ExplainService

REPO = Path(__file__).resolve().parents[1]
HANDLER_PATH = REPO / "handlers" / "lvlm_handler.py"


def load_handler_module():
    spec = importlib.util.spec_from_file_location("lvlm_handler", HANDLER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


handler_module = load_handler_module()


def make_context(*headers: dict) -> Context:
    """TorchServe's Context for a batch with one header dict per item."""
    metrics = MetricsCacheYamlImpl(str(REPO / "deploy" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "lvlm"
    ctx = Context("lvlm", str(REPO), {}, 1, None, "0.12.0", metrics=metrics,
                  model_yaml_config={"handler": {}})
    ctx.request_ids = {i: f"req-{i}" for i in range(len(headers))}
    ctx.request_processor = [RequestProcessor(dict(h)) for h in headers]
    return ctx


GRPC_HEADERS = {"request": {"content-type": ""}}
REST_HEADERS = {"body": {"content-type": "application/json"}, "Host": "127.0.0.1:8080",
                "Content-Type": "application/json", "explain": "False"}


@pytest.fixture(scope="module")
def engine(embedded_explainer):
    return embedded_explainer


def make_handler(engine):
    h = handler_module.LVLMHandler()
    h.service = ExplainService(engine, CFG)
    return h


def metric_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]


def test_grpc_request_answers_protobuf_and_counts_grpc(engine, caplog) -> None:
    caplog.set_level(logging.INFO)
    ctx = make_context(GRPC_HEADERS)
    out = make_handler(engine).handle([{"request": bytearray(request().SerializeToString())}], ctx)
    assert pb.ExplainResponse.FromString(out[0]).answer == SCENE.answer
    lines = metric_lines(caplog)
    assert any("lvlm_requests_total" in line and "outcome:ok" in line and "transport:grpc" in line
               and "ModelName:lvlm" in line for line in lines), lines
    assert any("lvlm_stage_latency_seconds" in line and "stage:attribute" in line
               and "method:glimpse" in line for line in lines)


def test_rest_json_answers_json_and_counts_rest(engine, caplog) -> None:
    from google.protobuf import json_format

    caplog.set_level(logging.INFO)
    ctx = make_context(REST_HEADERS)
    out = make_handler(engine).handle([{"body": json_format.MessageToDict(request())}], ctx)
    assert out[0].startswith(b"{")
    assert ctx.get_response_content_type(0) == "application/json"
    assert any("transport:rest" in line for line in metric_lines(caplog))


def test_invalid_input_raises_prediction_exception_400(engine, caplog) -> None:
    caplog.set_level(logging.INFO)
    ctx = make_context(GRPC_HEADERS)
    with pytest.raises(PredictionException) as info:
        make_handler(engine).handle([{"request": request(question="").SerializeToString()}], ctx)
    assert info.value.error_code == 400 and "question" in info.value.message
    assert any("outcome:invalid_input" in line for line in metric_lines(caplog))


def test_out_of_memory_is_413_and_the_handler_keeps_serving(engine, caplog) -> None:
    caplog.set_level(logging.INFO)
    failing = Failing(engine, MemoryError())
    handler = make_handler(failing)
    ctx = make_context(GRPC_HEADERS)
    with pytest.raises(PredictionException) as info:
        handler.handle([{"request": request().SerializeToString()}], ctx)
    assert info.value.error_code == 413  # TorchServe: HTTP 413, gRPC RESOURCE_EXHAUSTED
    assert any("outcome:out_of_memory" in line for line in metric_lines(caplog))
    failing.fail = None
    out = handler.handle([{"request": request().SerializeToString()}], make_context(GRPC_HEADERS))
    assert pb.ExplainResponse.FromString(out[0]).answer == SCENE.answer


def test_rest_streaming_sends_the_answer_as_an_intermediate_response(engine, monkeypatch) -> None:
    from google.protobuf import json_format

    sent = []
    monkeypatch.setattr(handler_module, "send_intermediate_predict_response",
                        lambda ret, ids, msg, code, ctx: sent.append(([ret[i] for i in ids], code)))
    ctx = make_context(REST_HEADERS)
    body = json_format.MessageToDict(request(stream=True))
    out = make_handler(engine).handle([{"body": body}], ctx)
    assert len(sent) == 1 and sent[0][1] == 200
    first = json_format.Parse(sent[0][0][0], pb.ExplainResponse())  # {idx: body}
    last = json_format.Parse(out[0], pb.ExplainResponse())
    assert first.part == pb.ExplainResponse.PART_ANSWER and not first.heatmaps
    assert last.part == pb.ExplainResponse.PART_COMPLETE and last.heatmaps
    assert not last.warnings


def test_grpc_never_streams_and_always_completes_the_stream(engine, monkeypatch) -> None:
    """Unary Predictions and StreamPredictions look the same to the handler: one message, marked
    as the last (TorchServe would otherwise kill or wedge the worker)."""
    sent = []
    monkeypatch.setattr(handler_module, "send_intermediate_predict_response",
                        lambda *args: sent.append(args))
    for stream in (True, False):
        ctx = make_context(GRPC_HEADERS)
        out = make_handler(engine).handle([{"request": request(stream=stream).SerializeToString()}],
                                    ctx)
        resp = pb.ExplainResponse.FromString(out[0])
        assert not sent and resp.heatmaps
        assert ctx.get_response_headers(0).get("ts_stream_next") == "false"
        assert ("cannot stream" in "".join(resp.warnings)) == stream


def test_a_batch_gets_one_reply_per_item_and_a_bad_item_its_own_status(engine) -> None:
    """TorchServe's batch of four (REST and gRPC mixed): good items are answered, the REST item
    with a bad question gets 400 and TorchServe's error JSON, the gRPC one a PART_ERROR body."""
    from google.protobuf import json_format

    ctx = make_context(GRPC_HEADERS, REST_HEADERS, REST_HEADERS, GRPC_HEADERS)
    data = [{"request": scene_request(0).SerializeToString()},
            {"body": json_format.MessageToDict(request(question=""))},
            {"body": json_format.MessageToDict(scene_request(1))},
            {"request": request(question="").SerializeToString()}]
    out = make_handler(engine).handle(data, ctx)
    assert len(out) == 4
    assert pb.ExplainResponse.FromString(out[0]).heatmaps
    assert ctx.get_response_status(1)[0] == 400
    assert json.loads(out[1])["message"].startswith("question:")
    assert json_format.Parse(out[2], pb.ExplainResponse()).heatmaps
    assert ctx.get_response_status(2)[0] == 200
    err = pb.ExplainResponse.FromString(out[3])
    assert err.part == pb.ExplainResponse.PART_ERROR and err.error.http_status == 400


def test_handler_is_thin() -> None:
    source = HANDLER_PATH.read_text()
    assert len(source.splitlines()) <= 150
    assert source.count("\nclass ") == 1  # TorchServe loads only a module with one class
    for name in ("glimpse", "dexar", "igos", "rollout", "gradcam", "tmme", "attngrad"):
        assert name not in source.lower(), name
