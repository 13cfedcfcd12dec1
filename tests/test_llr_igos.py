"""Perturbation tools and LLR token selection (papers 002/003): exact numbers, fp32, CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_attribution.context import AttributionContext
from lvlm_attribution.llr import (
    is_stop_token,
    llr_logprobs,
    select_tokens,
    select_tokens_detailed,
    token_llr,
)
from lvlm_attribution.perturbation import (
    answer_logprobs,
    baseline_pixel_values,
    blur_array,
    blur_baseline,
    blur_kernel_size,
    composite,
    gaussian_kernel_1d,
    make_baseline,
    reflect101_index,
    source_image,
)


def make_ctx(explainer, scene) -> AttributionContext:
    image, sample = scene
    return explainer.context(image, sample.question, sample.answer)


# ---- blur baseline ------------------------------------------------------------------------------
@pytest.mark.parametrize(("width", "ksize"), [(1, 101), (64, 101), (499, 101), (500, 201),
                                              (799, 201), (800, 301), (1999, 301), (2000, 501),
                                              (4096, 501)])
def test_blur_kernel_rule_by_width(width, ksize):
    assert blur_kernel_size(width) == ksize


def test_reflect101_matches_cv2_border_rule():
    # "dcb|abcd|cba" and beyond one period (kernel wider than the image).
    assert reflect101_index(np.arange(-5, 10), 4).tolist() == [1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1,
                                                               0, 1, 2, 3]


def test_blur_equals_bruteforce_convolution():
    rng = np.random.default_rng(0)
    x = rng.random((9, 11, 3))
    k = gaussian_kernel_1d(7, 2.0)
    ref = np.zeros_like(x)
    for i in range(9):
        for j in range(11):
            for a in range(7):
                for b in range(7):
                    ii = reflect101_index(np.array(i + a - 3), 9)
                    jj = reflect101_index(np.array(j + b - 3), 11)
                    ref[i, j] += k[a] * k[b] * x[ii, jj]
    np.testing.assert_allclose(blur_array(x, 7, 2.0), ref, atol=1e-12)
    # kernel (101) much wider than the image: still a weighted average (constant stays constant)
    flat = np.full((5, 6, 3), 77.0)
    np.testing.assert_allclose(blur_array(flat, 101, 100.0), flat, atol=1e-9)


def test_blur_baseline_by_hand_and_kernel_edge_cases():
    img = np.zeros((1, 3, 3), np.uint8)
    img[0, 1] = 90
    # kernel 3, sigma 1: weights (e^-.5, 1, e^-.5) / (1 + 2 e^-.5); reflect-101 border, so pixel
    # 0 sees neighbours (x=1, x=0, x=1): 2 e^-.5 * 90 / 2.21306 = 49.33 -> 49; centre 40.67 -> 41
    out = np.asarray(blur_baseline(Image.fromarray(img), 3, 1.0))
    np.testing.assert_array_equal(out[0, :, 0], [49, 41, 49])
    flat = np.full((5, 6, 3), 77, np.uint8)
    np.testing.assert_array_equal(np.asarray(blur_baseline(Image.fromarray(flat))), flat)
    # kernel 1 is the identity (cv2 copies the image), with the default sigma = k - 1 = 0 too
    rng = np.random.default_rng(1)
    odd = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(blur_baseline(Image.fromarray(odd), 1)), odd)
    for ksize, sigma in ((2, 1.0), (0, 1.0), (-3, 1.0), (5, 0.0), (5, -1.0)):
        with pytest.raises(ValueError):
            gaussian_kernel_1d(ksize, sigma)


@pytest.mark.parametrize(("shape", "ksize"), [((64, 64), None), ((37, 23), None), ((5, 3), None),
                                              ((1, 7), None), ((1, 1), None), ((64, 500), None),
                                              ((31, 17), 7), ((33, 19), 51), ((48, 64), 1)])
def test_blur_matches_opencv(shape, ksize):
    """The reference the official code calls, cv2.GaussianBlur(img, (k, k), k - 1), when
    opencv-python-headless is importable (not a dependency). cv2's float path is the exact
    Gaussian: equal to 1e-9. Its uint8 path (what the official code runs on np.asarray(PIL))
    quantizes the taps to 1/256 (bit-exact fixed point): within 2 grey levels at 64 px and more;
    more on images much narrower than the kernel (measured in the perturbation module docstring,
    not asserted here)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    k = blur_kernel_size(shape[1]) if ksize is None else ksize
    if k > 1:
        np.testing.assert_allclose(blur_array(img, k, k - 1.0),
                                   cv2.GaussianBlur(img.astype(np.float64), (k, k), k - 1),
                                   rtol=0, atol=1e-9)
    ours = np.asarray(blur_baseline(Image.fromarray(img), ksize)).astype(int)
    diff = np.abs(ours - cv2.GaussianBlur(img, (k, k), k - 1)).max()
    if k == 1:
        assert diff == 0
    elif min(shape) >= 64:
        assert diff <= 2


def test_blur_baseline_removes_spatial_detail(scene):
    image, _ = scene
    blurred = blur_baseline(image)
    assert blurred.size == image.size and blurred.mode == "RGB"
    arr = np.asarray(blurred).astype(float)
    assert arr.std(axis=(0, 1)).max() < 0.2 * np.asarray(image).astype(float).std(axis=(0, 1)).max()
    assert make_baseline(image, "zero").getextrema() == ((0, 0), (0, 0), (0, 0))
    noise_a = np.asarray(make_baseline(image, "noise", seed=3))
    assert np.array_equal(noise_a, np.asarray(make_baseline(image, "noise", seed=3)))
    with pytest.raises(ValueError):
        make_baseline(image, "nope")


