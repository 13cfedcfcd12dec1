"""Request validation: every limit is checked here, before the engine runs, and every rejection
names the field and the limit (InvalidRequest -> HTTP 400 / gRPC INVALID_ARGUMENT)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from PIL import Image

from ..api.v1 import explain_pb2 as pb
from ..images import ImageError, describe_formats, load_image
from ..schema import ExplainOptions
from .config import ServiceConfig
from .errors import InvalidRequest

MAX_REQUEST_ID_CHARS = 128
ENCODINGS = {pb.HEATMAP_ENCODING_UNSPECIFIED: "png_u8", pb.HEATMAP_ENCODING_PNG_U8: "png_u8",
             pb.HEATMAP_ENCODING_F16_ZLIB: "f16_zlib"}


@dataclass(frozen=True)
class Job:
    """A validated request, in engine terms."""

    image: Image.Image
    question: str
    answer: str | None
    options: ExplainOptions
    encoding: str
    overlay: bool
    request_id: str
    stream: bool
    deadline_s: float  # the caller's timeout_ms, capped at the server's per-request deadline
    max_overlay_side: int


def validate(req: pb.ExplainRequest, cfg: ServiceConfig, available: Sequence[str]) -> Job:
    methods = _methods(list(req.methods), cfg, available)
    if req.heatmaps.encoding not in ENCODINGS:
        raise InvalidRequest("heatmaps.encoding", f"unknown value {req.heatmaps.encoding}")
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    if not req.request_id.isprintable():  # it is echoed into logs: no line breaks or escapes
        raise InvalidRequest("request_id", "must be printable text (no control characters)")
    options = ExplainOptions(methods=tuple(methods),
                             max_new_tokens=_max_new_tokens(req.generation.max_new_tokens, cfg),
                             per_token_maps=req.heatmaps.per_token_maps,
                             method_settings=_settings(req, methods),
                             setting_limits=dict(cfg.method_limits or {}), llr=cfg.llr,
                             faithfulness=req.heatmaps.faithfulness)
    return Job(image=_image(req.image, cfg), question=_text(req.question, "question",
                                                             cfg.max_question_chars),
               answer=_text(req.answer, "answer", cfg.max_answer_chars)
               if req.HasField("answer") else None,
               options=options, encoding=ENCODINGS[req.heatmaps.encoding],
               overlay=req.heatmaps.overlay, request_id=req.request_id, stream=req.stream,
               deadline_s=_deadline(req.timeout_ms, cfg), max_overlay_side=cfg.max_overlay_side)


def _deadline(timeout_ms: int, cfg: ServiceConfig) -> float:
    """The caller may ask for less time than the server's budget, never for more."""
    if timeout_ms == 0:
        return cfg.request_deadline_s
    return min(timeout_ms / 1000.0, cfg.request_deadline_s)


def _text(value: str, field: str, limit: int) -> str:
    text = value.strip()
    if not text:
        raise InvalidRequest(field, "is required and must not be blank")
    if len(text) > limit:
        raise InvalidRequest(field, f"{len(text)} characters exceeds the limit of {limit}")
    return text


def _image(data: bytes, cfg: ServiceConfig) -> Image.Image:
    if not data:
        raise InvalidRequest("image", f"is required ({describe_formats()} bytes)")
    if len(data) > cfg.max_image_bytes:
        raise InvalidRequest("image", f"{len(data)} bytes exceeds the limit of "
                             f"{cfg.max_image_bytes} bytes")
    try:
        return load_image(data, max_pixels=cfg.max_image_pixels,
                          max_aspect_ratio=cfg.max_aspect_ratio)
    except ImageError as err:
        raise InvalidRequest("image", err.message) from None


def _methods(requested: list[str], cfg: ServiceConfig, available: Sequence[str]) -> list[str]:
    allowed = [m for m in (cfg.allowed_methods or available) if m in available]
    methods = requested or list(cfg.default_methods)
    for name in methods:
        if name not in allowed:
            raise InvalidRequest("methods", f"unknown or disabled method {name!r}; "
                                 f"allowed: {allowed}")
    if len(set(methods)) != len(methods):
        raise InvalidRequest("methods", f"duplicate method in {methods}")
    return methods


def _max_new_tokens(value: int, cfg: ServiceConfig) -> int:
    if value > cfg.max_new_tokens_cap:
        raise InvalidRequest("generation.max_new_tokens", f"{value} exceeds the cap of "
                             f"{cfg.max_new_tokens_cap}")
    return value or min(cfg.default_max_new_tokens, cfg.max_new_tokens_cap)


def _settings(req: pb.ExplainRequest, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Types and limits are checked by the method registry (Explainer.check_options)."""
    settings = {}
    for name, struct in req.method_settings.items():
        if name not in methods:
            raise InvalidRequest(f"method_settings.{name}", f"method not requested ({methods})")
        try:
            values = json_format.MessageToDict(struct)
        except RecursionError:
            raise InvalidRequest(f"method_settings.{name}", "nested too deeply") from None
        settings[name] = {k: _intify(v) for k, v in values.items()}
    return settings


def _intify(value: Any) -> Any:
    """JSON numbers arrive as floats in a Struct; integral ones become ints (layer counts...)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):  # one level: settings are scalars or flat lists
        return [_intify(v) if isinstance(v, float) else v for v in value]
    return value
