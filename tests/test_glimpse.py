"""GLIMPSE: fast path == plain reference, causality, output contract, ablation switches."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_attribution.capture import CaptureSpec
from lvlm_attribution.context import AttributionContext
from lvlm_attribution.methods import get_method
from lvlm_attribution.methods.glimpse import (
    GlimpseConfig,
    _token_gradients,
    attention_gradients,
    attribute,
    propagate_row,
    reference_glimpse,
)
from lvlm_attribution.world.scenes import generate

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = Path(os.environ.get("LVLM_TEST_MODEL_DIR",
                                   ROOT / "model_store" / "tiny-shapes-llava"))
TOLERANCE = 1e-5  # max |fast - reference| / max |reference|, fp32 fast vs float64 reference


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is faster, and 10-30x faster on a loaded 2-core box
    (OpenMP workers spin against each other). Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _context(explainer, seed: int = 7, kind: str = "color") -> AttributionContext:
    sample = generate(seed, kind)
    return explainer.context(Image.fromarray(sample.image), sample.question, sample.answer)


@pytest.fixture(scope="module")
def ctx(random_llava_explainer) -> AttributionContext:
    return _context(random_llava_explainer)  # "the square is green": 4 answer tokens


@pytest.fixture(scope="module")
def default_output(ctx):
    return attribute(ctx, GlimpseConfig())


def _relative(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _assert_same(fast, ref) -> None:
    assert _relative(fast.visual_map, ref.visual_map) <= TOLERANCE
    assert _relative(fast.per_token_maps, ref.per_token_maps) <= TOLERANCE
    assert _relative(fast.prompt_saliency, ref.prompt_saliency) <= TOLERANCE
    assert fast.token_weights.keys() == ref.token_weights.keys()
    for key in fast.token_weights:
        assert _relative(fast.token_weights[key], ref.token_weights[key]) <= TOLERANCE, key
    for key in ("alpha", "head_weights"):
        assert _relative(fast.extras[key], ref.extras[key]) <= TOLERANCE, key


VARIANTS = [
    {},
    {"relevance_flow": True, "propagation": "literal", "depth_prior_form": "literal"},
    {"head_average": True, "last_fraction": 0.6, "token_chunk": 3, "confidence": False},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=["default", "literal+flow", "ablations"])
def test_fast_matches_reference_random_weights(ctx, overrides):
    cfg = GlimpseConfig(**overrides)
    _assert_same(attribute(ctx, cfg), reference_glimpse(ctx, cfg))


def test_fast_matches_reference_embedded_model(request):
    if not (EMBEDDED_DIR / "config.json").is_file():
        pytest.skip(f"no embedded model at {EMBEDDED_DIR} (set LVLM_TEST_MODEL_DIR)")
    explainer = request.getfixturevalue("embedded_explainer")
    context = _context(explainer, seed=3, kind="shape")
    for cfg in (GlimpseConfig(), GlimpseConfig(token_chunk=2, relevance_flow=True)):
        fast = attribute(context, cfg)
        assert fast.extras["gradient_mode"] == "batched"
        _assert_same(fast, reference_glimpse(context, cfg))


def test_gradients_are_causal_and_batched_equals_loop(ctx):
    layers = list(range(ctx.adapter.num_layers))
    grads = attention_gradients(ctx, layers)  # (T, L, H, N, N)
    for t, row in enumerate(ctx.predict_rows.tolist()):
        assert torch.count_nonzero(grads[t, :, :, row + 1:]) == 0  # rows >= t: exactly zero
        assert torch.count_nonzero(grads[t, :, :, row]) > 0  # row t-1 carries the signal
    logits, captured = ctx.forward(CaptureSpec())
    z = ctx.target_logits(logits)
    probs = [captured.probs[layer] for layer in layers]
    tokens = torch.arange(ctx.num_answer_tokens)
    batched, mode = _token_gradients(z, probs, tokens)
    assert mode == "batched"
    for t in tokens.tolist():
        loop = torch.autograd.grad(z[t], probs, retain_graph=True)
        for b, g in zip(batched, loop, strict=True):
            assert torch.equal(b[t], g[0])


def test_row_propagation_equals_matrix_product():
    torch.manual_seed(0)
    n, layers = 6, 3
    fused = torch.rand(1, layers, n, n, dtype=torch.float64)
    alpha = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    for form, c in (("additive", 1.0), ("literal", 2.0)):
        full = torch.eye(n, dtype=torch.float64)
        for i in range(layers):  # R <- c R + α Ā R: later layers on the left
            full = c * full + alpha[0, i] * fused[0, i] @ full
        row = propagate_row(fused, alpha, torch.tensor([4]), GlimpseConfig(propagation=form))
        torch.testing.assert_close(row[0], full[4], rtol=1e-12, atol=1e-12)


def test_output_contract(ctx, default_output):
    out = default_output
    t = ctx.num_answer_tokens
    assert out.visual_map.shape == (8, 8) and out.visual_map.dtype == np.float32
    assert out.per_token_maps.shape == (t, 8, 8)
    for m in (out.visual_map, out.per_token_maps, out.prompt_saliency):
        assert np.isfinite(m).all() and (m >= 0).all()
    assert out.visual_map.sum() > 0
    assert out.prompt_saliency.shape == (len(ctx.question_positions),)
    assert set(out.token_weights) == {"beta", "beta_prompt", "joint", "visual_alignment",
                                      "prompt_alignment"}
    for key in ("beta", "beta_prompt", "joint"):
        assert out.token_weights[key].shape == (t,)
        assert abs(out.token_weights[key].sum() - 1) < 1e-5
    np.testing.assert_allclose(out.per_token_maps.sum(axis=(1, 2)), 1, rtol=1e-5)
    assert out.extras["alpha"].shape == (t, ctx.adapter.num_layers)
    np.testing.assert_allclose(out.extras["alpha"].sum(1), 1, rtol=1e-5)
    assert out.settings == dataclasses.asdict(GlimpseConfig())
    assert get_method("glimpse").attribute is attribute


ABLATIONS = [{"prompt_weighting": False}, {"confidence": False}, {"head_average": True},
             {"depth_prior": False}, {"layer_relevance": False}, {"last_fraction": 0.6},
             {"depth_prior_form": "literal"}, {"propagation": "literal"}]


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda o: next(iter(o)))
def test_each_switch_changes_the_output(ctx, default_output, overrides):
    out = attribute(ctx, GlimpseConfig(**overrides))
    changed = _relative(out.visual_map, default_output.visual_map) > 1e-4 or any(
        _relative(out.token_weights[k], default_output.token_weights[k]) > 1e-4
        for k in ("beta", "beta_prompt", "joint"))
    assert changed, overrides
    if "last_fraction" in overrides:
        assert (out.extras["alpha"][:, :2] == 0).all()  # 4 layers, last 60% = 2 propagate


def test_relevance_flow_moves_function_words_onto_content_words(ctx, default_output):
    out = attribute(ctx, GlimpseConfig(relevance_flow=True, flow_strength=0.5))
    for key in ("beta", "beta_prompt", "joint"):  # the maps and their weights are untouched
        np.testing.assert_array_equal(out.token_weights[key], default_output.token_weights[key])
    np.testing.assert_array_equal(out.visual_map, default_output.visual_map)
    joint, display = out.token_weights["joint"], out.token_weights["display"]
    # "the square is green": "the" has no earlier content word (keeps its mass); "is" gives half
    # of its mass to "square", the only earlier content word.
    assert ctx.answer_token_texts() == ["the", "square", "is", "green"]
    np.testing.assert_allclose(display, [joint[0], joint[1] + joint[2] / 2, joint[2] / 2,
                                         joint[3]], rtol=1e-6)


@pytest.mark.parametrize("bad", [{"tau": 0}, {"depth_prior_form": "x"}, {"propagation": "x"},
                                 {"last_fraction": 0.0}, {"flow_strength": 2.0},
                                 {"flow_links": "x"}, {"token_chunk": 0}])
def test_invalid_settings_raise(bad):
    with pytest.raises(ValueError):
        get_method("glimpse").make_config(bad)


def test_loop_fallback_gives_the_same_result(ctx, default_output, monkeypatch):
    real_grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("simulated: no batching rule")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    out = attribute(ctx, GlimpseConfig())
    assert out.extras["gradient_mode"] == "loop"
    assert _relative(out.visual_map, default_output.visual_map) <= TOLERANCE
    for key in default_output.token_weights:
        assert _relative(out.token_weights[key], default_output.token_weights[key]) <= TOLERANCE
