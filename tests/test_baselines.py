"""Classic baselines: raw attention, rollout, Grad-CAM, TMME/CheferCAM, AttnGrad.

Pure math on hand-checkable tensors first, then the methods on the random-weight and the trained
embedded model (fp32, TF32 off in conftest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_attribution.capture import CaptureSpec
from lvlm_attribution.context import AttributionContext
from lvlm_attribution.methods import list_methods
from lvlm_attribution.methods._common import per_token_gradients
from lvlm_attribution.methods.attngrad import attngrad_maps
from lvlm_attribution.methods.dexar import lens_attention_and_gradients, lens_gradients
from lvlm_attribution.methods.gradcam import GradCamConfig, gradcam_inputs, gradcam_maps
from lvlm_attribution.methods.raw_attention import raw_attention_maps
from lvlm_attribution.methods.registry import get_method
from lvlm_attribution.methods.rollout import (
    fuse_heads,
    residual_attention,
    rollout,
    rollout_rows,
)
from lvlm_attribution.methods.tmme import (
    TmmeConfig,
    chefer_layer,
    propagate_full,
    propagate_rows,
    reference_tmme,
    tmme_token_maps,
)
from lvlm_attribution.world.scenes import generate

BASELINES = ("raw_attention", "rollout", "gradcam", "tmme", "attngrad")

# A causal 3-token attention matrix (rows sum to 1).
A3 = torch.tensor([[1.0, 0.0, 0.0],
                   [0.5, 0.5, 0.0],
                   [0.2, 0.3, 0.5]], dtype=torch.float64)


def _ctx(explainer, seed: int = 7, kind: str = "color") -> AttributionContext:
    sample = generate(seed, kind)
    return explainer.context(Image.fromarray(sample.image), sample.question, sample.answer)


@pytest.fixture(scope="module")
def random_ctx(random_llava_explainer) -> AttributionContext:
    return _ctx(random_llava_explainer)


@pytest.fixture(scope="module")
def embedded_ctx(embedded_dir, request) -> AttributionContext:
    if not (embedded_dir / "config.json").is_file():
        pytest.skip(f"no embedded model at {embedded_dir} (set LVLM_TEST_MODEL_DIR)")
    return _ctx(request.getfixturevalue("embedded_explainer"), seed=11, kind="shape")


# ---- pure math, hand-checked -----------------------------------------------------------------
def test_rollout_residual_and_product_by_hand():
    a_hat = residual_attention(A3[None], 0.5)[0]
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.1, 0.15, 0.75]],
                            dtype=torch.float64)
    torch.testing.assert_close(a_hat, expected)
    # Two layers: row 2 of Â·Â = 0.1·[1,0,0] + 0.15·[.25,.75,0] + 0.75·[.1,.15,.75]
    r = rollout(torch.stack([a_hat, a_hat]))
    torch.testing.assert_close(r[2], torch.tensor([0.2125, 0.225, 0.5625], dtype=torch.float64))
    torch.testing.assert_close(r.sum(-1), torch.ones(3, dtype=torch.float64))  # stays stochastic


def test_rollout_order_is_top_layer_on_the_left():
    first = residual_attention(A3[None], 0.5)[0]
    second = residual_attention(torch.eye(3, dtype=torch.float64)[[0, 0, 1]][None], 0.5)[0]
    stacked = torch.stack([first, second])  # layer 1, then layer 2
    torch.testing.assert_close(rollout(stacked), second @ first)
    rows = torch.tensor([2, 1])
    torch.testing.assert_close(rollout_rows(stacked, rows), (second @ first)[rows])


def test_residual_attention_renormalizes_and_fuses_heads():
    heads = torch.stack([A3, torch.eye(3, dtype=torch.float64)])  # (H=2, 3, 3)
    torch.testing.assert_close(fuse_heads(heads, "mean"), (A3 + torch.eye(3)) / 2,
                               check_dtype=False)
    a_hat = residual_attention(fuse_heads(heads, "max")[None], 0.5)[0]  # max rows sum > 1
    torch.testing.assert_close(a_hat.sum(-1), torch.ones(3, dtype=torch.float64))


def test_raw_attention_by_hand():
    probs = torch.zeros(2, 2, 1, 3)  # (L, H, T, N), visual keys = [0, 1]
    probs[0, 0, 0] = torch.tensor([0.6, 0.2, 0.2])
    probs[0, 1, 0] = torch.tensor([0.2, 0.2, 0.6])
    probs[1, :, 0] = torch.tensor([0.0, 0.4, 0.6])
    out = raw_attention_maps(probs, torch.tensor([0, 1]))
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.3]]))  # mean of [.4,.2] and [0,.4]


def test_chefer_rules_by_hand():
    attn = torch.tensor([[[1.0, 0.0], [0.5, 0.5]],
                         [[1.0, 0.0], [0.8, 0.2]]])  # (H=2, 2, 2)
    grad = torch.tensor([[[2.0, 9.0], [1.0, -4.0]],
                         [[-1.0, 9.0], [0.5, 3.0]]])
    a_bar = chefer_layer(attn, grad)  # mean_h ReLU(G ⊙ A)
    torch.testing.assert_close(a_bar, torch.tensor([[1.0, 0.0], [0.45, 0.3]]))
    # R = (I + Ā2)(I + Ā1) with Ā1 = Ā2 = a_bar: row 1 of (I + Ā)² = [0.45·2.3 + .. ]
    r = propagate_full(torch.stack([a_bar, a_bar]))
    one_plus = torch.eye(2) + a_bar
    torch.testing.assert_close(r, one_plus @ one_plus)
    torch.testing.assert_close(r[1], torch.tensor([0.45 * 2 + 1.3 * 0.45, 1.3 * 1.3]))


def test_propagate_rows_equals_full_matrix_per_token():
    gen = torch.Generator().manual_seed(0)
    a_bar = torch.rand(3, 2, 5, 5, generator=gen, dtype=torch.float64).tril()  # (L, T, N, N)
    rows = torch.tensor([3, 4])
    fast = propagate_rows(a_bar, rows)
    for t in range(2):
        torch.testing.assert_close(fast[t], propagate_full(a_bar[:, t])[rows[t]])


def test_gradcam_by_hand():
    hidden = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # (|V|=2, D=2)
    grads = torch.tensor([[[1.0, 0.0], [1.0, 2.0]],  # token 0: alpha = [1, 1]
                          [[-2.0, 0.0], [0.0, 0.0]]])  # token 1: alpha = [-1, 0]
    out = gradcam_maps(hidden, grads)
    torch.testing.assert_close(out, torch.tensor([[3.0, 2.0], [0.0, 0.0]]))  # ReLU([-1, -3])


def test_attngrad_by_hand():
    attn = torch.tensor([0.5, 0.25, 0.25]).expand(2, 2, 1, 3)  # (L, H, T, N)
    grads = torch.zeros(2, 2, 1, 3)
    grads[0, 0, 0] = torch.tensor([2.0, -1.0, 4.0])
    grads[1, 1, 0] = torch.tensor([1.0, 4.0, 0.0])
    out = attngrad_maps(attn, grads, torch.tensor([0, 1]))
    # layer 0: mean_h [1, 0] = [.5, 0]; layer 1: mean_h [.5, 1] = [.25, .5]; sum over layers
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.5]]))


def test_configs_validate():
    with pytest.raises(ValueError):
        get_method("gradcam").make_config({"layer": -1})
    with pytest.raises(ValueError):
        get_method("rollout").make_config({"residual_weight": 1.5})
    with pytest.raises(ValueError):
        get_method("tmme").make_config({"last_k_layers": 0})
    assert get_method("tmme").make_config().last_k_layers is None


# ---- on the models -------------------------------------------------------------------------
def _check_output(ctx: AttributionContext, name: str, cfg_overrides=None):
    spec = get_method(name)
    out = spec.attribute(ctx, spec.make_config(cfg_overrides))
    grid = ctx.grid
    assert grid == (8, 8)
    assert out.visual_map.shape == grid
    assert out.per_token_maps.shape == (ctx.num_answer_tokens, *grid)
    for m in (out.visual_map, out.per_token_maps):
        assert m.dtype == np.float32 and np.isfinite(m).all() and (m >= 0).all()
    np.testing.assert_allclose(out.visual_map, out.per_token_maps.mean(0), rtol=1e-6, atol=0)
    assert out.visual_map.max() > 0
    return out


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_outputs_on_random_model(random_ctx, name):
    assert name in list_methods()
    _check_output(random_ctx, name)


def test_baselines_on_embedded_model(embedded_ctx):
    for name in BASELINES:
        _check_output(embedded_ctx, name)
    _check_output(embedded_ctx, "tmme", {"last_k_layers": 2})


def _tmme_relative_difference(ctx, cfg) -> float:
    fast = tmme_token_maps(ctx, cfg)
    slow = reference_tmme(ctx, cfg)
    scale = slow.abs().max()
    assert scale > 0
    return float((fast - slow).abs().max() / scale)


@pytest.mark.parametrize("cfg", [TmmeConfig(token_chunk=3), TmmeConfig(last_k_layers=2)],
                         ids=["all-layers-chunk3", "last2"])
def test_tmme_fast_equals_reference_random(random_ctx, cfg):
    assert _tmme_relative_difference(random_ctx, cfg) <= 1e-5


def test_tmme_fast_equals_reference_embedded(embedded_ctx):
    assert _tmme_relative_difference(embedded_ctx, TmmeConfig()) <= 1e-5


def test_per_token_attention_gradients_are_causal(random_ctx):
    """d z_t / d A is zero on every row from t on (rows > t-1) and non-zero on row t-1."""
    ctx = random_ctx
    logits, captured = ctx.forward(CaptureSpec(rows=None))
    probs = [captured.probs[k] for k in sorted(captured.probs)]
    grads = per_token_gradients(ctx.target_logits(logits), probs, token_chunk=3)
    for t, row in enumerate(ctx.predict_rows.tolist()):
        for g in grads:
            assert g[t, 0, :, row + 1:].abs().max() == 0
            assert g[t, 0, :, row].abs().max() > 0


def test_batched_gradients_equal_one_backward_per_token(random_ctx):
    ctx = random_ctx
    logits, captured = ctx.forward(CaptureSpec(layers=[], layer_outputs=True),
                                   inputs=gradcam_inputs(ctx), check=False)
    hidden = captured.layer_outputs[2]
    z = ctx.target_logits(logits)
    singles = [torch.autograd.grad(z[t], hidden, retain_graph=True)[0]
               for t in range(ctx.num_answer_tokens)]
    (batched,) = per_token_gradients(z, [hidden], token_chunk=3)  # frees the graph at the end
    torch.testing.assert_close(batched, torch.stack(singles), rtol=0, atol=1e-6)


def test_gradcam_last_layer_output_has_no_visual_gradient(random_ctx):
    """Why the default layer is -2: the last layer's output at visual positions reaches no
    logit of a later row."""
    ctx = random_ctx
    logits, captured = ctx.forward(CaptureSpec(layers=[], layer_outputs=True),
                                   inputs=gradcam_inputs(ctx), check=False)
    last = captured.layer_outputs[ctx.adapter.num_layers - 1]
    (g,) = torch.autograd.grad(ctx.target_logits(logits).sum(), last)
    assert g[0, ctx.visual_positions].abs().max() == 0
    assert GradCamConfig().layer == -2


def test_attngrad_gradients_equal_dexar_lens_gradients(random_ctx):
    layers = list(range(random_ctx.adapter.num_layers))
    attn, grads = lens_attention_and_gradients(random_ctx, layers)
    torch.testing.assert_close(grads, lens_gradients(random_ctx, layers), rtol=0, atol=0)
    rows = random_ctx.predict_rows
    torch.testing.assert_close(attn.sum(-1), torch.ones(len(layers), attn.shape[1], len(rows)))


def test_rollout_method_equals_full_product(random_ctx):
    ctx = random_ctx
    out = get_method("rollout").attribute(ctx, get_method("rollout").make_config())
    with torch.no_grad():
        _, captured = ctx.forward(CaptureSpec(rows=None))
        attn = torch.stack([captured.probs[k][0].mean(0) for k in sorted(captured.probs)])
        full = rollout(residual_attention(attn.detach().double(), 0.5))
    expected = full[ctx.predict_rows][:, ctx.visual_positions]
    np.testing.assert_allclose(out.per_token_maps, ctx.to_grid(expected).numpy(), rtol=1e-5,
                               atol=1e-7)
