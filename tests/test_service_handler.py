"""The TorchServe handler without a server: TorchServe's own Context and metrics cache, the
service core with a stand-in engine. Covers what a CPU server cannot show (out of memory)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
from test_service_core import CFG, StandInEngine, request
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


def make_context(headers: dict) -> Context:
    metrics = MetricsCacheYamlImpl(str(REPO / "deploy" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "lvlm"
    ctx = Context("lvlm", str(REPO), {}, 1, None, "0.12.0", metrics=metrics,
                  model_yaml_config={"handler": {}})
    ctx.request_ids = {0: "req-0"}
    ctx.request_processor = [RequestProcessor(headers)]
    return ctx


GRPC_HEADERS = {"request": {"content-type": ""}}
REST_HEADERS = {"body": {"content-type": "application/json"}, "Host": "127.0.0.1:8080",
                "Content-Type": "application/json", "explain": "False"}


def make_handler(engine=None):
    h = handler_module.LVLMHandler()
    h.service = ExplainService(engine or StandInEngine(), CFG)
    return h


def metric_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]


def test_grpc_request_answers_protobuf_and_counts_grpc(caplog) -> None:
    caplog.set_level(logging.INFO)
    ctx = make_context(GRPC_HEADERS)
    out = make_handler().handle([{"request": bytearray(request().SerializeToString())}], ctx)
    assert pb.ExplainResponse.FromString(out[0]).answer == "red"
    lines = metric_lines(caplog)
    assert any("lvlm_requests_total" in line and "outcome:ok" in line and "transport:grpc" in line
               and "ModelName:lvlm" in line for line in lines), lines
    assert any("lvlm_stage_latency_seconds" in line and "stage:attribute" in line
               and "method:glimpse" in line for line in lines)


def test_rest_json_answers_json_and_counts_rest(caplog) -> None:
    from google.protobuf import json_format

    caplog.set_level(logging.INFO)
    ctx = make_context(REST_HEADERS)
    out = make_handler().handle([{"body": json_format.MessageToDict(request())}], ctx)
    assert out[0].startswith(b"{")
    assert ctx.get_response_content_type(0) == "application/json"
    assert any("transport:rest" in line for line in metric_lines(caplog))


def test_invalid_input_raises_prediction_exception_400(caplog) -> None:
    caplog.set_level(logging.INFO)
    ctx = make_context(GRPC_HEADERS)
    with pytest.raises(PredictionException) as info:
        make_handler().handle([{"request": request(question="").SerializeToString()}], ctx)
    assert info.value.error_code == 400 and "question" in info.value.message
    assert any("outcome:invalid_input" in line for line in metric_lines(caplog))


def test_out_of_memory_is_413_and_the_handler_keeps_serving(caplog) -> None:
    caplog.set_level(logging.INFO)
    engine = StandInEngine(fail=MemoryError())
    handler = make_handler(engine)
    ctx = make_context(GRPC_HEADERS)
    with pytest.raises(PredictionException) as info:
        handler.handle([{"request": request().SerializeToString()}], ctx)
    assert info.value.error_code == 413  # TorchServe: HTTP 413, gRPC RESOURCE_EXHAUSTED
    assert any("outcome:out_of_memory" in line for line in metric_lines(caplog))
    engine.fail = None
    out = handler.handle([{"request": request().SerializeToString()}], make_context(GRPC_HEADERS))
    assert pb.ExplainResponse.FromString(out[0]).answer == "red"


def test_rest_streaming_sends_the_answer_as_an_intermediate_response(monkeypatch) -> None:
    from google.protobuf import json_format

    sent = []
    monkeypatch.setattr(handler_module, "send_intermediate_predict_response",
                        lambda ret, ids, msg, code, ctx: sent.append((ret, code)))
    ctx = make_context(REST_HEADERS)
    out = make_handler().handle([{"body": json_format.MessageToDict(request(stream=True))}], ctx)
    assert len(sent) == 1 and sent[0][1] == 200
    first = json_format.Parse(sent[0][0][0], pb.ExplainResponse())
    last = json_format.Parse(out[0], pb.ExplainResponse())
    assert first.part == pb.ExplainResponse.PART_ANSWER and not first.heatmaps
    assert last.part == pb.ExplainResponse.PART_COMPLETE and last.heatmaps
    assert not last.warnings


def test_grpc_never_streams_and_always_completes_the_stream(monkeypatch) -> None:
    """Unary Predictions and StreamPredictions look the same to the handler: one message, marked
    as the last (TorchServe would otherwise kill or wedge the worker)."""
    sent = []
    monkeypatch.setattr(handler_module, "send_intermediate_predict_response",
                        lambda *args: sent.append(args))
    for stream in (True, False):
        ctx = make_context(GRPC_HEADERS)
        out = make_handler().handle([{"request": request(stream=stream).SerializeToString()}],
                                    ctx)
        resp = pb.ExplainResponse.FromString(out[0])
        assert not sent and resp.heatmaps
        assert ctx.get_response_headers(0).get("ts_stream_next") == "false"
        assert ("cannot stream" in "".join(resp.warnings)) == stream


def test_handler_is_thin() -> None:
    source = HANDLER_PATH.read_text()
    assert len(source.splitlines()) <= 150
    for name in ("glimpse", "dexar", "igos", "rollout", "gradcam", "tmme", "attngrad"):
        assert name not in source.lower(), name