def test_source_image_round_trips_the_processor(random_llava_explainer, scene):
    ctx = make_ctx(random_llava_explainer, scene)
    image, _ = scene
    recovered = np.asarray(source_image(ctx)).astype(int)
    assert np.abs(recovered - np.asarray(image.convert("RGB")).astype(int)).max() <= 1


def test_composite_is_linear_blend():
    pv, base = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    m = torch.rand(2, 1, 4, 4)
    out = composite(pv, base, m)
    assert torch.allclose(out, pv * m + base * (1 - m))
    assert torch.allclose(composite(pv, base, torch.ones(1, 1, 4, 4)), pv)
    with pytest.raises(ValueError):
        composite(torch.randn(16, 588), torch.randn(16, 588), m)


# ---- batched scorer and LLR ----------------------------------------------------------------------
def _two_forward_logprobs(ctx, pixel_values):
    """Hand-written: one plain full-logits forward for ONE image."""
    inputs = dict(ctx.inputs)
    inputs["pixel_values"] = pixel_values
    with torch.no_grad():
        logits = ctx.model(**inputs).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return torch.stack([logp[int(r), y] for r, y in zip(ctx.predict_rows, ctx.answer_ids,
                                                          strict=True)])


def test_llr_equals_two_separate_forwards(random_llava_explainer, scene):
    ctx = make_ctx(random_llava_explainer, scene)
    pv = ctx.inputs["pixel_values"]
    base = baseline_pixel_values(ctx, "blur")
    expected = _two_forward_logprobs(ctx, pv) - _two_forward_logprobs(ctx, base)
    got = token_llr(ctx)
    assert got.shape == (ctx.num_answer_tokens,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the original-image half equals the engine's own plain forward
    logp, _ = llr_logprobs(ctx)
    torch.testing.assert_close(logp.exp(), ctx.token_probabilities, atol=1e-5, rtol=0)


def test_batching_changes_nothing(random_llava_explainer, scene):
    ctx = make_ctx(random_llava_explainer, scene)
    pv = ctx.inputs["pixel_values"]
    batch = torch.cat([pv, baseline_pixel_values(ctx), pv + 0.1 * torch.randn_like(pv)])
    with torch.no_grad():
        together = answer_logprobs(ctx, batch)
        alone = torch.cat([answer_logprobs(ctx, batch[i:i + 1]) for i in range(3)])
        subset = answer_logprobs(ctx, batch, positions=[ctx.num_answer_tokens - 1])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(subset[:, 0], together[:, -1], atol=1e-5, rtol=0)
    for i in range(3):
        torch.testing.assert_close(together[i], _two_forward_logprobs(ctx, batch[i:i + 1]),
                                   atol=1e-5, rtol=0)


def test_llr_is_cached_on_the_context(random_llava_explainer, scene):
    ctx = make_ctx(random_llava_explainer, scene)
    first = llr_logprobs(ctx)
    assert llr_logprobs(ctx) is first  # no second forward
    assert ("llr_logprobs", "zero", 0) not in ctx._cache
    assert not torch.equal(token_llr(ctx, "zero"), token_llr(ctx, "blur"))


# ---- selection rules -----------------------------------------------------------------------------
def test_stop_tokens_are_tokenizer_agnostic():
    for text in ["▁The", "Ġthe", "the", ",", "▁.", "Ċ", " ", "</s>", "##of", "?!"]:
        assert is_stop_token(text), text
    for text in ["▁cat", "Ġred", "square", "no", "▁yes", "3", "▁Leonardo"]:
        assert not is_stop_token(text), text


def test_selection_keeps_llr_above_alpha_without_stop_tokens():
    texts = ["▁The", "▁cat", ",", "▁red", "▁is"]
    llr = [3.0, 2.0, 5.0, 0.5, 4.0]
    probs = [0.9] * 5
    assert select_tokens(llr, probs, probs, texts) == [1]
    assert select_tokens(llr, probs, probs, texts, alpha=0.4) == [1, 3]
    sel = select_tokens_detailed(llr, probs, probs, texts)
    assert not sel.fallback


def test_selection_threshold_is_strict():
    assert select_tokens([1.0, 1.0001], [0.5, 0.5], [0.1, 0.1], ["a1", "b2"]) == [1]


def test_single_token_answer_rule():
    kept = select_tokens_detailed([0.7], [0.8], [0.4], ["▁red"])  # p_blur <= p/2
    assert kept.selected == [0] and not kept.fallback
    dropped = select_tokens_detailed([0.4], [0.8], [0.5], ["▁red"])
    assert dropped.selected == [0] and dropped.fallback  # reported as fallback


def test_fallback_to_max_llr_token():
    sel = select_tokens_detailed([0.1, 0.3, 0.9], [0.5] * 3, [0.5] * 3, ["the", "dog", "."])
    assert sel.selected == [1] and sel.fallback  # "." has higher LLR but is punctuation
    only_stops = select_tokens_detailed([0.1, 0.3], [0.5] * 2, [0.5] * 2, ["the", "."])
    assert only_stops.selected == [1] and only_stops.fallback


def test_skip_first_position_option():
    texts, llr, p = ["top", "left"], [3.0, 2.0], [0.5, 0.5]
    assert select_tokens(llr, p, p, texts) == [0, 1]
    assert select_tokens(llr, p, p, texts, skip_first=True) == [1]


def test_selection_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        select_tokens([1.0, 2.0], [0.5], [0.5], ["a", "b"])


def test_source_image_prefers_kept_image(random_llava_explainer, scene):
    ctx = make_ctx(random_llava_explainer, scene)
    kept = Image.new("RGB", (64, 64), (1, 2, 3))
    ctx.prompt.extras["image"] = kept
    assert source_image(ctx) is kept
