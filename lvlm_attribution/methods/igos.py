"""LLR token selection + single-mask iGOS++ with graduated non-convexity (papers 002/003:
"Where do Large Vision-Language Models Look at when Answering Questions?", arXiv 2503.13891,
building on iGOS++, Khorram et al. 2021). Official code: bytedance/LVLM_Interpretation
(`methods.iGOS_p`, `methods_helper.py`); where the paper is ambiguous we mirror that code.

Notation -> code (DESIGN §3):
  K                 positions     visually relevant answer tokens (LLR_t > α, llr.py)
  S(x)              score         Σ_{t∈K} ln p(y_t | x, y_<t), teacher-forced
  M                 mask          (1, 1, s, s), s = 32, init 1; 1 = keep the image
  up(M)             up            bilinear upsampling to the processed image (align_corners=True)
  φ(I, Ĩ, m)        composite     I·m + Ĩ·(1 − m), in processed pixel space        (Eq 7)
  α_k               alphas        k/N, k = 1..N, N = ig_iter                          (IG path)
  IG_del            (1/N) Σ_k S(φ(I, Ĩ, α_k·up(M)) + ε_k)    deletion interpolants
  IG_ins            (1/N) Σ_k S(φ(Ĩ, I, α_k·up(M)) + ε'_k)   insertion interpolants, ε ~ N(0, 0.2²)
  R(M)              λ1·mean|1−M| + λ3·BTV(M) + λ2·e^{−γi}·Σ(1−M)²     (Eq 8 regularizer, GNC)
  g                 grad          ∇IG_del − ∇IG_ins + ∇R(M)
  θ_i               theta         M − lr·g;  M ← θ_i + (i/(i+momentum))·(θ_i − θ_{i−1}); clamp
  saliency          1 − M         low M = important (deletion removes low-M cells first)

Eq 8 (paper 002): min_M f(φ(M)) − f(φ(1−M)) + λ1‖1−M‖₁ + λ2e^{−γi}‖1−M‖₂ + λ3·BTV(M), with
φ(1−M) realised, as in the code, by the insertion composite φ(Ĩ, I, M) = φ(I, Ĩ, 1−M). The code's
norms (mirrored): L1 is a *mean*, the GNC term is a *sum of squares*, BTV is a mean-based
bilateral TV; each interpolant's contribution is divided by N.

Fast path (DESIGN §4): per iteration, all 2N interpolants (deletion and insertion) go through ONE
batched forward and ONE backward (chunked by `batch_size` when memory is short), with the LM
head applied only at the predicting rows of K (`perturbation.answer_logprobs`). The official
code runs 2N separate forward/backward passes per iteration. `reference_igos` is that plain
procedure (one image per forward/backward, full logits) and must give the same mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..context import AttributionContext
from ..llr import select_for_context
from ..perturbation import BASELINES, answer_logprobs, baseline_pixel_values, batched_inputs
from ..schema import MethodOutput
from .registry import register_method, settings_dict


@dataclass(frozen=True)
class IgosConfig:
    baseline: str = "blur"  # Ĩ: "blur" (paper), "zero", "noise" (ablations)
    alpha: float = 1.0  # LLR threshold (natural log)
    skip_first: bool = False  # official code drops answer position 0 (see llr.py)
    mask_size: int = 32  # s: the optimized mask is s×s
    iterations: int = 5
    ig_iter: int = 10  # N interpolants per integral
    lambda1: float = 1.0  # L1 sparsity
    lambda2: float = 0.1  # GNC L2 weight at iteration 0
    lambda3: float = 10.0  # bilateral TV
    gamma: float = 1.0  # GNC decay: λ2·exp(−γ·i)
    gnc: bool = True  # False: constant λ2 (ablation)
    lr: float = 10.0
    momentum: float = 5.0  # Nesterov: e_i = i / (i + momentum)
    noise_std: float = 0.2  # ε on every interpolant, processed pixel units
    btv_sigma: float = 0.01
    tv_beta: float = 2.0
    seed: int = 0  # seeds the interpolant noise (and the noise baseline)
    batch_size: int = 20  # images per forward/backward; ≥ 2·ig_iter = one pass per iteration
    # Largest values the service accepts (cost grows with iterations·ig_iter·mask area; memory
    # with batch_size); ServiceConfig.method_limits overrides them per deployment.
    COST_LIMITS: ClassVar[dict[str, int]] = {"iterations": 20, "ig_iter": 32, "mask_size": 64,
                                             "batch_size": 64}

    def validate(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}")
        for name in ("mask_size", "iterations", "ig_iter", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("lambda1", "lambda2", "lambda3", "gamma", "lr", "momentum", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.btv_sigma <= 0:
            raise ValueError("btv_sigma must be > 0")
        if self.momentum == 0:
            raise ValueError("momentum must be > 0 (e_0 = 0/(0+momentum))")


# ---- pieces, each tagged with its equation ------------------------------------------------------
def upsample(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """up(M): (1, 1, s, s) -> (1, 1, H, W); the official `UpsamplingBilinear2d` (align_corners)."""
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=True)


def interval_alphas(n: int, device=None) -> torch.Tensor:
    """α_k = k/N, k = 1..N, shaped (N, 1, 1, 1)."""
    return (torch.arange(1, n + 1, dtype=torch.float32, device=device) / n).view(-1, 1, 1, 1)


def draw_noise(gen: torch.Generator, cfg: IgosConfig, shape: tuple[int, ...],
               device) -> torch.Tensor:
    """ε for one iteration: (2, N, C, H, W) (deletion, insertion), N(0, noise_std²), seeded."""
    noise = torch.randn((2, cfg.ig_iter, *shape), generator=gen, dtype=torch.float32)
    return (noise * cfg.noise_std).to(device)


def interpolants(pv: torch.Tensor, pv_base: torch.Tensor, up: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
    """(2N, C, H, W): φ(I, Ĩ, α_k·up) + ε_k, then φ(Ĩ, I, α_k·up) + ε'_k  (IG path, Eq 8)."""
    n = noise.shape[1]
    m = interval_alphas(n, up.device) * up  # (N, 1, H, W)
    deletion = pv * m + pv_base * (1 - m) + noise[0]
    insertion = pv_base * m + pv * (1 - m) + noise[1]
    return torch.cat([deletion, insertion])


