"""Wire formats: one TorchServe request item -> ExplainRequest, ExplainResponse -> bytes.

What reaches the handler (one dict per request):
- gRPC: the PredictionsRequest.input map, values as raw bytes. Key "request" holds a serialized
  ExplainRequest (its proto3 JSON is accepted too). The response is a serialized ExplainResponse
  (JSON when the request was JSON).
- REST with a body: key "body"; TorchServe has already decoded application/json into a dict.
  application/x-protobuf bodies are binary ExplainRequest and get a binary ExplainResponse.
- REST multipart/form-data (curl -F): one key per form field: image (file), question, answer,
  methods (comma-separated), max_new_tokens, per_token_maps, encoding (png_u8|f16_zlib), overlay,
  request_id, stream.
JSON is always the canonical proto3 JSON mapping (google.protobuf.json_format), never hand-mapped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from ..api.v1 import explain_pb2 as pb
from .errors import InvalidRequest

JSON = "application/json"
PROTOBUF = "application/x-protobuf"
FORM_FIELDS = ("image", "question", "answer", "methods", "max_new_tokens", "per_token_maps",
               "encoding", "overlay", "request_id", "stream")
ENCODING_NAMES = {"png_u8": pb.HEATMAP_ENCODING_PNG_U8, "f16_zlib": pb.HEATMAP_ENCODING_F16_ZLIB}


@dataclass(frozen=True)
class Decoded:
    request: pb.ExplainRequest
    wire: str  # content type the response is encoded in: JSON or PROTOBUF


def decode(item: Mapping[str, Any], content_type: str = "") -> Decoded:
    """Parse one request item; `content_type` is the REST Content-Type header, if any."""
    if "request" in item:
        return _parse_payload(item["request"], "request", PROTOBUF)
    if "body" in item:
        wire = PROTOBUF if content_type.split(";")[0].strip() == PROTOBUF else JSON
        return _parse_payload(item["body"], "body", wire)
    if "image" in item or "question" in item:
        return Decoded(_from_form(item), JSON)
    raise InvalidRequest("request", "missing: send an ExplainRequest (gRPC input key 'request', "
                         "a JSON body, or multipart fields 'image' and 'question')")


def encode(response: pb.ExplainResponse, wire: str) -> bytes:
    if wire == PROTOBUF:
        return response.SerializeToString()
    doc = json_format.MessageToDict(response)
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def _parse_payload(value: Any, field: str, wire: str) -> Decoded:
    if isinstance(value, dict | list):
        return Decoded(_from_json(value, field), JSON)
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes | bytearray) or not value:
        raise InvalidRequest(field, "empty request")
    if value.lstrip()[:1] == b"{":  # a JSON document (a serialized ExplainRequest never is one)
        try:
            doc = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidRequest(field, f"malformed JSON: {err}") from None
        return Decoded(_from_json(doc, field), JSON)
    if wire == JSON:
        raise InvalidRequest(field, "malformed JSON: the body is not a JSON object")
    try:
        return Decoded(pb.ExplainRequest.FromString(bytes(value)), PROTOBUF)
    except DecodeError as err:
        raise InvalidRequest(field, f"malformed protobuf ExplainRequest: {err}") from None


def _from_json(doc: Any, field: str) -> pb.ExplainRequest:
    if not isinstance(doc, dict):
        raise InvalidRequest(field, "malformed JSON: expected an object (ExplainRequest)")
    try:
        return json_format.ParseDict(doc, pb.ExplainRequest())
    except json_format.ParseError as err:
        raise InvalidRequest(field, f"invalid ExplainRequest JSON: {err}") from None


def _text(value: Any, field: str) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(field, "must be UTF-8 text") from None
    return str(value)


def _flag(value: Any, field: str) -> bool:
    text = _text(value, field).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidRequest(field, f"must be true or false, got {text!r}")
    return text in ("true", "1", "yes")


def _from_form(item: Mapping[str, Any]) -> pb.ExplainRequest:
    unknown = sorted(set(item) - set(FORM_FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown form field; known: {list(FORM_FIELDS)}")
    req = pb.ExplainRequest()
    image = item.get("image", b"")
    req.image = image.encode() if isinstance(image, str) else bytes(image)
    req.question = _text(item.get("question", ""), "question")
    if "answer" in item:
        req.answer = _text(item["answer"], "answer")
    if "methods" in item:
        names = _text(item["methods"], "methods").split(",")
        req.methods.extend(n.strip() for n in names if n.strip())
    if "max_new_tokens" in item:
        text = _text(item["max_new_tokens"], "max_new_tokens").strip()
        if not text.isdigit():
            raise InvalidRequest("generation.max_new_tokens", f"must be an integer, got {text!r}")
        req.generation.max_new_tokens = int(text)
    if "encoding" in item:
        name = _text(item["encoding"], "encoding").strip().lower()
        if name not in ENCODING_NAMES:
            raise InvalidRequest("heatmaps.encoding",
                                 f"unknown encoding {name!r}; known: {sorted(ENCODING_NAMES)}")
        req.heatmaps.encoding = ENCODING_NAMES[name]
    for key, target in (("per_token_maps", "per_token_maps"), ("overlay", "overlay")):
        if key in item:
            setattr(req.heatmaps, target, _flag(item[key], f"heatmaps.{key}"))
    if "request_id" in item:
        req.request_id = _text(item["request_id"], "request_id")
    if "stream" in item:
        req.stream = _flag(item["stream"], "stream")
    return req
