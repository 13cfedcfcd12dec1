"""The trust score on every map (HeatmapOptions.faithfulness): the same deletion/insertion AUC
that `lvlm-attribution evaluate` reports (its *_llr columns), computed on the region the model
saw, through the service over its wire format."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.evaluation.run import EvalConfig, evaluate_scene, fill_colour, parse_methods
from lvlm_attribution.schema import ExplainOptions
from lvlm_attribution.service import ExplainService, ServiceConfig
from lvlm_attribution.world.scenes import generate


def png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("seed", [0, 4])
def test_equals_the_evaluation_on_a_world_scene(embedded_explainer, seed) -> None:
    sample = generate(seed)
    cfg = EvalConfig(scenes=1, methods="dexar,glimpse", ppl_points=2)
    record = evaluate_scene(embedded_explainer, sample, 0, parse_methods(cfg.methods), cfg,
                            fill_colour(cfg))
    expl = embedded_explainer.explain(Image.fromarray(sample.image), sample.question,
                                      answer=record["answer"],
                                      options=ExplainOptions(methods=("dexar", "glimpse"),
                                                             faithfulness=True))
    for name in ("dexar", "glimpse"):
        got = expl.methods[name].faithfulness
        want = record["metrics"][name]
        assert got["deletion_auc"] == pytest.approx(want["deletion_llr"], abs=1e-4), name
        assert got["insertion_auc"] == pytest.approx(want["insertion_llr"], abs=1e-4), name
    assert "faithfulness" in expl.timings


def test_in_the_response_and_on_the_cropped_region(embedded_explainer) -> None:
    sample = generate(2, "color")
    wide = Image.fromarray(sample.image).resize((96, 64), Image.NEAREST)  # centre-cropped
    service = ExplainService(embedded_explainer, ServiceConfig())
    req = pb.ExplainRequest(image=png(wide), question=sample.question, methods=["dexar"],
                            heatmaps=pb.HeatmapOptions(faithfulness=True))
    call = service.call({"request": req.SerializeToString()}, "grpc")
    resp = pb.ExplainResponse.FromString(next(iter(call.replies())).body)
    heat = resp.heatmaps[0]
    assert heat.HasField("deletion_auc") and heat.HasField("insertion_auc")
    assert math.isfinite(heat.deletion_auc) and math.isfinite(heat.insertion_auc)
    assert (resp.visual_box.left, resp.visual_box.right) == (16, 80)
    plain = pb.ExplainRequest(image=png(wide), question=sample.question, methods=["dexar"])
    call = service.call({"request": plain.SerializeToString()}, "grpc")
    assert not pb.ExplainResponse.FromString(next(iter(call.replies())).body).heatmaps[
        0].HasField("deletion_auc")
