"""Engine contract: every registered method, capture hygiene, causality, audit mode, exactness."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_attribution.capture as capture_module
from lvlm_attribution.capture import CaptureSpec, capture, leftover_state
from lvlm_attribution.context import AttributionContext, CaptureMismatch
from lvlm_attribution.engine import InvalidInput
from lvlm_attribution.methods import get_method, list_methods
from lvlm_attribution.methods.dexar import lens_gradients, reference_lens_gradients
from lvlm_attribution.schema import ExplainOptions
from lvlm_attribution.world.scenes import generate

# Cheap settings for the contract run; each method's own tests cover its defaults.
FAST_SETTINGS = {"igos": {"iterations": 1, "ig_iter": 2}}


def _ctx(explainer, seed=7, kind="color", answer=None) -> AttributionContext:
    sample = generate(seed, kind)
    return explainer.context(Image.fromarray(sample.image), sample.question,
                             answer or sample.answer)


def _fast_options(name: str, **kw) -> ExplainOptions:
    settings = {name: FAST_SETTINGS[name]} if name in FAST_SETTINGS else {}
    return ExplainOptions(methods=(name,), method_settings=settings, **kw)


@pytest.mark.parametrize("name", list_methods())
def test_registered_method_contract(name, random_llava_explainer, scene):
    """timm-style: every registered method gets these checks automatically."""
    explainer = random_llava_explainer
    image, sample = scene
    options = _fast_options(name, per_token_maps=True)
    first = explainer.explain(image, sample.question, answer=sample.answer, options=options)
    second = explainer.explain(image, sample.question, answer=sample.answer, options=options)
    assert leftover_state(explainer.model) == []
    out = first.methods[name]
    assert out.visual_map.shape == first.grid == (8, 8)
    assert np.isfinite(out.visual_map).all() and (out.visual_map >= 0).all()
    np.testing.assert_allclose(out.visual_map, second.methods[name].visual_map, rtol=1e-6)
    T = len(first.answer_token_ids)
    if out.per_token_maps is not None:
        assert out.per_token_maps.shape == (T, 8, 8)
        assert np.isfinite(out.per_token_maps).all()
    for key, values in out.token_weights.items():
        assert np.asarray(values).shape == (T,), key
        assert np.isfinite(values).all(), key
    spec = get_method(name)
    defaults = dataclasses.asdict(spec.make_config(FAST_SETTINGS.get(name)))
    assert set(out.settings) == set(defaults)
    assert isinstance(spec.needs_gradients, bool) and spec.summary


@pytest.mark.parametrize("name", list_methods())
def test_method_rejects_unknown_settings(name, random_llava_explainer, scene):
    image, sample = scene
    options = ExplainOptions(methods=(name,), method_settings={name: {"no_such_field": 1}})
    with pytest.raises(InvalidInput, match="no_such_field"):
        random_llava_explainer.explain(image, sample.question, answer=sample.answer,
                                       options=options)


def test_unknown_method_is_invalid_input(random_llava_explainer, scene):
    image, sample = scene
    with pytest.raises(InvalidInput) as err:
        random_llava_explainer.explain(image, sample.question,
                                       options=ExplainOptions(methods=("nope",)))
    assert err.value.field == "methods"


def test_capture_cleans_up_after_an_exception(random_llava_explainer):
    explainer = random_llava_explainer
    ctx = _ctx(explainer)
    spec = CaptureSpec(layers=[0, 1], rows=ctx.predict_rows, layer_outputs=True,
                       detach_layer_inputs=True)
    with pytest.raises(RuntimeError, match="boom"), capture(explainer.model, explainer.adapter,
                                                            spec):
        explainer.model(**ctx.inputs)
        raise RuntimeError("boom")
    assert leftover_state(explainer.model) == []
    # and a plain forward afterwards is the plain SDPA forward again
    with torch.no_grad():
        again = explainer.model(**ctx.inputs, logits_to_keep=ctx.predict_rows).logits[0]
    torch.testing.assert_close(again.float(), ctx.plain_logits, rtol=0, atol=0)


def test_capture_guard_detects_a_bidirectional_mask(random_llava_explainer, monkeypatch):
    ctx = _ctx(random_llava_explainer)
    original = capture_module.eager_mask
    monkeypatch.setattr(capture_module, "eager_mask",
                        lambda *a, **k: torch.zeros_like(original(*a, **k)))
    with pytest.raises(CaptureMismatch):
        ctx.forward(CaptureSpec(rows=None))


def test_causality_gradients_vanish_from_row_t_on(random_llava_explainer):
    ctx = _ctx(random_llava_explainer)
    logits, captured = ctx.forward(CaptureSpec(rows=None))
    z = ctx.target_logits(logits)
    for t in range(ctx.num_answer_tokens):
        grads = torch.autograd.grad(z[t], list(captured.probs.values()), retain_graph=True)
        row = int(ctx.predict_rows[t])
        for g in grads:
            assert g[0, :, row + 1:].abs().max() == 0  # rows t .. N-1 carry no gradient
            assert g[0, :, row].abs().max() > 0  # row t-1 does


@pytest.mark.parametrize("fixture", ["random_llava_explainer", "embedded_explainer"])
def test_dexar_one_pass_equals_per_token_reference(fixture, request):
    explainer = request.getfixturevalue(fixture)
    ctx = _ctx(explainer, seed=3, kind="position")
    layers = list(range(explainer.adapter.num_layers))
    fast = lens_gradients(ctx, layers).cpu()
    slow = reference_lens_gradients(ctx, layers)
    scale = slow.abs().max()
    assert scale > 0
    assert (fast - slow).abs().max() <= 1e-5 * scale


def test_audit_mode_equals_generate_then_explain(embedded_explainer):
    sample = generate(21, "shape")
    image = Image.fromarray(sample.image)
    options = ExplainOptions(methods=tuple(m for m in list_methods() if m != "igos"))
    generated = embedded_explainer.explain(image, sample.question, options=options)
    assert not generated.audit_mode
    by_text = embedded_explainer.explain(image, sample.question, answer=generated.answer,
                                         options=options)
    by_ids = embedded_explainer.explain(image, sample.question,
                                        answer_token_ids=generated.answer_token_ids,
                                        options=options)
    # A generated answer's p_t and TAM's hidden states come from the generation steps, an
    # audited one's from a forward of its own: the same math in another order (float rounding);
    # maps that do not read them are bit-identical.
    for audited in (by_text, by_ids):
        assert audited.audit_mode
        assert audited.answer_token_ids == generated.answer_token_ids
        for name in options.methods:
            np.testing.assert_allclose(audited.methods[name].visual_map,
                                       generated.methods[name].visual_map, rtol=1e-5,
                                       atol=1e-7, err_msg=name)
        np.testing.assert_allclose([t.probability for t in audited.tokens],
                                   [t.probability for t in generated.tokens], rtol=1e-5)


def _energy_ratio(visual_map: np.ndarray, evidence: np.ndarray) -> float:
    """Energy inside the evidence mask relative to a uniform map's (1.0 = no better)."""
    h, w = visual_map.shape
    up = np.kron(visual_map, np.ones((evidence.shape[0] // h, evidence.shape[1] // w)))
    inside = up[evidence].sum() / max(up.sum(), 1e-12)
    return inside / evidence.mean()


@pytest.mark.parametrize("name", ["glimpse", "dexar"])
def test_heatmaps_concentrate_on_the_evidence(name, embedded_explainer):
    if name not in list_methods():
        pytest.skip(f"{name} not registered")
    ratios = []
    for i in range(20):
        sample = generate(5000 + i, ("color", "shape", "position")[i % 3])
        result = embedded_explainer.explain(Image.fromarray(sample.image), sample.question,
                                            answer=sample.answer,
                                            options=ExplainOptions(methods=(name,)))
        ratios.append(_energy_ratio(result.methods[name].visual_map, sample.evidence))
    assert np.mean(ratios) > 1.0, ratios
