"""Adapter contract tests, timm-style: every registered adapter is tested automatically on the tiny
random-weight model of its class (`lvlm_attribution.models.tiny.TINY_BUILDERS`; registering an
adapter without a tiny builder fails `test_every_adapter_has_a_tiny_model`).

All checks run in fp32 on CPU. Notation as in DESIGN §3: answer token y_t sits at position
p_t = prompt_length + t and is predicted by row p_t - 1.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_attribution import capture as capture_module
from lvlm_attribution.capture import CaptureSpec, capture
from lvlm_attribution.context import AttributionContext
from lvlm_attribution.engine import Explainer
from lvlm_attribution.methods.dexar import lens_gradients, reference_lens_gradients
from lvlm_attribution.models import supported_model_classes
from lvlm_attribution.models.tiny import TINY_BUILDERS
from lvlm_attribution.schema import ExplainOptions

QUESTION = "what color is the square ?"
ANSWER = "the square is red"
MODEL_CLASSES = supported_model_classes()
EXACT = 1e-5  # fp32


def test_every_adapter_has_a_tiny_model():
    assert set(MODEL_CLASSES) <= set(TINY_BUILDERS), "add a tiny builder for each new adapter"


@pytest.fixture(scope="module", params=MODEL_CLASSES)
def explainer(request) -> Explainer:
    model, processor = TINY_BUILDERS[request.param](seed=0)
    assert type(model).__name__ == request.param
    return Explainer(model, processor, f"tiny-{request.param}", "random")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """Non-square (56 x 42), so Qwen's dynamic grid is not square and LLaVA's crop is active."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (42, 56, 3), dtype=np.uint8))


@pytest.fixture
def ctx(explainer, image) -> AttributionContext:
    return explainer.context(image, QUESTION, ANSWER)


def allowed_keys(ctx: AttributionContext) -> torch.Tensor:
    """(N, N) bool: key j is visible from query row i. Causal, plus, for a prefix-LM, every
    prefix key from every prefix row (the prefix is the whole prompt: image, text, "\\n")."""
    n = ctx.seq_len
    allowed = torch.ones(n, n).tril().bool()
    if ctx.adapter.prefix_lm:
        p = ctx.prompt.prompt_length
        allowed[:p, :p] = True
    return allowed


# ---- (a) the capture forward reproduces the plain forward, masks intact ------------------------
def test_capture_forward_matches_plain_forward(ctx):
    with torch.no_grad():
        plain = ctx.model(**ctx.inputs).logits
    logits, captured = ctx.forward(CaptureSpec(), check=False)
    diff = (logits.detach() - plain).abs().max().item()
    assert diff <= EXACT, f"capture differs from plain forward by {diff:.3g} (all rows)"
    assert sorted(captured.probs) == list(range(ctx.adapter.num_layers))


def test_capture_mask_semantics(ctx):
    """Captured probabilities are > 0 exactly where the mask allows: strictly causal for causal
    decoders; for a prefix-LM (PaliGemma) a prefix row attends to LATER prefix keys
    (bidirectional prefix), answer rows are causal and no prefix row sees an answer key."""
    _, captured = ctx.forward(CaptureSpec(), check=False)
    allowed = allowed_keys(ctx)
    for layer, probs in captured.probs.items():
        a = probs.detach()[0]  # (H, N, N)
        assert torch.all(a[:, ~allowed] == 0), f"layer {layer} attends to a masked key"
        assert torch.all(a[:, allowed] > 0), f"layer {layer} masks an allowed key"
    if ctx.adapter.prefix_lm:
        p = ctx.prompt.prompt_length
        a = captured.probs[0].detach()[0]
        assert a[:, 0, p - 1].min() > 0, "first prefix token must see the last prefix token"
        assert torch.all(a[:, p:, :][:, allowed[p:] == 0] == 0)
        assert torch.all(a[:, :p, p:] == 0), "a prefix row must not see the answer"


def test_capture_row_subset_matches(ctx):
    """Capturing only the predicting rows (explicit softmax there, SDPA elsewhere) is exact."""
    with torch.no_grad():
        plain = ctx.model(**ctx.inputs).logits
    logits, captured = ctx.forward(CaptureSpec(rows=ctx.predict_rows), check=False)
    assert (logits.detach() - plain).abs().max().item() <= EXACT
    assert captured.probs[0].shape[2] == len(ctx.predict_rows)


