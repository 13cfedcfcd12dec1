"""Request validation: every limit is checked here, before the engine runs, and every rejection
names the field and the limit (InvalidRequest -> HTTP 400 / gRPC INVALID_ARGUMENT)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from PIL import Image

from ..api.v1 import explain_pb2 as pb
from ..schema import ExplainOptions
from .config import ServiceConfig
from .errors import InvalidRequest

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
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


def validate(req: pb.ExplainRequest, cfg: ServiceConfig, available: Sequence[str]) -> Job:
    methods = _methods(list(req.methods), cfg, available)
    if req.heatmaps.encoding not in ENCODINGS:
        raise InvalidRequest("heatmaps.encoding", f"unknown value {req.heatmaps.encoding}")
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    options = ExplainOptions(methods=tuple(methods),
                             max_new_tokens=_max_new_tokens(req.generation.max_new_tokens, cfg),
                             per_token_maps=req.heatmaps.per_token_maps,
                             method_settings=_settings(req, methods))
    return Job(image=_image(req.image, cfg), question=_text(req.question, "question",
                                                             cfg.max_question_chars),
               answer=_text(req.answer, "answer", cfg.max_answer_chars)
               if req.HasField("answer") else None,
               options=options, encoding=ENCODINGS[req.heatmaps.encoding],
               overlay=req.heatmaps.overlay, request_id=req.request_id, stream=req.stream)


def _text(value: str, field: str, limit: int) -> str:
    text = value.strip()
    if not text:
        raise InvalidRequest(field, "is required and must not be blank")
    if len(text) > limit:
        raise InvalidRequest(field, f"{len(text)} characters exceeds the limit of {limit}")
    return text


def _image(data: bytes, cfg: ServiceConfig) -> Image.Image:
    if not data:
        raise InvalidRequest("image", "is required (PNG, JPEG, WebP, BMP or GIF bytes)")
    if len(data) > cfg.max_image_bytes:
        raise InvalidRequest("image", f"{len(data)} bytes exceeds the limit of "
                             f"{cfg.max_image_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            pixels = image.width * image.height  # from the header: nothing decoded yet
            if pixels > cfg.max_image_pixels:
                raise InvalidRequest("image", f"{image.width}x{image.height} = {pixels} pixels "
                                     f"exceeds the limit of {cfg.max_image_pixels} pixels")
            image.load()
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InvalidRequest("image", f"rejected as a decompression bomb: {err}") from None
    except Exception as err:  # PIL raises many types for corrupt or unsupported data
        raise InvalidRequest("image", f"unsupported or corrupt image (accepted formats: "
                             f"{', '.join(IMAGE_FORMATS)}): {err}") from None
    return image.convert("RGB")


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
    settings = {}
    for name, struct in req.method_settings.items():
        if name not in methods:
            raise InvalidRequest(f"method_settings.{name}", f"method not requested ({methods})")
        settings[name] = {k: _intify(v) for k, v in json_format.MessageToDict(struct).items()}
    return settings


def _intify(value: Any) -> Any:
    """JSON numbers arrive as floats in a Struct; integral ones become ints (layer counts...)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_intify(v) for v in value]
    return value
