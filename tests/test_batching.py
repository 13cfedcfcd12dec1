"""explain_batch: every request's result equals the single-request result (fp32, ≤ 1e-5).

Requests differ in question length and answer length, so padding (left for generation, right
for the teacher-forced passes) and the union of predicting rows are exercised. Single requests
get their plain logits from a forward of their own (audit mode) or from generation; the batched
passes (one LLR forward, one DEX-AR forward+backward) must reproduce them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_attribution.capture import leftover_state
from lvlm_attribution.context import AttributionContext, ContextBatch
from lvlm_attribution.engine import Explainer, InvalidInput
from lvlm_attribution.llr import batch_llr
from lvlm_attribution.methods.dexar import batch_lens_attention_and_gradients, lens_gradients
from lvlm_attribution.methods.registry import get_method, list_methods
from lvlm_attribution.models.tiny import build_tiny
from lvlm_attribution.schema import BatchItem, ExplainOptions
from lvlm_attribution.world.scenes import generate

TOL = 1e-5


def _image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _assert_same(batch, single):
    assert batch.answer_token_ids == single.answer_token_ids
    assert batch.answer == single.answer
    assert batch.audit_mode == single.audit_mode
    assert batch.grid == single.grid
    for tb, ts in zip(batch.tokens, single.tokens, strict=True):
        assert tb.token_id == ts.token_id and tb.text == ts.text
        assert abs(tb.probability - ts.probability) <= TOL
        assert abs(tb.llr - ts.llr) <= TOL
        assert set(tb.weights) == set(ts.weights)
        for key in tb.weights:
            assert abs(tb.weights[key] - ts.weights[key]) <= TOL, key
    assert (batch.grounding is None) == (single.grounding is None)
    if single.grounding is not None:
        assert batch.grounding.flagged == single.grounding.flagged
        assert batch.grounding.rule == single.grounding.rule
        assert abs(batch.grounding.score - single.grounding.score) <= TOL
        assert [t.grounded for t in batch.tokens] == [t.grounded for t in single.tokens]
    assert set(batch.methods) == set(single.methods)
    for name, mb in batch.methods.items():
        ms = single.methods[name]
        np.testing.assert_allclose(mb.visual_map, ms.visual_map, atol=TOL, rtol=0, err_msg=name)
        if ms.per_token_maps is not None:
            np.testing.assert_allclose(mb.per_token_maps, ms.per_token_maps, atol=TOL, rtol=0)
        assert mb.settings == ms.settings


@pytest.fixture(scope="module")
def llava():
    model, processor = build_tiny("llava")
    return Explainer(model, processor, "tiny-llava", "random")


def test_batch_inputs_pad_left_and_right(llava):
    pad = llava.adapter.pad_token_id
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "pixel_values": torch.zeros(1, 3, 2, 2)}
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.tensor([[1]]),
         "pixel_values": torch.ones(1, 3, 2, 2)}
    left = llava.adapter.batch_inputs([a, b], side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    right = llava.adapter.batch_inputs([a, b], side="right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["pixel_values"].shape == (2, 3, 2, 2)


def test_batchable_is_a_declared_capability():
    assert {n for n in list_methods() if get_method(n).batchable} >= {"dexar", "attngrad"}


def test_batch_equals_single_generate_mode(llava):
    """Generated answers (left-padded batch generate) + DEX-AR and a per-request method."""
    questions = ["what color is the circle", "how many objects are there",
                 "what shape is at the top left of the image"]
    items = [BatchItem(_image(i, 32), q) for i, q in enumerate(questions)]
    options = ExplainOptions(methods=("dexar", "rollout"), max_new_tokens=5, per_token_maps=True)
    batch = llava.explain_batch(items, options)
    assert leftover_state(llava.model) == []
    for item, got in zip(items, batch, strict=True):
        _assert_same(got, llava.explain(item.image, item.question, options=options))


def test_batch_equals_single_audit_mode_with_dexar_variants(llava):
    """Given answers of different lengths; DEX-AR's official normalization reads every key of
    the request's own sequence (not the batch's padding)."""
    items = [BatchItem(_image(3, 32), "what color is the square", answer="red"),
             BatchItem(_image(4, 32), "where is the triangle",
                       answer="top left of the image"),
             (_image(5, 32), "how many objects", "three")]
    for settings in ({}, {"normalization": "official", "last_k_layers": 1,
                          "skip_first_text_token": True}):
        options = ExplainOptions(methods=("dexar",), per_token_maps=True,
                                 method_settings={"dexar": settings})
        batch = llava.explain_batch(items, options)
        for raw, got in zip(items, batch, strict=True):
            item = raw if isinstance(raw, BatchItem) else BatchItem(*raw)
            _assert_same(got, llava.explain(item.image, item.question, answer=item.answer,
                                            options=options))


def test_batch_mixed_modes_on_the_embedded_architecture(random_llava_explainer):
    explainer = random_llava_explainer
    samples = [generate(s, k) for s, k in ((1, "color"), (2, "count"), (3, "position"))]
    items = [BatchItem(Image.fromarray(s.image), s.question,
                       answer=s.answer if i != 1 else None) for i, s in enumerate(samples)]
    options = ExplainOptions(methods=("dexar", "glimpse"), max_new_tokens=4)
    batch = explainer.explain_batch(items, options)
    for item, got in zip(items, batch, strict=True):
        _assert_same(got, explainer.explain(item.image, item.question, answer=item.answer,
                                            options=options))


def test_batch_stages_equal_single_qwen():
    """Qwen2.5-VL: mrope positions from the padded attention mask, patch tensors concatenated;
    stage by stage (generation, plain logits, DEX-AR gradients), then end to end."""
    model, processor = build_tiny("qwen2_5_vl")
    explainer = Explainer(model, processor, "tiny-qwen", "random")
    questions = ["what color is the circle", "where is it", "how many objects are there"]
    prompts = [explainer.prepare(_image(i, 56), q) for i, q in enumerate(questions)]
    answered = explainer.answer([BatchItem(_image(i, 56), q) for i, q in enumerate(questions)],
                                ExplainOptions(max_new_tokens=3))
    assert [a.ids for a in answered] == [explainer.generate_ids(p, 3) for p in prompts]
    for a, prompt in zip(answered, prompts, strict=True):  # generation logits = a forward's
        if a.ids:
            alone = AttributionContext(model, explainer.adapter, prompt, a.ids)
            torch.testing.assert_close(a.logits, alone.plain_logits, atol=1e-4, rtol=0)
    words = [["red", "circle"], ["top", "left", "of", "the"], ["three"]]
    ids = [explainer.tokenizer.convert_tokens_to_ids(w) for w in words]
    contexts = [AttributionContext(model, explainer.adapter, p, a)
                for p, a in zip(prompts, ids, strict=True)]
    singles = [AttributionContext(model, explainer.adapter, p, a)
               for p, a in zip(prompts, ids, strict=True)]
    batch_llr(contexts)  # one forward: every request's plain logits and LLR
    pairs = batch_lens_attention_and_gradients(ContextBatch(contexts), [0, 1])
    for ctx, single, (_, g) in zip(contexts, singles, pairs, strict=True):
        torch.testing.assert_close(ctx.plain_logits, single.plain_logits, atol=TOL, rtol=0)
        torch.testing.assert_close(g, lens_gradients(single, [0, 1]), atol=TOL, rtol=0)
    # End to end, generate and audit modes: every field equals `explain` alone.
    items = [BatchItem(_image(0, 56), questions[0], answer_token_ids=ids[0]),
             BatchItem(_image(1, 56), questions[1], answer_token_ids=ids[1]),
             BatchItem(_image(2, 56), questions[2])]
    options = ExplainOptions(methods=("dexar",), max_new_tokens=3, per_token_maps=True)
    batch = explainer.explain_batch(items, options)
    for item, got in zip(items, batch, strict=True):
        _assert_same(got, explainer.explain(item.image, item.question,
                                            answer_token_ids=item.answer_token_ids,
                                            options=options))


def test_batch_reports_the_bad_item(llava):
    items = [BatchItem(_image(0, 32), "what color"), BatchItem(_image(1, 32), "  ")]
    with pytest.raises(InvalidInput) as err:
        llava.explain_batch(items)
    assert err.value.field == "items[1].question"
    assert llava.explain_batch([]) == []
