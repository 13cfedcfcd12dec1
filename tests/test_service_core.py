"""The transport-agnostic core with the real embedded model (no TorchServe): wire formats,
validation, audit mode, streaming, batches, error mapping and metrics."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from google.protobuf import json_format
from PIL import Image

from lvlm_attribution import heatmaps
from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.service import ExplainService, ServiceConfig
from lvlm_attribution.service.errors import InvalidRequest, OutOfMemory, ServiceError
from lvlm_attribution.world.scenes import generate

SCENE = generate(3, "color")  # "what color is the circle ?" -> "the circle is blue"
CFG = ServiceConfig(default_methods=("glimpse", "dexar"), max_new_tokens_cap=8,
                    max_image_bytes=100_000, max_image_pixels=128 * 128, max_question_chars=50)


class Failing:
    """The real engine whose answering raises `fail` (what a CPU cannot produce on demand)."""

    def __init__(self, engine, fail: BaseException) -> None:
        self._engine, self.fail = engine, fail

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def answer(self, *args, **kwargs):
        if self.fail is not None:
            raise self.fail
        return self._engine.answer(*args, **kwargs)


@pytest.fixture(scope="module")
def engine(embedded_explainer):
    return embedded_explainer


def run(item, engine, transport="rest", cfg=CFG, content_type=""):
    service = ExplainService(engine, cfg)
    call = service.call(item, transport, content_type)
    return call, list(call.replies())


def png(size=(64, 64), fmt="PNG", array=None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(SCENE.image) if array is None else Image.fromarray(array)
    image.resize(size, Image.NEAREST).save(buf, format=fmt)
    return buf.getvalue()


def request(**fields) -> pb.ExplainRequest:
    fields.setdefault("image", png())
    fields.setdefault("question", SCENE.question)
    return pb.ExplainRequest(**fields)


def as_json(req: pb.ExplainRequest) -> dict:
    return json_format.MessageToDict(req)


def test_grpc_binary_round_trip(engine) -> None:
    call, replies = run({"request": request(request_id="r1").SerializeToString()}, engine,
                        "grpc")
    assert len(replies) == 1 and replies[0].final
    resp = pb.ExplainResponse.FromString(replies[0].body)
    assert resp.answer == SCENE.answer and resp.request_id == "r1" and not resp.audit_mode
    assert [h.method for h in resp.heatmaps] == ["glimpse", "dexar"]
    h = resp.heatmaps[0]
    assert (h.height, h.width, h.encoding) == (8, 8, pb.HEATMAP_ENCODING_PNG_U8)
    grid = heatmaps.decode(h.data, "png_u8", (8, 8), h.min_value, h.max_value)
    assert grid.shape == (8, 8) and not h.per_token and not h.overlay_png
    tok = resp.tokens[1]
    assert tok.text == "circle" and "glimpse.beta" in tok.weights and tok.HasField("llr")
    assert resp.prompt_saliency.method == "glimpse" and "circle" in resp.prompt_saliency.tokens
    assert 0 <= resp.grounding.score <= 1 and resp.grounding.rule
    assert resp.model.version == engine.model_version and resp.image_size.width == 64
    assert (resp.visual_box.right, resp.visual_box.bottom) == (64, 64)
    assert {"decode", "prepare", "generate", "llr", "glimpse", "dexar", "encode",
            "total"} <= set(resp.timings)
    assert json_format.MessageToDict(resp.method_settings["glimpse"])["tau"] == 0.5
    assert call.outcome == "ok"


def test_rest_json_dict_body_and_metrics(engine) -> None:
    call, replies = run({"body": as_json(request(methods=["dexar"]))}, engine, "rest")
    doc = json.loads(replies[0].body)
    assert replies[0].content_type == "application/json"
    assert doc["answer"] == SCENE.answer and [h["method"] for h in doc["heatmaps"]] == ["dexar"]
    parsed = json_format.ParseDict(doc, pb.ExplainResponse())
    assert parsed.heatmaps[0].data.startswith(b"\x89PNG")
    obs = {(o.name, tuple(sorted(o.labels.items()))) for o in call.observations}
    assert ("lvlm_requests_total", (("outcome", "ok"), ("transport", "rest"))) in obs
    stages = {(o.labels["stage"], o.labels["method"]) for o in call.observations
              if o.name == "lvlm_stage_latency_seconds"}
    assert {("decode", "-"), ("generate", "-"), ("attribute", "dexar"), ("encode", "-"),
            ("total", "-")} <= stages
    names = {o.name for o in call.observations}
    assert {"lvlm_answer_tokens", "lvlm_visual_tokens", "lvlm_grounding_score"} <= names
    for o in call.observations:  # no ids or text in labels
        assert set(o.labels) <= {"stage", "method", "transport", "outcome"}


def test_json_text_in_grpc_input_answers_json(engine) -> None:
    body = json.dumps(as_json(request())).encode()
    _, replies = run({"request": body}, engine, "grpc")
    assert json.loads(replies[0].body)["answer"] == SCENE.answer


def test_protobuf_rest_body(engine) -> None:
    _, replies = run({"body": request().SerializeToString()}, engine, "rest",
                     content_type="application/x-protobuf")
    assert pb.ExplainResponse.FromString(replies[0].body).answer == SCENE.answer


def test_multipart_form(engine) -> None:
    item = {"image": png(), "question": SCENE.question.encode(), "methods": b"glimpse",
            "encoding": b"f16_zlib", "overlay": b"true", "per_token_maps": "1",
            "max_new_tokens": b"3"}
    _, replies = run(item, engine)
    resp = json_format.ParseDict(json.loads(replies[0].body), pb.ExplainResponse())
    h = resp.heatmaps[0]
    assert h.encoding == pb.HEATMAP_ENCODING_F16_ZLIB and len(h.per_token) == 3
    assert Image.open(io.BytesIO(h.overlay_png)).size == (64, 64)


def test_audit_mode_matches_generate_then_explain(engine) -> None:
    _, gen = run({"request": request().SerializeToString()}, engine, "grpc")
    _, aud = run({"request": request(answer=SCENE.answer).SerializeToString()}, engine, "grpc")
    g, a = (pb.ExplainResponse.FromString(r[0].body) for r in (gen, aud))
    assert a.audit_mode and not g.audit_mode and a.answer == g.answer
    assert [t.id for t in a.tokens] == [t.id for t in g.tokens]
    for hg, ha in zip(g.heatmaps, a.heatmaps, strict=True):  # generation logits vs forward
        np.testing.assert_allclose(heatmaps.decode(hg.data, "png_u8", (8, 8)),
                                   heatmaps.decode(ha.data, "png_u8", (8, 8)), atol=1 / 255)
    np.testing.assert_allclose([t.probability for t in a.tokens],
                               [t.probability for t in g.tokens], atol=1e-5)


def test_stream_answer_first_then_complete(engine) -> None:
    _, replies = run({"request": request(stream=True).SerializeToString()}, engine, "grpc")
    assert [r.final for r in replies] == [False, True]
    first, last = (pb.ExplainResponse.FromString(r.body) for r in replies)
    assert first.part == pb.ExplainResponse.PART_ANSWER and first.answer == SCENE.answer
    assert not first.heatmaps and first.tokens[1].text == "circle"
    assert last.part == pb.ExplainResponse.PART_COMPLETE and len(last.heatmaps) == 2


def test_stream_audit_mode(engine) -> None:
    _, replies = run({"body": as_json(request(stream=True, answer="the circle is red"))},
                     engine)
    first = json.loads(replies[0].body)
    assert first["answer"] == "the circle is red" and first["auditMode"]
    assert [t["text"] for t in first["tokens"]] == ["the", "circle", "is", "red"]


def test_method_settings_reach_the_engine_as_ints_where_integral(engine) -> None:
    req = request(methods=["glimpse"])
    req.method_settings["glimpse"].update({"token_chunk": 3, "tau": 0.25})
    _, replies = run({"request": req.SerializeToString()}, engine, "grpc")
    used = json_format.MessageToDict(pb.ExplainResponse.FromString(
        replies[0].body).method_settings["glimpse"])
    assert used["token_chunk"] == 3 and used["tau"] == 0.25


BAD = [
    ({}, "request"),
    ({"request": b"\xff\xff\xff"}, "request: malformed protobuf"),
    ({"body": b"{not json"}, "body: malformed JSON"),
    ({"body": {"imagez": "AA=="}}, "body: invalid ExplainRequest JSON"),
    ({"body": ["a"]}, "body: malformed JSON"),
    ({"request": request(image=b"").SerializeToString()}, "image: is"),
    ({"request": request(image=b"x" * 100_001).SerializeToString()}, "image: 100001 bytes exceeds"),
    ({"request": request(image=png((129, 128))).SerializeToString()},
     "image: 129x128 = 16512 pixels exceeds the limit of 16384"),
    ({"request": request(image=b"GIF89a-not-really").SerializeToString()},
     "image: unsupported or corrupt"),
    ({"request": request(image=png(fmt="TIFF")).SerializeToString()},
     "image: unsupported or corrupt"),
    ({"request": request(question="   ").SerializeToString()}, "question: is required"),
    ({"request": request(question="x" * 51).SerializeToString()},
     "question: 51 characters exceeds the limit of 50"),
    ({"request": request(answer="").SerializeToString()}, "answer: is required"),
    ({"request": request(methods=["nope"]).SerializeToString()},
     "methods: unknown or disabled method 'nope'"),
    ({"request": request(methods=["dexar", "dexar"]).SerializeToString()}, "methods: duplicate"),
    ({"request": request(generation=pb.GenerationOptions(max_new_tokens=9)).SerializeToString()},
     "generation.max_new_tokens: 9 exceeds the cap of 8"),
    ({"image": png(), "question": "q", "colour": "red"}, "colour: unknown form field"),
    ({"image": png(), "question": "q", "max_new_tokens": "many"}, "generation.max_new_tokens"),
    ({"image": png(), "question": "q", "encoding": "jpeg"}, "heatmaps.encoding"),
]


@pytest.mark.parametrize(("item", "message"), BAD)
def test_bad_input_is_invalid_request_naming_the_field(engine, item, message) -> None:
    service = ExplainService(engine, CFG)
    call = service.call(item, "grpc")
    with pytest.raises(InvalidRequest) as info:
        list(call.replies())
    assert info.value.status == 400 and message in info.value.message
    assert call.outcome == "invalid_input"
    counters = [o for o in call.observations if o.name == "lvlm_requests_total"]
    assert counters[0].labels == {"outcome": "invalid_input", "transport": "grpc"}


def test_decompression_bomb_is_rejected_before_decoding(engine) -> None:
    cfg = ServiceConfig(max_image_pixels=10**9, max_image_bytes=10**7)
    Image.MAX_IMAGE_PIXELS, saved = 1000, Image.MAX_IMAGE_PIXELS
    try:
        with pytest.raises(InvalidRequest, match="decompression bomb"):
            list(ExplainService(engine, cfg).call(
                {"request": request(image=png((100, 100))).SerializeToString()}, "grpc").replies())
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_unknown_method_settings_key(engine) -> None:
    req = request(methods=["glimpse"])
    req.method_settings["dexar"].update({"x": 1})
    with pytest.raises(InvalidRequest, match="method_settings.dexar"):
        run({"request": req.SerializeToString()}, engine, "grpc")


@pytest.mark.parametrize("err", [MemoryError(), RuntimeError("CUDA out of memory. Tried"),
                                 torch.cuda.OutOfMemoryError("oom")])
def test_out_of_memory_maps_to_413(engine, err) -> None:
    service = ExplainService(Failing(engine, err), CFG)
    call = service.call({"request": request().SerializeToString()}, "rest")
    with pytest.raises(OutOfMemory) as info:
        list(call.replies())
    assert info.value.status == 413 and call.outcome == "out_of_memory"


def test_unexpected_error_is_internal(engine) -> None:
    call = ExplainService(Failing(engine, KeyError("x")), CFG).call(
        {"request": request().SerializeToString()}, "rest")
    with pytest.raises(ServiceError) as info:
        list(call.replies())
    assert info.value.status == 500 and call.outcome == "error"
    assert "KeyError" in info.value.message


def test_config_from_model_config_section(tmp_path) -> None:
    cfg = ServiceConfig.from_mapping({"model_dir": "m", "allowed_methods": ["glimpse"],
                                      "max_new_tokens_cap": 4})
    assert cfg.allowed_methods == ("glimpse",) and cfg.max_new_tokens_cap == 4
    (tmp_path / "m").mkdir()
    assert cfg.resolve_model_dir(tmp_path) == (tmp_path / "m").resolve()
    with pytest.raises(ValueError, match="unknown handler settings"):
        ServiceConfig.from_mapping({"model_dri": "x"})


# ---- batches ------------------------------------------------------------------------------------
def scene_request(seed: int, **fields) -> pb.ExplainRequest:
    scene = generate(seed)
    return request(image=png(array=scene.image), question=scene.question, **fields)


def test_batch_results_equal_single_ones_and_a_bad_item_fails_alone(engine) -> None:
    service = ExplainService(engine, CFG)
    reqs = [scene_request(seed) for seed in (0, 1, 2)]
    bad = request(question="what <image> is it ?")
    audit = scene_request(4, answer="the circle is red")
    items = [{"request": r.SerializeToString()} for r in (reqs[0], bad, reqs[1], audit, reqs[2])]
    calls = [service.call(item, "grpc") for item in items]
    batch_obs = service.serve(calls)
    assert [o.value for o in batch_obs if o.name == "lvlm_batch_size"] == [5]
    assert [c.outcome for c in calls] == ["ok", "invalid_input", "ok", "ok", "ok"]
    assert "special token" in calls[1].error.message
    for call, req in zip([calls[0], calls[2], calls[3], calls[4]],
                         [reqs[0], reqs[1], audit, reqs[2]], strict=True):
        alone = pb.ExplainResponse.FromString(run({"request": req.SerializeToString()}, engine,
                                                  "grpc")[1][0].body)
        batched = pb.ExplainResponse.FromString(call.final.body)
        assert batched.answer == alone.answer and batched.audit_mode == alone.audit_mode
        np.testing.assert_allclose([t.probability for t in batched.tokens],
                                   [t.probability for t in alone.tokens], atol=1e-5)
        np.testing.assert_allclose([t.llr for t in batched.tokens],
                                   [t.llr for t in alone.tokens], atol=1e-4)
        for hb, ha in zip(batched.heatmaps, alone.heatmaps, strict=True):
            assert (hb.min_value, hb.max_value) == pytest.approx((ha.min_value, ha.max_value),
                                                                 abs=1e-5)


def test_batch_groups_by_options_and_item_errors_per_transport(engine) -> None:
    service = ExplainService(engine, CFG)
    calls = [service.call({"request": scene_request(0).SerializeToString()}, "grpc"),
             service.call({"request": scene_request(1, methods=["rollout"]).SerializeToString()},
                          "grpc"),
             service.call({"body": as_json(request(question=""))}, "rest"),
             service.call({"request": request(question="").SerializeToString()}, "grpc")]
    service.serve(calls)
    first, second = (pb.ExplainResponse.FromString(c.final.body) for c in calls[:2])
    assert [h.method for h in first.heatmaps] == ["glimpse", "dexar"]
    assert [h.method for h in second.heatmaps] == ["rollout"]
    status, reply = service.item_error(calls[2])  # REST: its own status and TorchServe's JSON
    assert status == 400 and json.loads(reply.body)["message"].startswith("question:")
    status, reply = service.item_error(calls[3])  # gRPC: a PART_ERROR body
    err = pb.ExplainResponse.FromString(reply.body)
    assert status is None and err.part == pb.ExplainResponse.PART_ERROR
    assert err.error.field == "question" and err.error.grpc_code == "INVALID_ARGUMENT"