# ---- (b) visual positions -----------------------------------------------------------------------
def test_visual_positions_are_the_image_tokens(explainer, image):
    prompt = explainer.prepare(image, QUESTION)
    ids = prompt.model_inputs["input_ids"][0]
    image_token = explainer.model.config.image_token_id
    h, w = prompt.grid
    assert len(prompt.visual_positions) == h * w
    assert torch.equal(prompt.visual_positions, torch.nonzero(ids == image_token).flatten())
    assert torch.equal(prompt.visual_positions,
                       torch.arange(int(prompt.visual_positions[0]),
                                    int(prompt.visual_positions[0]) + h * w))
    left, top, right, bottom = prompt.grid_box
    assert 0 <= left < right <= image.size[0] and 0 <= top < bottom <= image.size[1]
    assert prompt.image_size == image.size


def test_visual_token_count_matches_the_vision_tower(ctx):
    """The model's own image features fill exactly the visual positions."""
    with torch.no_grad():
        out = ctx.model.model.get_image_features(**ctx.adapter.image_inputs(ctx.inputs))
    features = out.pooler_output
    count = sum(f.shape[0] for f in features) if isinstance(features, (tuple, list)) \
        else features.shape[0] * features.shape[1]
    assert count == len(ctx.visual_positions)


# ---- (c) question positions ---------------------------------------------------------------------
def test_question_positions_decode_to_the_question(explainer, image):
    prompt = explainer.prepare(image, QUESTION)
    ids = prompt.model_inputs["input_ids"][0]
    text = explainer.tokenizer.decode(ids[prompt.question_positions], skip_special_tokens=False)
    assert text.strip() == QUESTION
    assert not set(prompt.question_positions.tolist()) & set(prompt.visual_positions.tolist())
    special = set(explainer.tokenizer.all_special_ids)
    assert not special & set(ids[prompt.question_positions].tolist()), "template tokens included"
    assert len(prompt.question_tokens) == len(prompt.question_positions)


# ---- (d) DEX-AR fast path == reference ---------------------------------------------------------
def test_dexar_fast_path_matches_reference(ctx):
    layers = list(range(ctx.adapter.num_layers))
    fast = lens_gradients(ctx, layers)
    ref = reference_lens_gradients(ctx, layers)
    assert fast.shape == ref.shape == (len(layers), fast.shape[1], len(ctx.answer_ids), ctx.seq_len)
    rel = ((fast - ref).abs().max() / ref.abs().max()).item()
    assert rel <= EXACT, f"fast DEX-AR gradients differ from the reference by {rel:.3g} (rel)"


# ---- (e) causality of the gradients -------------------------------------------------------------
def test_gradients_are_causal(ctx):
    """For every answer token t and layer l, dz_t/dA^l (full graph, no detaching) is zero on every
    row >= p_t: all these rows are answer rows, which are causal in every family (PaliGemma's
    answer is its causal suffix and no prefix row sees an answer key). Row p_t - 1 is nonzero.
    For a prefix-LM the gradient also reaches prefix rows through keys LATER than the row (the
    bidirectional prefix): checked to be nonzero."""
    logits, captured = ctx.forward(CaptureSpec(), check=False)
    z = ctx.target_logits(logits)
    layers = sorted(captured.probs)
    probs = [captured.probs[layer] for layer in layers]
    p = ctx.prompt.prompt_length
    for t in range(len(ctx.answer_ids)):
        grads = torch.autograd.grad(z[t], probs, retain_graph=True)
        pos = int(ctx.answer_positions[t])
        for layer, g in zip(layers, grads, strict=True):
            assert torch.all(g[0, :, pos:] == 0), f"token {t}, layer {layer}: rows >= t not zero"
            assert g[0, :, pos - 1].abs().max() > 0
        if ctx.adapter.prefix_lm:
            later = torch.ones(p, p).triu(1).bool()
            assert grads[0][0, :, :p, :p][:, later].abs().max() > 0


# ---- (f) nothing left behind -------------------------------------------------------------------
def hook_counts(model) -> dict[str, int]:
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks)
            for name, m in model.named_modules()}


def leftover_state(model, before: dict[str, int]) -> list[str]:
    """capture.leftover_state (registrations, implementations, our hooks) plus any change in
    the number of hooks on any module since `before`."""
    check = capture_module.leftover_state
    if len(inspect.signature(check).parameters) == 2:  # older form: (model, hook_snapshot)
        problems = check(model, capture_module.hook_snapshot(model))
    else:
        problems = check(model)
    after = hook_counts(model)
    return problems + [f"hook count changed on {n}" for n in after if after[n] != before.get(n)]


