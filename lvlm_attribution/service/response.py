"""Explanation (engine types) -> ExplainResponse (wire types). No method names appear here."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from .. import heatmaps
from ..api.v1 import explain_pb2 as pb
from ..schema import Explanation, MethodOutput
from .errors import ServiceError
from .validation import Job

WIRE_ENCODINGS = {"png_u8": pb.HEATMAP_ENCODING_PNG_U8, "f16_zlib": pb.HEATMAP_ENCODING_F16_ZLIB}


def answer_part(job: Job, answer: str, ids: list[int], texts: list[str], audit: bool,
                model: tuple[str, str]) -> pb.ExplainResponse:
    """The first streamed message: what the model answered, before any attribution."""
    msg = pb.ExplainResponse(request_id=job.request_id, answer=answer, audit_mode=audit,
                             part=pb.ExplainResponse.PART_ANSWER)
    pairs = enumerate(zip(ids, texts, strict=True))
    msg.tokens.extend(pb.Token(index=i, id=t, text=s) for i, (t, s) in pairs)
    msg.model.name, msg.model.version = model
    msg.image_size.width, msg.image_size.height = job.image.size
    return msg


def full_response(job: Job, expl: Explanation, audit: bool) -> pb.ExplainResponse:
    msg = pb.ExplainResponse(request_id=job.request_id, answer=expl.answer, audit_mode=audit)
    for tok in expl.tokens:
        out = msg.tokens.add(index=tok.index, id=tok.token_id, text=tok.text,
                             probability=tok.probability)
        out.weights.update({k: float(v) for k, v in tok.weights.items()})
        if tok.llr is not None:
            out.llr = tok.llr
        if tok.grounded is not None:
            out.grounded = tok.grounded
    for name in job.options.methods:
        msg.heatmaps.append(_heatmap(name, expl.methods[name], job, expl.visual_box))
        msg.method_settings[name].CopyFrom(_struct(expl.methods[name].settings))
    for name in job.options.methods:  # prompt saliency: the first method that provides one
        weights = expl.methods[name].prompt_saliency
        if weights is not None:
            msg.prompt_saliency.method = name
            msg.prompt_saliency.tokens.extend(expl.question_tokens)
            msg.prompt_saliency.weights.extend(float(w) for w in np.asarray(weights).ravel())
            break
    if expl.grounding is not None:
        msg.grounding.score = expl.grounding.score
        msg.grounding.flagged_tokens.extend(expl.grounding.flagged)
        msg.grounding.rule = expl.grounding.rule
    msg.model.name, msg.model.version = expl.model_name, expl.model_version
    msg.image_size.width, msg.image_size.height = job.image.size
    if expl.visual_box is not None:
        msg.visual_box.CopyFrom(_box(expl.visual_box))
    return msg


def _box(box: tuple[float, float, float, float]) -> pb.ImageBox:
    left, top, right, bottom = box
    return pb.ImageBox(left=left, top=top, right=right, bottom=bottom)


def error_response(request_id: str, err: ServiceError) -> pb.ExplainResponse:
    """The last message of a stream that failed after its answer went out."""
    msg = pb.ExplainResponse(request_id=request_id, part=pb.ExplainResponse.PART_ERROR)
    msg.error.http_status = err.status
    msg.error.grpc_code = err.grpc_code
    msg.error.field = err.field
    msg.error.message = err.message
    return msg


def _heatmap(name: str, out: MethodOutput, job: Job,
             box: tuple[float, float, float, float] | None) -> pb.Heatmap:
    grid = np.asarray(out.visual_map, dtype=np.float32)
    enc = heatmaps.encode(grid, job.encoding)
    msg = pb.Heatmap(method=name, height=grid.shape[0], width=grid.shape[1],
                     encoding=WIRE_ENCODINGS[job.encoding], min_value=enc.min_value,
                     max_value=enc.max_value, data=enc.data)
    if job.options.per_token_maps and out.per_token_maps is not None:
        for token_map in np.asarray(out.per_token_maps, dtype=np.float32):
            e = heatmaps.encode(token_map, job.encoding)
            msg.per_token.add(data=e.data, min_value=e.min_value, max_value=e.max_value)
    if out.faithfulness is not None:
        msg.deletion_auc = out.faithfulness["deletion_auc"]
        msg.insertion_auc = out.faithfulness["insertion_auc"]
    if job.overlay:
        # Only the region the model saw is coloured; the side cap bounds the response size.
        msg.overlay_png = heatmaps.overlay_png(job.image, grid, box=box,
                                               max_side=job.max_overlay_side)
    return msg


def _struct(settings: dict[str, Any]) -> struct_pb2.Struct:
    """Settings as a Struct; values that are not JSON (tuples, enums, paths) pass through str."""
    struct = struct_pb2.Struct()
    struct.update(json.loads(json.dumps(settings, default=str)))
    return struct
