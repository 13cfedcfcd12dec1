"""Wire formats: one TorchServe request item -> ExplainRequest, ExplainResponse -> bytes.

What reaches the handler (one dict per request):
- gRPC: the PredictionsRequest.input map, values as raw bytes. Key "request" holds a serialized
  ExplainRequest (its proto3 JSON is accepted too). The response is a serialized ExplainResponse
  (JSON when the request was JSON).
- REST with a body: key "body"; TorchServe has already decoded application/json into a dict.
  application/x-protobuf bodies are binary ExplainRequest and get a binary ExplainResponse.
- REST multipart/form-data (curl -F): one key per form field: image (file), question, answer,
  methods (comma-separated), max_new_tokens, per_token_maps, encoding (png_u8|f16_zlib), overlay,
  request_id, stream, timeout_ms.
JSON is always the canonical proto3 JSON mapping (google.protobuf.json_format), never hand-mapped.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from ..api.v1 import explain_pb2 as pb
from .errors import InvalidRequest

JSON = "application/json"
PROTOBUF = "application/x-protobuf"
FORM_FIELDS = ("image", "question", "answer", "methods", "max_new_tokens", "per_token_maps",
               "encoding", "overlay", "faithfulness", "request_id", "stream", "timeout_ms")
ENCODING_NAMES = {"png_u8": pb.HEATMAP_ENCODING_PNG_U8, "f16_zlib": pb.HEATMAP_ENCODING_F16_ZLIB}
DESCRIBE = "describe"  # input key of the gateway's Describe: answered by service/describe.py


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


def is_describe(item: Mapping[str, Any]) -> bool:
    """The gateway asking what is served (no ExplainRequest; answered with a DescribeResponse)."""
    return isinstance(item, Mapping) and DESCRIBE in item


def encode(response: pb.ExplainResponse, wire: str) -> bytes:
    if wire == PROTOBUF:
        return response.SerializeToString()
    doc = json_format.MessageToDict(response)
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def _parse_payload(value: Any, field: str, wire: str) -> Decoded:
    if not isinstance(value, str | bytes | bytearray):  # TorchServe already decoded the JSON
        return Decoded(_from_json(value, field), JSON)
    if isinstance(value, str):
        value = value.encode()
    if not value.strip():
        raise InvalidRequest(field, "empty request: send an ExplainRequest")
    if wire == JSON or value.lstrip()[:1] in (b"{", b"["):  # never how a protobuf starts
        return Decoded(_from_json(_load_json(value, field), field), JSON)
    try:
        return Decoded(pb.ExplainRequest.FromString(bytes(value)), PROTOBUF)
    except DecodeError as err:
        raise InvalidRequest(field, f"malformed protobuf ExplainRequest: {err}") from None


def _load_json(value: bytes, field: str) -> Any:
    try:
        return json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidRequest(field, f"malformed JSON: {err}") from None
    except RecursionError:
        raise InvalidRequest(field, "malformed JSON: nested too deeply") from None


def _from_json(doc: Any, field: str) -> pb.ExplainRequest:
    if not isinstance(doc, dict):
        raise InvalidRequest(field, f"malformed JSON: expected an object (ExplainRequest), got "
                             f"{_json_kind(doc)}")
    _check_json_shape(doc, pb.ExplainRequest.DESCRIPTOR, "")
    try:
        return json_format.ParseDict(doc, pb.ExplainRequest())
    except json_format.ParseError as err:
        raise InvalidRequest(field, f"invalid ExplainRequest JSON: {err}") from None
    except RecursionError:
        raise InvalidRequest(field, "invalid ExplainRequest JSON: nested too deeply") from None


def _check_json_shape(doc: dict, descriptor: Descriptor, prefix: str) -> None:
    """What protobuf's JSON parser lets through but should not: a list where a message belongs
    (`"generation": []` parses as an empty message) and bytes that are not base64 (its decoder
    drops invalid characters: "!!!!" becomes empty bytes)."""
    for name, value in doc.items():
        field = descriptor.fields_by_camelcase_name.get(name) or descriptor.fields_by_name.get(name)
        if field is None or value is None or field.is_repeated:
            continue  # unknown names and repeated/map fields: ParseDict's own messages are clear
        path = prefix + field.name
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if not isinstance(value, dict):
                raise InvalidRequest(path, f"expected an object, got {_json_kind(value)}")
            _check_json_shape(value, field.message_type, path + ".")
        elif field.type == FieldDescriptor.TYPE_BYTES and not _is_base64(value):
            raise InvalidRequest(path, "not valid base64 (the JSON mapping carries bytes as "
                                 "standard or URL-safe base64)")


def _is_base64(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    text = value.replace("-", "+").replace("_", "/").rstrip("=")  # proto3: URL-safe, no padding ok
    try:
        base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _json_kind(value: Any) -> str:
    kinds = ((bool, "a boolean"), (int | float, "a number"), (str, "a string"), (list, "a list"),
             (dict, "an object"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


def _text(value: Any, field: str) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(field, "must be UTF-8 text") from None
    if isinstance(value, dict | list):  # a form part sent as application/json, decoded by TS
        raise InvalidRequest(field, f"must be plain text, not JSON ({_json_kind(value)})")
    return str(value)


def _flag(value: Any, field: str) -> bool:
    text = _text(value, field).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidRequest(field, f"must be true or false, got {_short(text)}")
    return text in ("true", "1", "yes")


def _short(text: str, limit: int = 40) -> str:
    """A caller's value quoted in a message, never pages of it."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def _from_form(item: Mapping[str, Any]) -> pb.ExplainRequest:
    unknown = sorted(set(item) - set(FORM_FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown form field; known: {list(FORM_FIELDS)}")
    req = pb.ExplainRequest()
    image = item.get("image", b"")
    if not isinstance(image, str | bytes | bytearray):  # a part TorchServe decoded as JSON
        raise InvalidRequest("image", "must be the image file's bytes (a multipart file part)")
    req.image = image.encode() if isinstance(image, str) else bytes(image)
    req.question = _text(item.get("question", ""), "question")
    if "answer" in item:
        req.answer = _text(item["answer"], "answer")
    if "methods" in item:
        names = _text(item["methods"], "methods").split(",")
        req.methods.extend(n.strip() for n in names if n.strip())
    if "max_new_tokens" in item:
        text = _text(item["max_new_tokens"], "max_new_tokens").strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 9):  # "²".isdigit() is True
            raise InvalidRequest("generation.max_new_tokens",
                                 f"must be a whole number of at most 9 digits, got {_short(text)}")
        req.generation.max_new_tokens = int(text)
    if "timeout_ms" in item:
        text = _text(item["timeout_ms"], "timeout_ms").strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 9):
            raise InvalidRequest("timeout_ms",
                                 f"must be a whole number of at most 9 digits, got {_short(text)}")
        req.timeout_ms = int(text)
    if "encoding" in item:
        name = _text(item["encoding"], "encoding").strip().lower()
        if name not in ENCODING_NAMES:
            raise InvalidRequest("heatmaps.encoding",
                                 f"unknown encoding {name!r}; known: {sorted(ENCODING_NAMES)}")
        req.heatmaps.encoding = ENCODING_NAMES[name]
    for key, target in (("per_token_maps", "per_token_maps"), ("overlay", "overlay"),
                        ("faithfulness", "faithfulness")):
        if key in item:
            setattr(req.heatmaps, target, _flag(item[key], f"heatmaps.{key}"))
    if "request_id" in item:
        req.request_id = _text(item["request_id"], "request_id")
    if "stream" in item:
        req.stream = _flag(item["stream"], "stream")
    return req