def test_capture_leaves_nothing_behind(ctx):
    before = hook_counts(ctx.model)
    implementations = ctx.model.config._attn_implementation
    lens_gradients(ctx, list(range(ctx.adapter.num_layers)))
    assert leftover_state(ctx.model, before) == []
    spec = CaptureSpec(layer_outputs=True, detach_layer_inputs=True)
    with pytest.raises(RuntimeError, match="boom"), capture(ctx.model, ctx.adapter, spec):
        ctx.model(**ctx.inputs)
        raise RuntimeError("boom")
    assert leftover_state(ctx.model, before) == []

    def fail(module, args):  # an error inside the decoder, after layer 0 was captured
        raise ValueError("mid-forward")

    handle = ctx.adapter.decoder_layers()[-1].register_forward_pre_hook(fail)
    try:
        with (pytest.raises(ValueError, match="mid-forward"), torch.enable_grad(),
              capture(ctx.model, ctx.adapter, spec) as captured):
            ctx.model(**ctx.inputs)
        assert 0 in captured.probs
    finally:
        handle.remove()
    assert leftover_state(ctx.model, before) == []
    assert ctx.model.config._attn_implementation == implementations


# ---- (g) generate, then audit the generated ids: identical maps ---------------------------------
def test_generate_then_audit_gives_identical_maps(explainer, image):
    """Generation primes p_t (its logits) and TAM's hidden states (recorded during the steps);
    audit mode computes both with forwards of their own: the same results."""
    options = ExplainOptions(methods=("tam",), max_new_tokens=3, per_token_maps=True)
    generated = explainer.explain(image, QUESTION, options=options)
    audited = explainer.explain(image, QUESTION, answer_token_ids=generated.answer_token_ids,
                                options=options)
    np.testing.assert_allclose(generated.methods["tam"].per_token_maps,
                               audited.methods["tam"].per_token_maps, atol=1e-5)
    options = ExplainOptions(methods=("dexar",), max_new_tokens=3, per_token_maps=True)
    generated = explainer.explain(image, QUESTION, options=options)
    audited = explainer.explain(image, QUESTION, answer_token_ids=generated.answer_token_ids,
                                options=options)
    assert not generated.audit_mode and audited.audit_mode
    assert generated.answer_token_ids == audited.answer_token_ids
    a, b = generated.methods["dexar"], audited.methods["dexar"]
    assert a.visual_map.shape == tuple(generated.grid)
    assert np.isfinite(a.visual_map).all()
    assert np.array_equal(a.visual_map, b.visual_map)
    assert np.array_equal(a.per_token_maps, b.per_token_maps)
    # p_t comes from generation's own logits (generated) vs a teacher-forced forward (audit):
    # the same math in another order, equal to float rounding.
    np.testing.assert_allclose([t.probability for t in generated.tokens],
                               [t.probability for t in audited.tokens], rtol=1e-5, atol=1e-7)


