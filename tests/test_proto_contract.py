"""The payload contract: JSON mapping, wire compatibility with TorchServe's transport."""

from __future__ import annotations

from google.protobuf import json_format

from lvlm_attribution.api.torchserve import inference_pb2, inference_pb2_grpc
from lvlm_attribution.api.v1 import explain_pb2 as pb


def test_request_json_mapping_is_canonical_proto3() -> None:
    req = pb.ExplainRequest(image=b"\x89PNG", question="what color is the circle ?",
                            answer="red", methods=["glimpse", "dexar"], request_id="r-1")
    req.generation.max_new_tokens = 4
    req.heatmaps.encoding = pb.HEATMAP_ENCODING_F16_ZLIB
    req.method_settings["glimpse"].update({"tau": 0.5})
    doc = json_format.MessageToDict(req)
    assert doc["image"] == "iVBORw=="  # bytes are base64
    assert doc["generation"] == {"maxNewTokens": 4}
    assert doc["heatmaps"] == {"encoding": "HEATMAP_ENCODING_F16_ZLIB"}
    assert doc["methodSettings"] == {"glimpse": {"tau": 0.5}}
    assert json_format.ParseDict(doc, pb.ExplainRequest()) == req
    # snake_case names are accepted too (proto3 JSON parsers must accept both).
    assert json_format.ParseDict({"request_id": "x"}, pb.ExplainRequest()).request_id == "x"


def test_answer_presence_is_tracked() -> None:
    assert not pb.ExplainRequest().HasField("answer")
    assert pb.ExplainRequest(answer="").HasField("answer")


def test_transport_matches_torchserve_field_numbers() -> None:
    fields = {f.name: f.number for f in inference_pb2.PredictionsRequest.DESCRIPTOR.fields}
    assert fields == {"model_name": 1, "model_version": 2, "input": 3, "sequenceId": 4}
    fields = {f.name: f.number for f in inference_pb2.PredictionResponse.DESCRIPTOR.fields}
    assert fields == {"prediction": 1, "sequenceId": 2, "status": 3}
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"]
    assert service.full_name == "org.pytorch.serve.grpc.inference.InferenceAPIsService"
    assert {m.name for m in service.methods} == {"Ping", "Predictions", "StreamPredictions",
                                                 "StreamPredictions2"}
    assert hasattr(inference_pb2_grpc, "InferenceAPIsServiceStub")


def test_payload_round_trips_inside_the_transport() -> None:
    req = pb.ExplainRequest(image=b"img", question="q")
    outer = inference_pb2.PredictionsRequest(model_name="lvlm",
                                             input={"request": req.SerializeToString()})
    back = inference_pb2.PredictionsRequest.FromString(outer.SerializeToString())
    assert pb.ExplainRequest.FromString(back.input["request"]) == req
