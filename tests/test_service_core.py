"""The transport-agnostic core, with a small stand-in engine (no model, no TorchServe)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from lvlm_attribution import heatmaps
from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.schema import Explanation, GroundingSummary, MethodOutput, TokenInfo
from lvlm_attribution.service import ExplainService, ServiceConfig
from lvlm_attribution.service.errors import InvalidRequest, OutOfMemory, ServiceError

VOCAB = ["<pad>", "red", "blue", "circle", "what", "color", "is", "the", "?"]


class InvalidInput(ValueError):  # the engine's exception shape
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class StandInEngine:
    model_name, model_version = "stand-in", "abc123"

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.calls: list[dict] = []

    def available_methods(self) -> list[str]:
        return ["dexar", "glimpse", "rollout"]

    def check_options(self, options) -> None:  # the real engine checks settings in its registry
        pass

    def generate(self, image, question, max_new_tokens, deadline=None):
        if self.fail:
            raise self.fail
        return [1][:max_new_tokens]

    def decode(self, ids):
        return " ".join(VOCAB[i] for i in ids)

    def encode_answer(self, answer):
        ids = [VOCAB.index(w) for w in answer.split() if w in VOCAB]
        if not ids:
            raise InvalidInput("answer", "tokenizes to no tokens")
        return ids

    def explain(self, image, question, answer=None, answer_token_ids=None, options=None,
                deadline=None):
        self.calls.append({"answer": answer, "ids": answer_token_ids, "options": options})
        ids = answer_token_ids if answer_token_ids is not None else self.encode_answer(answer)
        rng = np.random.default_rng(sum(ids))
        methods = {}
        for name in options.methods:
            methods[name] = MethodOutput(
                visual_map=rng.random((8, 8)).astype(np.float32),
                per_token_maps=rng.random((len(ids), 8, 8)).astype(np.float32),
                token_weights={"w": np.arange(len(ids), dtype=np.float32)},
                prompt_saliency=np.array([0.1, 0.9]) if name == "glimpse" else None,
                settings={"tau": 0.5, "layers": (1, 2), **options.method_settings.get(name, {})})
        tokens = [TokenInfo(index=i, token_id=t, text=VOCAB[t], probability=0.9,
                            weights={f"{n}.w": float(i) for n in methods}, grounded=True)
                  for i, t in enumerate(ids)]
        return Explanation(answer=self.decode(ids), answer_token_ids=list(ids), tokens=tokens,
                           methods=methods, question_tokens=["color", "circle"], grid=(8, 8),
                           image_size=image.size, audit_mode=answer_token_ids is None,
                           model_name=self.model_name, model_version=self.model_version,
                           timings={"forward": 0.01, **{n: 0.02 for n in methods}},
                           grounding=GroundingSummary(score=0.75, flagged=[], rule="stub-v1"))


def png(size=(64, 64), color=(200, 10, 10), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


CFG = ServiceConfig(default_methods=("glimpse", "dexar"), max_new_tokens_cap=8,
                    max_image_bytes=100_000, max_image_pixels=128 * 128, max_question_chars=50)


def run(item, transport="rest", engine=None, cfg=CFG, content_type=""):
    service = ExplainService(engine or StandInEngine(), cfg)
    call = service.call(item, transport, content_type)
    return call, list(call.replies())


def request(**fields) -> pb.ExplainRequest:
    fields.setdefault("image", png())
    fields.setdefault("question", "what color is the circle ?")
    return pb.ExplainRequest(**fields)


def as_json(req: pb.ExplainRequest) -> dict:
    return json_format.MessageToDict(req)


def test_grpc_binary_round_trip() -> None:
    call, replies = run({"request": request(request_id="r1").SerializeToString()}, "grpc")
    assert len(replies) == 1 and replies[0].final
    resp = pb.ExplainResponse.FromString(replies[0].body)
    assert resp.answer == "red" and resp.request_id == "r1" and not resp.audit_mode
    assert [h.method for h in resp.heatmaps] == ["glimpse", "dexar"]
    h = resp.heatmaps[0]
    assert (h.height, h.width, h.encoding) == (8, 8, pb.HEATMAP_ENCODING_PNG_U8)
    grid = heatmaps.decode(h.data, "png_u8", (8, 8), h.min_value, h.max_value)
    assert grid.shape == (8, 8) and not h.per_token and not h.overlay_png
    tok = resp.tokens[0]
    assert (tok.id, tok.text, tok.grounded) == (1, "red", True) and "glimpse.w" in tok.weights
    assert not tok.HasField("llr")
    assert resp.prompt_saliency.method == "glimpse"
    assert list(resp.prompt_saliency.tokens) == ["color", "circle"]
    assert resp.grounding.score == pytest.approx(0.75)
    assert resp.model.version == "abc123" and resp.image_size.width == 64
    assert {"decode", "generate", "forward", "glimpse", "dexar", "encode", "total"} <= set(
        resp.timings)
    assert json_format.MessageToDict(resp.method_settings["glimpse"]) == {"tau": 0.5,
                                                                          "layers": [1, 2]}
    assert call.outcome == "ok"


def test_rest_json_dict_body_and_metrics() -> None:
    call, replies = run({"body": as_json(request(methods=["dexar"]))}, "rest")
    doc = json.loads(replies[0].body)
    assert replies[0].content_type == "application/json"
    assert doc["answer"] == "red" and [h["method"] for h in doc["heatmaps"]] == ["dexar"]
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


def test_json_text_in_grpc_input_answers_json() -> None:
    body = json.dumps(as_json(request())).encode()
    _, replies = run({"request": body}, "grpc")
    assert json.loads(replies[0].body)["answer"] == "red"


def test_protobuf_rest_body() -> None:
    _, replies = run({"body": request().SerializeToString()}, "rest",
                     content_type="application/x-protobuf")
    assert pb.ExplainResponse.FromString(replies[0].body).answer == "red"


def test_multipart_form() -> None:
    item = {"image": png(), "question": b"what color is the circle ?", "methods": b"glimpse",
            "encoding": b"f16_zlib", "overlay": b"true", "per_token_maps": "1",
            "max_new_tokens": b"3"}
    _, replies = run(item)
    resp = json_format.ParseDict(json.loads(replies[0].body), pb.ExplainResponse())
    h = resp.heatmaps[0]
    assert h.encoding == pb.HEATMAP_ENCODING_F16_ZLIB and len(h.per_token) == 1
    assert Image.open(io.BytesIO(h.overlay_png)).size == (64, 64)


def test_audit_mode_passes_the_answer_and_matches_generate_then_explain() -> None:
    engine = StandInEngine()
    _, gen = run({"request": request().SerializeToString()}, "grpc", engine)
    _, aud = run({"request": request(answer="red").SerializeToString()}, "grpc", engine)
    assert engine.calls[0]["ids"] == [1] and engine.calls[1]["ids"] == [1]
    g, a = (pb.ExplainResponse.FromString(r[0].body) for r in (gen, aud))
    assert a.audit_mode and not g.audit_mode
    assert [h.data for h in a.heatmaps] == [h.data for h in g.heatmaps]


def test_stream_answer_first_then_complete() -> None:
    _, replies = run({"request": request(stream=True).SerializeToString()}, "grpc")
    assert [r.final for r in replies] == [False, True]
    first, last = (pb.ExplainResponse.FromString(r.body) for r in replies)
    assert first.part == pb.ExplainResponse.PART_ANSWER and first.answer == "red"
    assert not first.heatmaps and first.tokens[0].text == "red"
    assert last.part == pb.ExplainResponse.PART_COMPLETE and len(last.heatmaps) == 2


def test_stream_audit_mode() -> None:
    _, replies = run({"body": as_json(request(stream=True, answer="blue"))})
    first = json.loads(replies[0].body)
    assert first["answer"] == "blue" and first["auditMode"] and first["tokens"][0]["id"] == 2


def test_method_settings_reach_the_engine_as_ints_where_integral() -> None:
    engine = StandInEngine()
    req = request(methods=["glimpse"])
    req.method_settings["glimpse"].update({"last_k": 3, "tau": 0.25})
    run({"request": req.SerializeToString()}, "grpc", engine)
    assert engine.calls[0]["options"].method_settings == {"glimpse": {"last_k": 3, "tau": 0.25}}


BAD = [
    ({}, "request"),
    ({"request": b"\xff\xff\xff"}, "request: malformed protobuf"),
    ({"body": b"{not json"}, "body: malformed JSON"),
    ({"body": {"imagez": "AA=="}}, "body: invalid ExplainRequest JSON"),
    ({"body": ["a"]}, "body: malformed JSON"),
    ({"request": request(image=b"").SerializeToString()}, "image: is required"),
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
    ({"request": request(answer="zzz").SerializeToString()}, "answer: tokenizes to no tokens"),
    ({"image": png(), "question": "q", "colour": "red"}, "colour: unknown form field"),
    ({"image": png(), "question": "q", "max_new_tokens": "many"}, "generation.max_new_tokens"),
    ({"image": png(), "question": "q", "encoding": "jpeg"}, "heatmaps.encoding"),
]


@pytest.mark.parametrize(("item", "message"), BAD)
def test_bad_input_is_invalid_request_naming_the_field(item, message) -> None:
    service = ExplainService(StandInEngine(), CFG)
    call = service.call(item, "grpc")
    with pytest.raises(InvalidRequest) as info:
        list(call.replies())
    assert info.value.status == 400 and message in info.value.message
    assert call.outcome == "invalid_input"
    counters = [o for o in call.observations if o.name == "lvlm_requests_total"]
    assert counters[0].labels == {"outcome": "invalid_input", "transport": "grpc"}


def test_decompression_bomb_is_rejected_before_decoding() -> None:
    cfg = ServiceConfig(max_image_pixels=10**9, max_image_bytes=10**7)
    Image.MAX_IMAGE_PIXELS, saved = 1000, Image.MAX_IMAGE_PIXELS
    try:
        with pytest.raises(InvalidRequest, match="decompression bomb"):
            list(ExplainService(StandInEngine(), cfg).call(
                {"request": request(image=png((100, 100))).SerializeToString()}, "grpc").replies())
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_unknown_method_settings_key() -> None:
    req = request(methods=["glimpse"])
    req.method_settings["dexar"].update({"x": 1})
    with pytest.raises(InvalidRequest, match="method_settings.dexar"):
        run({"request": req.SerializeToString()}, "grpc")


@pytest.mark.parametrize("err", [MemoryError(), RuntimeError("CUDA out of memory. Tried"),
                                 type("OutOfMemoryError", (RuntimeError,), {})("oom")])
def test_out_of_memory_maps_to_413(err) -> None:
    service = ExplainService(StandInEngine(fail=err), CFG)
    call = service.call({"request": request().SerializeToString()}, "rest")
    with pytest.raises(OutOfMemory) as info:
        list(call.replies())
    assert info.value.status == 413 and call.outcome == "out_of_memory"


def test_unexpected_error_is_internal() -> None:
    call = ExplainService(StandInEngine(fail=KeyError("x")), CFG).call(
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