def bilateral_tv(image: torch.Tensor, mask: torch.Tensor, up: torch.Tensor,
                 cfg: IgosConfig) -> torch.Tensor:
    """BTV(M) = ½(a + b + bil_a + bil_b), exactly as the official `bilateral_tv_norm`:
    a, b = mean |ΔM|^β (vertical, horizontal) on the s×s mask; bil_* = mean over the upsampled
    mask of w·|Δup(M)|^β with image weights w = exp(−ΔI²/σ). The official code averages the image
    difference over channels *before* squaring for the vertical term and averages exp(·) over
    channels *after* for the horizontal term; mirrored as is."""
    m = mask[:, 0]
    a = (m[:, :-1, :] - m[:, 1:, :]).abs().pow(cfg.tv_beta).mean()
    b = (m[:, :, :-1] - m[:, :, 1:]).abs().pow(cfg.tv_beta).mean()
    img = image[:1].float()
    w_a = torch.exp(-(img[:, :, :-1, :] - img[:, :, 1:, :]).mean(dim=1) ** 2 / cfg.btv_sigma)
    w_b = torch.exp(-(img[:, :, :, :-1] - img[:, :, :, 1:]) ** 2 / cfg.btv_sigma).mean(dim=1)
    bil_a = (w_a * (up[:, 0, :-1, :] - up[:, 0, 1:, :]).abs().pow(cfg.tv_beta)).mean()
    bil_b = (w_b * (up[:, 0, :, :-1] - up[:, 0, :, 1:]).abs().pow(cfg.tv_beta)).mean()
    return 0.5 * (a + b + bil_a + bil_b)


def l2_weight(i: int, cfg: IgosConfig) -> float:
    """GNC: λ2·exp(−γ·i) (gnc=True), constant λ2 otherwise (ablation)."""
    return cfg.lambda2 * math.exp(-cfg.gamma * i) if cfg.gnc else cfg.lambda2


