"""TAM (methods/tam.py): hand-checked pieces, the one-forward fast path against a slow, plainly
written reference on the embedded model and the three tiny families, the output contract,
config validation, and (slow, when the official code is present) the official implementation.

`reference_tam` is written independently of methods/tam.py: a full eager forward with
`output_hidden_states`, the LM head over every row and the whole vocabulary (as the official
code does), then Python loops over tokens, context tokens and visual positions; numpy's
`pad(mode="reflect")` and a per-pixel loop for the rank Gaussian filter. fp32, TF32 off
(conftest)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lvlm_attribution.context import AttributionContext
from lvlm_attribution.engine import Explainer
from lvlm_attribution.methods.registry import SettingError, get_method
from lvlm_attribution.methods.tam import (
    TamConfig,
    TamInputs,
    _reflect_index,
    class_logits,
    estimated_causal_inference,
    final_hidden_states,
    joint_minmax,
    rank_gaussian_filter,
    tam_inputs,
    token_activation_maps,
)
from lvlm_attribution.models.tiny import build_tiny
from lvlm_attribution.world.scenes import generate

EXACT = 1e-5  # maps live in [0, 1]; fp32 fast path vs fp32 forward + float64 loops


# ---- the reference -----------------------------------------------------------------------------
def _attn_implementations(model: nn.Module) -> dict[str, str]:
    config = model.config
    out = {"": config._attn_implementation}
    for key in config.sub_configs:
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = sub._attn_implementation
    return out


def reference_logits(ctx: AttributionContext) -> torch.Tensor:
    """(N, vocab): lm_head(hidden_states[-1]) over every row, from a full EAGER forward."""
    model = ctx.model
    before = _attn_implementations(model)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**ctx.inputs, output_hidden_states=True)
    finally:
        model.set_attn_implementation(before)
    logits = ctx.adapter.lm_head()(out.hidden_states[-1])[0].float()
    # hidden_states[-1] is what the LM head reads (the final norm applied once)
    torch.testing.assert_close(logits, out.logits[0].float(), rtol=0, atol=1e-5)
    return logits


def reference_rank_gaussian_filter(img: np.ndarray, kernel_size: int) -> np.ndarray:
    """The official per-pixel loop, with sigma = 0 taken as its limit (the median)."""
    pad = kernel_size // 2
    padded = np.pad(img, pad, mode="reflect")
    out = np.zeros_like(img, dtype=np.float64)
    centre = kernel_size**2 // 2
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            window = sorted(padded[i:i + kernel_size, j:j + kernel_size].flatten().tolist())
            mean = sum(window) / len(window)
            if mean <= 0:
                continue
            std = math.sqrt(sum((x - mean) ** 2 for x in window) / len(window))
            sigma = std / mean
            if sigma == 0:
                out[i, j] = window[centre]
                continue
            kernel = [math.exp(-((r - centre) ** 2) / (2 * sigma**2)) for r in range(len(window))]
            out[i, j] = sum(x * k for x, k in zip(window, kernel, strict=True)) / sum(kernel)
    return out


def reference_tam(ctx: AttributionContext, cfg: TamConfig) -> tuple[np.ndarray, list[float]]:
    """(T, h, w) maps and the ECI scales, token by token, visual position by visual position."""
    logits = reference_logits(ctx).double()
    ids = ctx.inputs["input_ids"][0].tolist()
    visual = ctx.visual_positions.tolist()
    question = ctx.question_positions.tolist()
    rows = ctx.predict_rows.tolist()
    answer = list(ctx.answer_ids)

    def act(row: int, token: int) -> float:
        return max(0.0, float(logits[row, token]))

    raw = [[act(v, y) for v in visual] for y in answer]  # A_t
    maps, scales = [], []
    for t, y in enumerate(answer):
        # context of y_t: (weight s_{t,x}, map A_x, id c_x)
        context = [(act(q, y), [act(v, ids[q]) for v in visual], ids[q]) for q in question]
        context += [(act(rows[j], y), raw[j], answer[j]) for j in range(t)]
        a = list(raw[t])
        scale = 0.0
        if cfg.eci:
            eci = [c for c in context if not (cfg.exclude_repeated and c[2] == y)]
            total = sum(w for w, _, _ in eci)
            interference = [sum(w / (total + 1e-8) * m[k] for w, m, _ in eci)
                            for k in range(len(visual))]
            energy = sum(x * x for x in interference)
            if energy > 0:
                scale = sum(p * q for p, q in zip(a, interference, strict=True)) / energy
            a = [max(0.0, p - scale * q) for p, q in zip(a, interference, strict=True)]
        pool = a + [w for w, _, _ in context]
        lo, hi = min(pool), max(pool)
        normed = [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in a]
        grid = np.array(normed).reshape(ctx.grid)
        if cfg.rank_filter:
            grid = reference_rank_gaussian_filter(grid, cfg.kernel_size)
        maps.append(grid)
        scales.append(scale)
    return np.stack(maps), scales


# ---- contexts ----------------------------------------------------------------------------------
def _scene_ctx(explainer: Explainer, seed: int, kind: str) -> AttributionContext:
    sample = generate(seed, kind)
    return explainer.context(Image.fromarray(sample.image), sample.question, sample.answer)


@pytest.fixture(scope="module")
def embedded(embedded_dir, request) -> Explainer:
    if not (embedded_dir / "config.json").is_file():
        pytest.skip(f"no embedded model at {embedded_dir} (set LVLM_TEST_MODEL_DIR)")
    return request.getfixturevalue("embedded_explainer")


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl", "paligemma"])
def tiny_ctx(request) -> AttributionContext:
    model, processor = build_tiny(request.param)
    explainer = Explainer(model, processor, f"tiny-{request.param}", "random")
    # 56 x 42: Qwen's dynamic grid is non-square (3 x 4); LLaVA/PaliGemma resize to square
    image = Image.fromarray(generate(4).image).resize((56, 42))
    return explainer.context(image, "what color is the square ?", "the square is red square")


def _run(ctx: AttributionContext, overrides: dict | None = None):
    spec = get_method("tam")
    return spec.attribute(ctx, spec.make_config(overrides))


def _check_contract(ctx: AttributionContext, out) -> None:
    grid, T = ctx.grid, ctx.num_answer_tokens
    assert out.visual_map.shape == grid and out.per_token_maps.shape == (T, *grid)
    for m in (out.visual_map, out.per_token_maps):
        assert m.dtype == np.float32 and np.isfinite(m).all() and (m >= 0).all()
    assert out.per_token_maps.max() <= 1 + 1e-6  # joint min-max, and the filter averages
    np.testing.assert_allclose(out.visual_map, out.per_token_maps.mean(0), rtol=1e-6, atol=1e-7)
    assert set(out.token_weights) == {"eci_scale", "visual_peak"}
    for values in out.token_weights.values():
        assert values.shape == (T,) and np.isfinite(values).all()
    assert set(out.settings) == {"eci", "exclude_repeated", "rank_filter", "kernel_size"}


def _assert_matches_reference(ctx: AttributionContext, overrides: dict | None = None):
    out = _run(ctx, overrides)
    expected, scales = reference_tam(ctx, get_method("tam").make_config(overrides))
    np.testing.assert_allclose(out.per_token_maps, expected, rtol=0, atol=EXACT)
    np.testing.assert_allclose(out.token_weights["eci_scale"], scales, rtol=1e-4, atol=1e-6)
    return out


# ---- pure pieces, by hand ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("pad", [0, 1, 2, 4, 7])
def test_reflect_index_is_numpy_reflect(size, pad):
    expected = np.pad(np.arange(size), pad, mode="reflect")
    assert _reflect_index(size, pad, "cpu").tolist() == expected.tolist()


def test_rank_gaussian_filter_by_hand():
    # Constant positive windows: sigma = 0, the limit is the median (the official gives NaN).
    np.testing.assert_allclose(rank_gaussian_filter(torch.full((3, 3), 0.5)).numpy(), 0.5)
    assert rank_gaussian_filter(torch.zeros(2, 2)).abs().max() == 0  # mean 0 -> 0
    # One 3x3 image: the centre window is the whole image (no padding involved).
    img = torch.tensor([[0.0, 1.0, 0.0], [0.0, 4.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    ranked = sorted(img.flatten().tolist())  # six 0s, 1, 1, 4; mean 2/3
    mean = 6 / 9
    sigma = math.sqrt(sum((x - mean) ** 2 for x in ranked) / 9) / mean
    kernel = [math.exp(-((r - 4) ** 2) / (2 * sigma**2)) for r in range(9)]
    centre = sum(x * k for x, k in zip(ranked, kernel, strict=True)) / sum(kernel)
    assert rank_gaussian_filter(img)[1, 1].item() == pytest.approx(centre, rel=1e-12)


@pytest.mark.parametrize("shape", [(1, 4), (2, 2), (3, 4), (6, 5)])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_rank_gaussian_filter_equals_per_pixel_loop(shape, kernel_size):
    gen = torch.Generator().manual_seed(sum(shape) + kernel_size)
    img = torch.rand(shape, generator=gen, dtype=torch.float64)
    img[img < 0.3] = 0  # zero windows and ties, as after ECI's ReLU
    expected = reference_rank_gaussian_filter(img.numpy(), kernel_size)
    np.testing.assert_allclose(rank_gaussian_filter(img, kernel_size).numpy(), expected,
                               rtol=1e-10, atol=1e-12)


def _toy_inputs() -> TamInputs:
    """One question token (map [1, 0]) and two answer tokens over |V| = 2."""
    answer_visual = torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    context_visual = torch.cat([torch.tensor([[1.0, 0.0]], dtype=torch.float64), answer_visual])
    weights = torch.tensor([[1.0, 9.0, 9.0], [1.0, 1.0, 9.0]], dtype=torch.float64)
    earlier = torch.tensor([[True, False, False], [True, True, False]])
    return TamInputs(answer_visual, context_visual, weights, earlier, earlier)


def test_eci_by_hand():
    visual, scale = estimated_causal_inference(_toy_inputs())
    # token 0: I = [1, 0]·1/(1+1e-8); k = <[1,2], I>/<I, I> = 1+1e-8; Â = [0, 2]
    # token 1: I = ([1,0] + [1,2])/2 = [1, 1]; k = (3 + 1)/2 = 2; Â = ReLU([1, -1]) = [1, 0]
    torch.testing.assert_close(scale, torch.tensor([1 + 1e-8, 2.0], dtype=torch.float64))
    torch.testing.assert_close(visual, torch.tensor([[0.0, 2.0], [1.0, 0.0]],
                                                    dtype=torch.float64))


def test_eci_leaves_out_repeated_tokens_but_normalization_keeps_them():
    toy = _toy_inputs()
    weights = toy.weights.clone()
    weights[0, 0] = 5.0  # token 0's activation on its (repeated) question token
    repeated = TamInputs(toy.answer_visual, toy.context_visual, weights,
                         toy.eci_mask & torch.tensor([[False, True, True]]), toy.norm_mask)
    visual, scale = estimated_causal_inference(repeated)
    torch.testing.assert_close(visual[0], toy.answer_visual[0])  # nothing left to subtract
    assert scale[0] == 0
    # ... but its weight 5 still sets the normalization range: ([1, 2] - 1) / (5 - 1)
    out = token_activation_maps(repeated, (1, 2), TamConfig(rank_filter=False))
    torch.testing.assert_close(out["maps"][0, 0], torch.tensor([0.0, 0.25], dtype=torch.float64))
    assert out["visual_peak"][0] == 0.25


def test_joint_minmax_dims_a_text_driven_token():
    visual = torch.tensor([[0.0, 1.0]])
    normed = joint_minmax(visual, torch.tensor([[4.0]]), torch.tensor([[True]]))
    torch.testing.assert_close(normed, torch.tensor([[0.0, 0.25]]))  # text peak 4 sets the range
    flat = joint_minmax(torch.ones(1, 3), torch.ones(1, 1), torch.tensor([[True]]))
    assert torch.equal(flat, torch.zeros(1, 3))  # constant: 0, not NaN


def test_core_maps_over_a_leading_batch_dim(embedded):
    """The pure core takes a leading batch of requests (same geometry) and gives each one what
    it gives alone: what a batched forward will feed it."""
    ctx = _scene_ctx(embedded, 11, "shape")
    hidden = final_hidden_states(ctx.model, ctx.adapter, ctx.inputs)[0]
    one = tam_inputs(ctx, hidden)
    other = TamInputs(one.answer_visual.flip(-1), one.context_visual.flip(-1),
                      one.weights * 0.5, one.eci_mask, one.norm_mask)
    batch = TamInputs(*(torch.stack([getattr(one, f), getattr(other, f)])
                        for f in ("answer_visual", "context_visual", "weights", "eci_mask",
                                  "norm_mask")))
    got = token_activation_maps(batch, ctx.grid, TamConfig())
    for b, single in enumerate((one, other)):
        alone = token_activation_maps(single, ctx.grid, TamConfig())
        for key in alone:
            torch.testing.assert_close(got[key][b], alone[key])


def test_class_logits_only_needed_columns_equal_full_head():
    torch.manual_seed(0)
    head = nn.Linear(8, 50, bias=True)
    hidden = torch.randn(5, 8)
    ids = torch.tensor([3, 3, 49, 0])
    torch.testing.assert_close(class_logits(head, hidden, ids), head(hidden)[:, ids])
    wrapped = nn.Sequential(head)  # not a plain Linear: the fallback path
    torch.testing.assert_close(class_logits(wrapped, hidden, ids), head(hidden)[:, ids])


# ---- fast path == reference ----------------------------------------------------------------------
@pytest.mark.parametrize(("seed", "kind"), [(11, "shape"), (3, "color"), (5, "position")])
def test_fast_equals_reference_embedded(embedded, seed, kind):
    ctx = _scene_ctx(embedded, seed, kind)
    out = _assert_matches_reference(ctx)
    _check_contract(ctx, out)
    assert out.visual_map.max() > 0


@pytest.mark.parametrize("overrides", [{"eci": False}, {"rank_filter": False},
                                       {"exclude_repeated": False}, {"kernel_size": 5}],
                         ids=["no-eci", "no-filter", "keep-repeated", "kernel5"])
def test_fast_equals_reference_options(embedded, overrides):
    _assert_matches_reference(_scene_ctx(embedded, 11, "shape"), overrides)


def test_fast_equals_reference_tiny_families(tiny_ctx):
    if tiny_ctx.adapter.family == "qwen2_5_vl":
        assert tiny_ctx.grid == (3, 4)  # the non-square case
    out = _assert_matches_reference(tiny_ctx)
    _check_contract(tiny_ctx, out)


def test_final_hidden_states_is_what_the_lm_head_reads(tiny_ctx):
    ctx = tiny_ctx
    hidden = final_hidden_states(ctx.model, ctx.adapter, ctx.inputs)
    assert hidden.shape[:2] == (1, ctx.seq_len) and not hidden.requires_grad
    logits = ctx.adapter.lm_head()(hidden[0, ctx.predict_rows])
    torch.testing.assert_close(logits.float(), ctx.plain_logits, rtol=0, atol=1e-5)
    norm = ctx.adapter.final_norm()
    assert not norm._forward_hooks  # the hook is gone


# ---- registry, settings --------------------------------------------------------------------------
def test_registered_forward_only_with_official_defaults():
    spec = get_method("tam")
    assert spec.needs_gradients is False and spec.needs_perturbation is False
    cfg = spec.make_config()
    assert (cfg.eci, cfg.exclude_repeated, cfg.rank_filter, cfg.kernel_size) == (True, True,
                                                                                True, 3)
    assert spec.limits == {"kernel_size": 7}


@pytest.mark.parametrize(("overrides", "setting"), [
    ({"kernel_size": 4}, "kernel_size"), ({"kernel_size": 0}, "kernel_size"),
    ({"kernel_size": -3}, "kernel_size"), ({"kernel_size": 9}, "kernel_size"),
    ({"kernel_size": 3.0}, "kernel_size"), ({"eci": 1}, "eci"), ({"rank_filter": "no"},
                                                                   "rank_filter")])
def test_bad_settings_raise_naming_the_setting(overrides, setting):
    with pytest.raises(ValueError, match=setting) as err:
        get_method("tam").make_config(overrides)
    assert isinstance(err.value, SettingError) and err.value.setting == setting


def test_validate_rejects_even_kernel_directly():
    with pytest.raises(ValueError, match="kernel_size"):
        TamConfig(kernel_size=2).validate()


# ---- the official implementation (skips without its tam.py, scipy and cv2; < 1 s) ---------------
OFFICIAL_DIR = Path(os.environ.get("TAM_OFFICIAL_DIR", "/tmp/tam_official"))


def test_agrees_with_official_implementation(embedded):
    """benchmarks/tam_official.py: with its four documented patches the official code computes
    our maps; docs/methods/tam.md records the full run (also the unpatched agreement)."""
    if not (OFFICIAL_DIR / "tam.py").is_file():
        pytest.skip(f"official TAM code not found in {OFFICIAL_DIR} (set TAM_OFFICIAL_DIR)")
    pytest.importorskip("scipy")
    pytest.importorskip("cv2")
    from benchmarks.tam_official import compare

    rows = compare(embedded, OFFICIAL_DIR, seeds=[11])
    for row in rows:
        assert row["patched_all_tokens"]["max_abs_diff"] <= EXACT, row


def test_after_generation_tam_runs_no_forward_of_its_own(embedded_explainer):
    """The final hidden states recorded while generating feed TAM: attributing a generated
    answer with TAM and no LLR runs no model forward at all, and equals TAM's own forward."""
    from PIL import Image

    from lvlm_attribution.schema import BatchItem, ExplainOptions
    from lvlm_attribution.world.scenes import generate

    scene = generate(3, "color")
    options = ExplainOptions(methods=("tam",), llr=False, per_token_maps=True)
    answered = embedded_explainer.answer([BatchItem(Image.fromarray(scene.image),
                                                    scene.question)], options)
    calls = []
    handle = embedded_explainer.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        fast = embedded_explainer.attribute(answered, options)[0]
    finally:
        handle.remove()
    assert calls == [] and fast.tokens[0].llr is None and fast.grounding is None
    alone = embedded_explainer.explain(Image.fromarray(scene.image), scene.question,
                                       answer_token_ids=answered[0].ids, options=options)
    np.testing.assert_allclose(fast.methods["tam"].per_token_maps,
                               alone.methods["tam"].per_token_maps, atol=1e-5)