def test_teacher_forcing_reproduces_generation_logits(explainer, image):
    """The teacher-forced [prompt | answer] forward gives the logits generation saw (Qwen: mrope
    positions recomputed from mm_token_type_ids; PaliGemma: answer = causal suffix)."""
    prompt = explainer.prepare(image, QUESTION)
    with torch.no_grad():
        out = explainer.model.generate(**prompt.model_inputs, max_new_tokens=4, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[0, prompt.prompt_length:].tolist()
    ctx = AttributionContext(explainer.model, explainer.adapter, prompt, ids)
    generated = torch.stack(out.logits)[: len(ids), 0].float()
    assert (generated - ctx.plain_logits).abs().max().item() <= EXACT


# ---- family specifics: the inputs that keep positions and masks right ---------------------------
def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("explainer", ["Qwen2_5_VLForConditionalGeneration"], indirect=True)
def test_qwen_geometry_and_mrope_inputs(explainer, image):
    prompt = explainer.prepare(image, QUESTION)
    t, h, w = prompt.model_inputs["image_grid_thw"][0].tolist()
    assert prompt.grid == (t * h // 2, w // 2) == (3, 4)  # 56x42 px, 14 px merged tokens
    assert prompt.grid_box == (0.0, 0.0, 56.0, 42.0)  # resized whole, no crop
    ids = prompt.model_inputs["input_ids"][0]
    config = explainer.model.config
    assert ids[prompt.visual_positions[0] - 1] == config.vision_start_token_id
    assert ids[prompt.visual_positions[-1] + 1] == config.vision_end_token_id
    ctx = AttributionContext(explainer.model, explainer.adapter, prompt,
                             explainer.encode_answer(ANSWER))
    inputs = ctx.inputs
    assert inputs["mm_token_type_ids"][0, prompt.prompt_length:].eq(0).all()
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    # Without mm_token_type_ids the model falls back to 1D positions: the logits change.
    assert (_logits(explainer.model, without) - _logits(explainer.model, inputs)).abs().max() > 1e-4


@pytest.mark.parametrize("explainer", ["PaliGemmaForConditionalGeneration"], indirect=True)
def test_paligemma_prefix_layout_and_token_types(explainer, image):
    prompt = explainer.prepare(image, QUESTION)
    ids = prompt.model_inputs["input_ids"][0]
    n = len(prompt.visual_positions)
    assert prompt.visual_positions.tolist() == list(range(n))  # image tokens first
    assert ids[n] == explainer.tokenizer.bos_token_id
    assert explainer.tokenizer.convert_ids_to_tokens(int(ids[-1])) == "\n"
    assert "labels" not in prompt.model_inputs
    assert explainer.adapter.prefix_lm
    ctx = AttributionContext(explainer.model, explainer.adapter, prompt,
                             explainer.encode_answer(ANSWER))
    types = ctx.inputs["token_type_ids"][0]
    assert types[: prompt.prompt_length].eq(0).all() and types[prompt.prompt_length:].eq(1).all()
    # All-zero token types would make the answer part of the bidirectional prefix.
    as_prefix = {**ctx.inputs, "token_type_ids": torch.zeros_like(ctx.inputs["token_type_ids"])}
    rows = ctx.predict_rows
    diff = (_logits(explainer.model, as_prefix)[0, rows]
            - _logits(explainer.model, ctx.inputs)[0, rows]).abs().max()
    assert diff > 1e-4


@pytest.mark.parametrize("explainer", ["Qwen2_5_VLForConditionalGeneration"], indirect=True)
def test_qwen_patch_layout_round_trip(explainer, image):
    """pixel_values (flattened patches) <-> (B, C, H, W) processed images: exact both ways, frame
    0 is the normalized image itself, and a batch of converted images runs as a batch."""
    adapter = explainer.adapter
    prompt = explainer.prepare(image, QUESTION)
    pv, grid = prompt.model_inputs["pixel_values"], prompt.model_inputs["image_grid_thw"]
    images = adapter.patches_to_images(pv, grid)
    assert images.shape == (1, 3, 42, 56)
    proc = explainer.processor.image_processor
    pixels = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    mean = torch.tensor(proc.image_mean)[:, None, None]
    std = torch.tensor(proc.image_std)[:, None, None]
    assert (images[0] - (pixels - mean) / std).abs().max() <= 1e-6  # 56x42 is not resized
    again, grid_again = adapter.images_to_patches(images)
    assert torch.equal(again, pv) and torch.equal(grid_again, grid)
    assert prompt.extras["image"].size == image.size
    batch_pv, batch_grid = adapter.images_to_patches(torch.cat([images, torch.zeros_like(images)]))
    inputs = {k: v.expand(2, *v.shape[1:]) for k, v in prompt.model_inputs.items()
              if k not in ("pixel_values", "image_grid_thw")}
    batched = _logits(explainer.model, {**inputs, "pixel_values": batch_pv,
                                        "image_grid_thw": batch_grid})
    single = _logits(explainer.model, prompt.model_inputs)
    assert (batched[0] - single[0]).abs().max() <= EXACT
    assert (batched[1] - single[0]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "paligemma"])
def test_perturbation_methods_run_on_every_family(family):
    """LLR (every request) and iGOS++ composite in processed pixel space via the adapter."""
    from lvlm_attribution.models.tiny import build_tiny
    from lvlm_attribution.world.scenes import generate

    model, processor = build_tiny(family)
    explainer = Explainer(model, processor, f"tiny-{family}", "random")
    image = Image.fromarray(generate(4).image).resize((56, 42))
    options = ExplainOptions(methods=("igos",), method_settings={"igos": {"iterations": 1,
                                                                          "ig_iter": 2}})
    result = explainer.explain(image, QUESTION, answer="the square is red", options=options)
    assert all(t.llr is not None and np.isfinite(t.llr) for t in result.tokens)
    assert np.isfinite(result.methods["igos"].visual_map).all()