def regularizer(image: torch.Tensor, mask: torch.Tensor, i: int,
                cfg: IgosConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(λ1·mean|1−M|, λ3·BTV(M), λ2(i)·Σ(1−M)²)  (Eq 8 regularizer, official norms)."""
    up = upsample(mask, tuple(image.shape[-2:]))
    l1 = cfg.lambda1 * (1 - mask).abs().mean()
    tv = cfg.lambda3 * bilateral_tv(image, mask, up, cfg)
    l2 = l2_weight(i, cfg) * ((1 - mask) ** 2).sum()
    return l1, tv, l2


def nesterov_step(mask: torch.Tensor, grad: torch.Tensor, theta_prev: torch.Tensor, i: int,
                  cfg: IgosConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """θ_i = M − lr·g; M ← clamp(θ_i + e_i(θ_i − θ_{i−1}), 0, 1), e_i = i/(i+momentum).
    θ_{−1} = 0 as in the code (harmless: e_0 = 0). Returns (new mask, θ_i)."""
    e = i / (i + cfg.momentum)
    theta = mask - cfg.lr * grad
    return (theta + e * (theta - theta_prev)).clamp(0, 1), theta


def saliency_to_grid(saliency: torch.Tensor, size: tuple[int, int],
                     grid: tuple[int, int]) -> torch.Tensor:
    """Patch-grid map: the s×s saliency upsampled as during optimization to the processed image
    (H, W), then averaged over each patch's pixels (exact area average when H, W are multiples of
    the grid, as for LLaVA: 64/8)."""
    up = upsample(saliency[None, None], size)
    return F.adaptive_avg_pool2d(up, grid)[0, 0]


# ---- fast path ----------------------------------------------------------------------------------
def igos_mask(ctx: AttributionContext, cfg: IgosConfig, positions: list[int],
              pv_base: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Optimize M; per iteration one batched forward/backward over all 2N interpolants."""
    pv = ctx.image_tensor.float()
    pv_base = pv_base.float()
    size = tuple(pv.shape[-2:])
    n = cfg.ig_iter
    signs = torch.cat([torch.full((n,), 1.0 / n), torch.full((n,), -1.0 / n)]).to(ctx.device)
    pos = torch.tensor(positions, device=ctx.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    mask = torch.ones(1, 1, cfg.mask_size, cfg.mask_size, device=ctx.device)
    theta = torch.zeros(1, device=ctx.device)
    history = []
    for i in range(cfg.iterations):
        noise = draw_noise(gen, cfg, tuple(pv.shape[1:]), ctx.device)
        leaf = mask.detach().requires_grad_(True)
        grad = torch.zeros_like(leaf)
        scores = []
        with torch.enable_grad():
            for start in range(0, 2 * n, cfg.batch_size):
                stop = min(start + cfg.batch_size, 2 * n)
                images = interpolants(pv, pv_base, upsample(leaf, size), noise)[start:stop]
                s = answer_logprobs(ctx, images, pos).sum(-1)  # S per image, (b,)
                (g,) = torch.autograd.grad((signs[start:stop] * s).sum(), leaf)
                grad += g
                scores.append(s.detach())
            l1, tv, l2 = regularizer(pv, leaf, i, cfg)
            (g,) = torch.autograd.grad(l1 + tv + l2, leaf)
            grad += g
        s = torch.cat(scores)
        history.append(_record(i, s[:n].mean(), s[n:].mean(), l1, tv, l2))
        mask, theta = nesterov_step(leaf.detach(), grad, theta, i, cfg)
    return mask, history


def _record(i, deletion, insertion, l1, tv, l2) -> dict:
    values = {"deletion_score": deletion, "insertion_score": insertion, "l1": l1, "btv": tv,
              "l2": l2}
    return {"iteration": i, **{k: float(v.detach()) for k, v in values.items()}}


# ---- slow reference -----------------------------------------------------------------------------
def _plain_score(ctx: AttributionContext, image: torch.Tensor,
                 positions: list[int]) -> torch.Tensor:
    """S(x) for ONE image: full forward, full logits, rows t−1 picked afterwards."""
    logits = ctx.model(**batched_inputs(ctx, image[None])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    total = logp.new_zeros(())
    for t in positions:
        total = total + logp[int(ctx.predict_rows[t]), ctx.answer_ids[t]]
    return total


def reference_igos(ctx: AttributionContext, cfg: IgosConfig, positions: list[int] | None = None,
                   pv_base: torch.Tensor | None = None) -> torch.Tensor:
    """The official procedure, plainly: one image per forward and backward, gradients
    accumulated into the mask's .grad, plain loops. Slow; for tests. Returns the final mask."""
    if positions is None:
        positions = select_for_context(ctx, cfg.baseline, cfg.alpha, cfg.skip_first,
                                       cfg.seed)[0].selected
    if pv_base is None:
        pv_base = baseline_pixel_values(ctx, cfg.baseline, cfg.seed)
    pv = ctx.image_tensor[0].float()
    base = pv_base[0].float()
    size = tuple(pv.shape[-2:])
    n = cfg.ig_iter
    gen = torch.Generator().manual_seed(cfg.seed)
    mask = torch.ones(1, 1, cfg.mask_size, cfg.mask_size, device=ctx.device, requires_grad=True)
    theta_prev = torch.zeros(1, device=ctx.device)
    for i in range(cfg.iterations):
        noise = draw_noise(gen, cfg, tuple(pv.shape), ctx.device)
        mask.grad = None
        with torch.enable_grad():
            for k in range(1, n + 1):  # deletion: φ(I, Ĩ, α_k·up(M)) + ε_k
                m = (k / n) * upsample(mask, size)[0]
                image = pv * m + base * (1 - m) + noise[0, k - 1]
                (_plain_score(ctx, image, positions) / n).backward()
            for k in range(1, n + 1):  # insertion: φ(Ĩ, I, α_k·up(M)) + ε'_k
                m = (k / n) * upsample(mask, size)[0]
                image = base * m + pv * (1 - m) + noise[1, k - 1]
                (-_plain_score(ctx, image, positions) / n).backward()
            reg = mask.new_zeros(())
            up = upsample(mask, size)
            reg = reg + cfg.lambda1 * torch.mean(torch.abs(1 - mask))
            reg = reg + cfg.lambda3 * bilateral_tv(pv[None], mask, up, cfg)
            reg = reg + l2_weight(i, cfg) * torch.sum((1 - mask) ** 2)
            reg.backward()
        with torch.no_grad():
            e = i / (i + cfg.momentum)
            theta = mask - cfg.lr * mask.grad
            mask.copy_(theta + e * (theta - theta_prev))
            theta_prev = theta
            mask.clamp_(0, 1)
    return mask.detach()


# ---- method -------------------------------------------------------------------------------------
@register_method("igos", config=IgosConfig, needs_gradients=True, needs_perturbation=True,
                 summary="LLR token selection + single-mask iGOS++ with GNC (perturbation)")
def attribute(ctx: AttributionContext, cfg: IgosConfig) -> MethodOutput:
    selection, llr = select_for_context(ctx, cfg.baseline, cfg.alpha, cfg.skip_first, cfg.seed)
    pv_base = baseline_pixel_values(ctx, cfg.baseline, cfg.seed)
    mask, history = igos_mask(ctx, cfg, selection.selected, pv_base)
    saliency = (1 - mask)[0, 0]
    size = tuple(ctx.image_tensor.shape[-2:])
    visual = saliency_to_grid(saliency, size, ctx.grid)
    selected = torch.zeros(ctx.num_answer_tokens)
    selected[selection.selected] = 1.0
    chunks = math.ceil(2 * cfg.ig_iter / cfg.batch_size)
    return MethodOutput(
        visual_map=visual.detach().float().cpu().numpy(),
        token_weights={"llr": llr.detach().float().cpu().numpy(),
                       "selected": selected.numpy()},
        settings=settings_dict(cfg),
        extras={"saliency_full": saliency.detach().float().cpu().numpy(),
                "token_selection": selection.as_dict(),
                "history": history,
                "passes": {"llr_forwards": 1,
                           "forward_backward_calls": cfg.iterations * chunks,
                           "images_scored": cfg.iterations * 2 * cfg.ig_iter}},
    )
