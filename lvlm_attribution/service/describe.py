"""What the service serves, as a lvlm.v1.DescribeResponse: the model, the methods a request may
name (with their default settings and cost limits) and the request limits.

The gateway holds no model, so it asks the handler: a request item with the key "describe"
(gRPC input {"describe": b""}) is answered with this message, serialized, instead of being
explained (codec.is_describe, Call.replies). It is not counted as a request in the metrics.
"""

from __future__ import annotations

from typing import Any

from ..api.v1 import explainer_pb2 as api
from ..methods.registry import get_method
from .config import ServiceConfig

# ServiceConfig field -> RequestLimits field of the same name (the limits a request is held to).
LIMITS = ("max_image_bytes", "max_image_pixels", "max_aspect_ratio", "max_question_chars",
          "max_answer_chars", "max_answer_tokens", "max_new_tokens_cap",
          "default_max_new_tokens", "max_overlay_side", "request_deadline_s",
          "max_response_bytes")


def describe(engine: Any, config: ServiceConfig, available: tuple[str, ...]
             ) -> api.DescribeResponse:
    """`available`: the engine's registered methods; the config may allow fewer."""
    allowed = [m for m in (config.allowed_methods or available) if m in available]
    msg = api.DescribeResponse(default_methods=list(config.default_methods))
    msg.model.name, msg.model.version = engine.model_name, engine.model_version
    for name in allowed:
        spec = get_method(name)
        info = msg.methods.add(name=name, summary=spec.summary,
                               is_default=name in config.default_methods)
        info.default_settings.update(_jsonable(engine.default_settings(name)))
        limits = {**spec.limits, **(config.method_limits or {}).get(name, {})}
        info.cost_limits.update({k: float(v) for k, v in limits.items()})
    for name in LIMITS:
        setattr(msg.limits, name, getattr(config, name))
    return msg


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    """A Struct holds JSON values: tuples become lists, None stays null."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
