"""GLIMPSE: gradient-layer importance mapping for prompted visual saliency (Shen, arXiv 2506.18985).

Notation -> code (DESIGN §3, papers 000/001; equation numbers of the paper's v1):
  A^{l,h}        attn[i][h]      post-softmax attention of layer l, head h (N x N)
  G^{l,h}_t      grad[b, h]      d z_t / d A^{l,h}; z_t = raw logit of y_t at row t-1
  Ĝ^{l,h}        ghat            A ⊙ ReLU(G)                                          (Eq 5)
  w^{l,h}        head_w          softmax_h((1/τ) · ΣĜ / ΣReLU(G)), 0/0 := 0          (Eq 6-7)
  Ā^l            fused           rownorm(Σ_h w Ĝ), all-zero rows stay zero           (Eq 8)
  g^l            evidence        ‖Σ_h G^{l,h}‖₁, normalized over layers               (Eq 9)
  s^l            prior           softmax_l(κ·l/L) (default) or softmax_l(λ_d·(l+1))  (Eq 10)
  α^l            alpha           g^l s^l / Σ_k g^k s^k                                (Eq 11)
  R_t            rows[t]         row t-1 of (I+α^LĀ^L)···(I+α^1Ā^1)                  (Eq 12-14)
  a^P_t, a^V_t   prompt_align, visual_align   mean of R_t[t-1, ·] over P / V         (Eq 15-16)
  p_t            conf            softmax(z)[y_t]                                      (Eq 17)
  β^V_t, β^P_t   beta, beta_prompt   ∝ p_t a^P_t, ∝ p_t a^V_t (sum 1 over tokens)    (Eq 18-19)
  J_t            joint           ∝ p_t a^P_t a^V_t                                    (Eq 20)
  display        display         relevance flow, function -> content token (our reading) (Eq 21-22)
  maps           visual, prompt  Σ_t β^V_t R_t[t-1, V] on the grid; Σ_t β^P_t R_t[t-1, P] (Eq 23)

Propagation: we implement R <- R + α^l Ā^l R, i.e. R <- (I + α^l Ā^l) R (public
re-implementation R3). The literal reading "R <- R + (I + αĀ)R" = (2I + αĀ)R = 2(I + (α/2)Ā)R
only doubles R per layer, i.e. it equals our form with α/2, times 2^L; `propagation="literal"`
offers it.

Only row t-1 of R_t is ever read, so instead of N x N products we carry that row:
e_{t-1}ᵀ (I+α^LĀ^L)···(I+α^1Ā^1) is computed as v <- e_{t-1}; for l = L .. 1: v <- v + α^l (v Ā^l).
This is the same product associated from the left, hence exact (up to float rounding).

Fast path (DESIGN §4): one capture forward materializing every propagated layer's attention (all
rows: Ā^l needs rows 0..t-1), then per chunk of answer tokens one
`autograd.grad(..., is_grads_batched=True)` gives the true per-token gradients G_t (vmap over the
backward; exact, checked against a loop). Heads are fused per chunk right away, so only
(chunk, L, N, N) fused matrices are held, never H x N x N per layer for all tokens. Should the
batched backward fail (an op without a vmap rule), a per-token loop over the same graph is used;
`extras["gradient_mode"]` says which ran. `reference_glimpse` is the slow, plainly written check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..capture import CaptureSpec, capture
from ..context import GUARD_TOLERANCE, AttributionContext
from ..schema import MethodOutput
from .registry import register_method, settings_dict

# Relevance flow (Eq 21-22) moves mass from function words to content words. The paper names no
# list; this is a small English closed-class set. Tokens made only of punctuation count as well.
FUNCTION_WORDS = frozenset((
    "a", "an", "the", "this", "that", "these", "those", "is", "are", "was", "were", "be", "been",
    "being", "am", "do", "does", "did", "has", "have", "had", "of", "at", "in", "on", "to", "for",
    "from", "by", "with", "as", "into", "onto", "over", "under", "about", "than", "then", "and",
    "or", "but", "nor", "so", "yet", "it", "its", "it's", "he", "she", "they", "them", "their",
    "there", "here", "which", "who", "whom", "whose", "what", "where", "when", "how", "i", "you",
    "we", "me", "my", "your", "our", "his", "her", "can", "could", "will", "would",
    "shall", "should", "may", "might", "must",
))


@dataclass(frozen=True)
class GlimpseConfig:
    tau: float = 0.5  # Eq 7 head-softmax temperature τ
    # Eq 10 depth prior. "normalized": s^l = softmax_l(κ·l/L), κ = 12.8 ≡ λ_d = 0.2 at L = 64
    # (the paper's tuning); "literal": s^l = softmax_l(λ_d·(l+1)) as the public re-implementations.
    depth_prior_form: str = "normalized"
    kappa: float = 12.8
    lambda_d: float = 0.2
    # Eq 12-14. "additive": R <- R + αĀR; "literal": R <- R + (I + αĀ)R (doubles R per layer).
    propagation: str = "additive"
    # Ablation switches (paper §4 ablations). Defaults = full GLIMPSE.
    prompt_weighting: bool = True  # False: β^V ∝ p_t and β^P ∝ p_t (no cross-modal alignment)
    confidence: bool = True  # False: drop p_t from β^V, β^P and J
    head_average: bool = False  # True: w^{l,h} = 1/H instead of Eq 6-7
    depth_prior: bool = True  # False: s^l uniform
    layer_relevance: bool = True  # False: g^l uniform
    last_fraction: float | None = None  # e.g. 0.6: only the last 60% of layers propagate
    # Eq 21-22 relevance flow, display weight only (never the maps). Our reading, see docs.
    relevance_flow: bool = False
    flow_strength: float = 0.5  # λ_f: fraction of a function token's J moved to its content token
    flow_links: str = "attended"  # "attended": earlier content tokens it attends to in R;
    #                                "either": also later content tokens that attend to it
    token_chunk: int = 8  # answer tokens per batched backward (memory knob, exact either way)
    # Largest token_chunk the service accepts: memory grows with it (answers are <= 64 tokens).
    COST_LIMITS: ClassVar[dict[str, int]] = {"token_chunk": 64}
    # Memory knob, exact either way. "full": one capture forward keeps every propagated layer's
    # N x N attention in the autograd graph (~ 6·H·N² bytes per layer in bf16: the fp32 softmax
    # output and its bf16 copy). "replay": one plain forward saves each layer's input hidden
    # state; per chunk of tokens the layers are replayed one at a time, top-down, with explicit
    # attention, carrying dz/dh downwards, so only ONE layer's N x N graph exists at a time
    # (long sequences, e.g. N ~ 4,800 at 7B; see docs/performance.md).
    memory_mode: str = "full"

    def validate(self) -> None:
        if not self.tau > 0:
            raise ValueError("tau must be > 0")
        if self.depth_prior_form not in ("normalized", "literal"):
            raise ValueError("depth_prior_form must be 'normalized' or 'literal'")
        if not (math.isfinite(self.kappa) and math.isfinite(self.lambda_d)):
            raise ValueError("kappa and lambda_d must be finite")
        if self.propagation not in ("additive", "literal"):
            raise ValueError("propagation must be 'additive' or 'literal'")
        if self.last_fraction is not None and not 0 < self.last_fraction <= 1:
            raise ValueError("last_fraction must be in (0, 1]")
        if not 0 <= self.flow_strength <= 1:
            raise ValueError("flow_strength must be in [0, 1]")
        if self.flow_links not in ("attended", "either"):
            raise ValueError("flow_links must be 'attended' or 'either'")
        if self.token_chunk < 1:
            raise ValueError("token_chunk must be >= 1")
        if self.memory_mode not in ("full", "replay"):
            raise ValueError("memory_mode must be 'full' or 'replay'")


# ---- Eq 5-11: per-layer fusion and layer weights -------------------------------------------------
def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0/0 (and x/0) := 0."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), torch.zeros_like(num))


def fuse_heads(attn: torch.Tensor, grad: torch.Tensor, cfg: GlimpseConfig):
    """attn (H, N, N), grad (B, H, N, N) for B tokens -> fused Ā (B, N, N) (Eq 5-8),
    head weights w (B, H) (Eq 6-7) and unnormalized layer evidence ‖Σ_h G‖₁ (B,) (Eq 9).
    `grad` is consumed: overwritten in place, so one (B, H, N, N) buffer serves G, ReLU(G), Ĝ."""
    evidence = grad.sum(1).abs().sum(dim=(-2, -1))  # Eq 9, heads summed before |·|
    pos = grad.clamp_min_(0)  # ReLU(G)
    mass = pos.sum(dim=(-2, -1))
    ghat = pos.mul_(attn)  # Eq 5
    score = _safe_divide(ghat.sum(dim=(-2, -1)), mass)  # Eq 6
    if cfg.head_average:
        head_w = torch.full_like(score, 1.0 / score.shape[-1])
    else:
        head_w = torch.softmax(score / cfg.tau, dim=-1)  # Eq 7
    fused = torch.einsum("bh,bhij->bij", head_w, ghat)  # Eq 8, then rownorm
    fused = _safe_divide(fused, fused.sum(-1, keepdim=True))
    return fused, head_w, evidence


def depth_prior(layers: list[int], num_layers: int, cfg: GlimpseConfig) -> torch.Tensor:
    """s^l over the propagated layers (0-based indices in `layers`), Eq 10."""
    if not cfg.depth_prior:
        return torch.full((len(layers),), 1.0 / len(layers))
    depth = torch.tensor(layers, dtype=torch.float32) + 1  # l = 1..L
    if cfg.depth_prior_form == "normalized":
        logits = cfg.kappa * depth / num_layers
    else:
        logits = cfg.lambda_d * depth  # λ_d·(l+1) with 0-based l
    return torch.softmax(logits, dim=0)


def layer_weights(evidence: torch.Tensor, prior: torch.Tensor, cfg: GlimpseConfig) -> torch.Tensor:
    """α (B, L') from evidence (B, L') and prior (L',): Eq 9 normalization and Eq 11."""
    if cfg.layer_relevance:
        g = _safe_divide(evidence, evidence.sum(-1, keepdim=True))
    else:
        g = torch.full_like(evidence, 1.0 / evidence.shape[-1])
    gs = g * prior.to(g)
    return _safe_divide(gs, gs.sum(-1, keepdim=True))  # Eq 11


def propagate_row(fused: torch.Tensor, alpha: torch.Tensor, start: torch.Tensor,
                  cfg: GlimpseConfig) -> torch.Tensor:
    """Row `start` of (c·I + α^LĀ^L)···(c·I + α^1Ā^1) for each token (Eq 12-14), c = 1
    ("additive") or 2 ("literal"). fused (B, L', N, N) in layer order, alpha (B, L'),
    start (B,) -> (B, N). Later layers multiply on the left, so the row meets them first."""
    c = 1.0 if cfg.propagation == "additive" else 2.0
    v = torch.nn.functional.one_hot(start, fused.shape[-1]).to(fused)
    for i in reversed(range(fused.shape[1])):
        v = c * v + alpha[:, i, None] * torch.bmm(v[:, None, :], fused[:, i])[:, 0]
    return v


# ---- gradients -----------------------------------------------------------------------------
def _token_gradients(z: torch.Tensor, probs: list[torch.Tensor], tokens: torch.Tensor):
    """d z_t / d A for each t in `tokens`: a list over layers of (len(tokens), H, N, N), and the
    mode used. One batched backward (vmap over autograd), or a loop if that fails."""
    outputs = z[tokens]
    try:
        eye = torch.eye(len(tokens), dtype=z.dtype, device=z.device)
        grads = torch.autograd.grad(outputs, probs, grad_outputs=eye, is_grads_batched=True,
                                    retain_graph=True)
        return [g[:, 0] for g in grads], "batched"
    except RuntimeError:  # an op without a batching rule, or out of memory: one token at a time
        per_token = [torch.autograd.grad(outputs[k], probs, retain_graph=True)
                     for k in range(len(tokens))]
        return [torch.stack([g[i][0] for g in per_token]) for i in range(len(probs))], "loop"


def attention_gradients(ctx: AttributionContext, layers: list[int],
                        tokens: torch.Tensor | None = None) -> torch.Tensor:
    """G: (T, L', H, N, N) = d z_t / d A^{l,h} for every answer token (fast path; for tests and
    diagnostics; the method itself never holds this tensor)."""
    tokens = torch.arange(ctx.num_answer_tokens) if tokens is None else tokens
    logits, captured = ctx.forward(CaptureSpec(layers=layers), check=True)
    probs = [captured.probs[layer] for layer in layers]
    grads, _ = _token_gradients(ctx.target_logits(logits), probs, tokens.to(logits.device))
    return torch.stack(grads, dim=1).float()


def relevance_rows(ctx: AttributionContext, cfg: GlimpseConfig):
    """Fast path. Returns rows (T, N) = R_t[t-1, :] in fp32, alpha (T, L'), head weights
    (T, L', H), the propagated layers and the gradient mode."""
    if cfg.memory_mode == "replay":
        return relevance_rows_replay(ctx, cfg)
    layers = list(ctx.layers(last_fraction=cfg.last_fraction))
    logits, captured = ctx.forward(CaptureSpec(layers=layers), check=True)
    z = ctx.target_logits(logits)
    probs = [captured.probs[layer] for layer in layers]
    prior = depth_prior(layers, ctx.adapter.num_layers, cfg).to(z.device)
    num_tokens, n = ctx.num_answer_tokens, ctx.seq_len
    heads = probs[0].shape[1]
    rows = torch.zeros(num_tokens, n, device=z.device)
    alpha = torch.zeros(num_tokens, len(layers), device=z.device)
    head_w = torch.zeros(num_tokens, len(layers), heads, device=z.device)
    modes = set()
    for start in range(0, num_tokens, cfg.token_chunk):
        tokens = torch.arange(start, min(start + cfg.token_chunk, num_tokens), device=z.device)
        grads, mode = _token_gradients(z, probs, tokens)
        modes.add(mode)
        fused = torch.zeros(len(tokens), len(layers), n, n, device=z.device)
        evidence = torch.zeros(len(tokens), len(layers), device=z.device)
        for i in range(len(layers)):
            g, grads[i] = grads[i].float(), None  # free each layer's raw gradients once fused
            attn = probs[i][0].detach().float()  # (H, N, N); fp32 copy only while in use
            fused[:, i], head_w[tokens, i], evidence[:, i] = fuse_heads(attn, g, cfg)
        alpha[tokens] = layer_weights(evidence, prior, cfg)
        rows[tokens] = propagate_row(fused, alpha[tokens], ctx.predict_rows[tokens], cfg)
    return rows, alpha, head_w, layers, "+".join(sorted(modes))


def _record_layers(ctx: AttributionContext, layers: list[int]):
    """One forward with SDPA everywhere (under the capture's mask function, so every layer gets
    an explicit causal/prefix-LM mask), no graph. Returns per layer in `layers` its input hidden
    state and call kwargs, and the last layer's output."""
    decoder = ctx.adapter.decoder_layers()
    inputs: dict[int, tuple[torch.Tensor, dict]] = {}
    last: list[torch.Tensor] = []

    def pre_hook(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            inputs[index] = (hidden.detach(), rest)
        return hook

    def out_hook(module, args, output):
        last.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [decoder[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True)
               for i in layers]
    handles.append(decoder[layers[-1]].register_forward_hook(out_hook))
    try:
        with torch.no_grad(), capture(ctx.model, ctx.adapter, CaptureSpec(layers=[])):
            logits = ctx.model(**ctx.inputs, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    ctx.check_against_plain(logits)
    return inputs, last[-1]


def _replay_vjp(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, captured, index: int,
                dout: torch.Tensor, need_input: bool):
    """Replay one decoder layer with explicit attention; VJPs of its output with the rows of
    `dout` (c, *out.shape): d/dA (c, 1, H, N, N) and d/dh (c, *h.shape) (or None)."""
    def replay():
        leaf = hidden.detach().requires_grad_(True)
        out = layer(leaf, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out, ([captured.probs[index], leaf] if need_input else [captured.probs[index]])

    with torch.enable_grad():
        try:
            out, wrt = replay()
            grads = torch.autograd.grad(out, wrt, grad_outputs=dout, is_grads_batched=True)
            mode = "batched"
        except RuntimeError:  # no batching rule, or out of memory: one token at a time
            out = wrt = grads = None  # a failed backward may have freed the graph: redo it
            out, wrt = replay()
            per = [torch.autograd.grad(out, wrt, grad_outputs=d, retain_graph=k < len(dout) - 1)
                   for k, d in enumerate(dout)]
            grads = [torch.stack([p[k] for p in per]) for k in range(len(wrt))]
            mode = "loop"
    return grads[0], (grads[1] if need_input else None), mode


def relevance_rows_replay(ctx: AttributionContext, cfg: GlimpseConfig):
    """`relevance_rows` with layer-by-layer replay (memory_mode="replay"); same returns.

    dz_t/dA^l = VJP of layer l alone, at its saved input h^l, with dz_t/d(out^l): the output of
    layer l reaches z_t only through layers l+1..L, so carrying v_l = dz_t/d(out^l) downwards
    (v_{l-1} = VJP of layer l w.r.t. h^l, since out^{l-1} = h^l) gives exactly the full
    backward's gradients, one layer's N x N graph at a time."""
    layers = list(ctx.layers(last_fraction=cfg.last_fraction))
    if layers != list(range(layers[0], ctx.adapter.num_layers)):
        raise ValueError("replay needs the propagated layers to be the last ones")
    saved, last_out = _record_layers(ctx, layers)
    decoder = ctx.adapter.decoder_layers()
    # dz_t/d(out^L): z_t reads row t-1 of the last layer's output through final norm + LM head.
    top = last_out[0, ctx.predict_rows].detach().requires_grad_(True)  # (T, D)
    with torch.enable_grad():
        z = ctx.logit_lens(top).gather(1, ctx.answer_ids_tensor[:, None])[:, 0]
        (top_grad,) = torch.autograd.grad(z.sum(), top)  # row t: dz_t/dh (rows independent)
    expected = ctx.plain_logits.gather(1, ctx.answer_ids_tensor[:, None])[:, 0]
    tolerance = GUARD_TOLERANCE.get(top.dtype, 1e-3) * max(1.0, float(expected.abs().max()))
    if float((z.detach().float() - expected).abs().max()) > tolerance:
        raise RuntimeError("final norm + LM head do not reproduce the model's logits")
    prior = depth_prior(layers, ctx.adapter.num_layers, cfg).to(z.device)
    num_tokens, n = ctx.num_answer_tokens, ctx.seq_len
    rows = torch.zeros(num_tokens, n, device=z.device)
    alpha = torch.zeros(num_tokens, len(layers), device=z.device)
    head_w: torch.Tensor | None = None
    modes = set()
    with capture(ctx.model, ctx.adapter, CaptureSpec(layers=layers)) as captured:
        for start in range(0, num_tokens, cfg.token_chunk):
            tokens = torch.arange(start, min(start + cfg.token_chunk, num_tokens),
                                  device=z.device)
            dout = last_out.new_zeros(len(tokens), *last_out.shape)
            dout[torch.arange(len(tokens)), 0, ctx.predict_rows[tokens]] = \
                top_grad[tokens].to(dout.dtype)
            fused = torch.zeros(len(tokens), len(layers), n, n, device=z.device)
            evidence = torch.zeros(len(tokens), len(layers), device=z.device)
            for i in reversed(range(len(layers))):
                layer = layers[i]
                hidden, kwargs = saved[layer]
                g, dout, mode = _replay_vjp(decoder[layer], hidden, kwargs, captured, layer,
                                            dout, need_input=i > 0)
                modes.add(mode)
                attn = captured.probs.pop(layer)[0].detach().float()  # (H, N, N)
                if head_w is None:
                    head_w = torch.zeros(num_tokens, len(layers), attn.shape[0],
                                         device=z.device)
                g = g[:, 0].float()
                fused[:, i], head_w[tokens, i], evidence[:, i] = fuse_heads(attn, g, cfg)
                del g, attn
            alpha[tokens] = layer_weights(evidence, prior, cfg)
            rows[tokens] = propagate_row(fused, alpha[tokens], ctx.predict_rows[tokens], cfg)
    mode = "+".join(f"replay-{m}" for m in sorted(modes))
    return rows, alpha, head_w, layers, mode


# ---- Eq 15-23: token weights and maps ----------------------------------------------------------
def _normalize_tokens(x: torch.Tensor) -> torch.Tensor:
    """L1-normalize over answer tokens; uniform when everything is zero."""
    total = x.sum()
    return x / total if total > 0 else torch.full_like(x, 1.0 / x.numel())


def token_weights(rows: torch.Tensor, conf: torch.Tensor, ctx: AttributionContext,
                  cfg: GlimpseConfig) -> dict[str, torch.Tensor]:
    """a^P, a^V (Eq 15-16), β^V, β^P (Eq 18-19), J (Eq 20); conf = p_t (Eq 17)."""
    q, v = ctx.question_positions, ctx.visual_positions
    prompt_align = rows[:, q].mean(1) if len(q) else rows.new_zeros(len(rows))  # Eq 15
    visual_align = rows[:, v].mean(1)  # Eq 16
    p = conf.to(rows) if cfg.confidence else torch.ones_like(visual_align)
    ones = torch.ones_like(p)
    beta = _normalize_tokens(p * (prompt_align if cfg.prompt_weighting else ones))  # Eq 18-19
    beta_prompt = _normalize_tokens(p * (visual_align if cfg.prompt_weighting else ones))
    joint = _normalize_tokens(p * prompt_align * visual_align)  # Eq 20
    return {"beta": beta, "beta_prompt": beta_prompt, "joint": joint,
            "visual_alignment": visual_align, "prompt_alignment": prompt_align}


def is_function_token(text: str) -> bool:
    word = text.replace("Ġ", "").replace("▁", "").replace("##", "").strip().lower()
    return word in FUNCTION_WORDS or not any(ch.isalnum() for ch in word)


def relevance_flow(joint: torch.Tensor, rows: torch.Tensor, ctx: AttributionContext,
                   cfg: GlimpseConfig, identity: float) -> torch.Tensor:
    """Eq 21-22, our reading: each function token f moves λ_f of its J_f to the content token k
    it is most strongly linked to in R, link(f, k) = R_f[f-1, pos(k)] for k < f ("attended"),
    plus R_k[k-1, pos(f)] for k > f with "either". The trivial identity term of R is excluded
    (`identity` = its coefficient). Display weight only; L1-normalized."""
    positions = ctx.answer_positions.tolist()
    links = rows[:, positions].clone()  # links[t, k] = R_t[t-1, pos(k)]
    for t in range(1, len(positions)):
        links[t, t - 1] -= identity  # pos(y_{t-1}) = row t-1: R's own identity term
    links = torch.tril(links, diagonal=-1)  # only earlier tokens are visible to row t-1
    if cfg.flow_links == "either":
        links = links + links.T
    function = [is_function_token(s) for s in ctx.answer_token_texts()]
    display = joint.clone()
    for f, is_function in enumerate(function):
        strengths = [float(links[f, k]) if not function[k] else 0.0 for k in range(len(function))]
        best = max(range(len(strengths)), key=strengths.__getitem__, default=None)
        if is_function and best is not None and strengths[best] > 0:
            moved = cfg.flow_strength * joint[f]
            display[f] -= moved
            display[best] += moved
    return _normalize_tokens(display.clamp_min(0))


def _safe_rows(x: torch.Tensor) -> torch.Tensor:
    return _safe_divide(x, x.sum(-1, keepdim=True))


def _identity_coefficient(cfg: GlimpseConfig, num_layers: int) -> float:
    return 1.0 if cfg.propagation == "additive" else 2.0 ** num_layers


def _output(rows, weights, alpha_layers, head_w_layers, layers, ctx, cfg, mode) -> MethodOutput:
    """Eq 23 maps and the MethodOutput (shared by the fast path and the reference)."""
    v, q = ctx.visual_positions, ctx.question_positions
    visual = (weights["beta"][:, None] * rows[:, v]).sum(0)  # Eq 23
    prompt = (weights["beta_prompt"][:, None] * rows[:, q]).sum(0)
    per_token = _safe_rows(rows[:, v])
    num_layers = ctx.adapter.num_layers
    alpha = np.zeros((len(rows), num_layers), dtype=np.float32)
    head_w = np.zeros((len(rows), num_layers, head_w_layers.shape[-1]), dtype=np.float32)
    alpha[:, layers] = alpha_layers.detach().cpu().float().numpy()
    head_w[:, layers] = head_w_layers.detach().cpu().float().numpy()
    return MethodOutput(
        visual_map=_np(ctx.to_grid(visual)),
        per_token_maps=_np(ctx.to_grid(per_token)),
        token_weights={k: _np(w) for k, w in weights.items()},
        prompt_saliency=_np(prompt),
        settings=settings_dict(cfg),
        extras={"alpha": alpha, "head_weights": head_w, "layers": list(layers),
                "gradient_mode": mode},
    )


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().float().numpy()


@register_method("glimpse", config=GlimpseConfig, needs_gradients=True,
                 summary="GLIMPSE: gradient-weighted attention, adaptive layer propagation, "
                         "cross-modal token weighting")
def attribute(ctx: AttributionContext, cfg: GlimpseConfig) -> MethodOutput:
    rows, alpha, head_w, layers, mode = relevance_rows(ctx, cfg)
    rows = rows.detach()
    weights = token_weights(rows, ctx.token_probabilities, ctx, cfg)
    if cfg.relevance_flow:
        identity = _identity_coefficient(cfg, len(layers))
        weights["display"] = relevance_flow(weights["joint"], rows, ctx, cfg, identity)
    return _output(rows, weights, alpha, head_w, layers, ctx, cfg, mode)


# ---- reference ---------------------------------------------------------------------------------
def reference_glimpse(ctx: AttributionContext, cfg: GlimpseConfig) -> MethodOutput:
    """GLIMPSE written plainly, for tests: per answer token a fresh forward and backward, per-head
    loops, the full N x N relevance matrix R = I; R <- R + αĀR (or R + (I+αĀ)R) in float64,
    and the token weights in Python loops. Slow (T forwards, O(L·N³) per token)."""
    layers = list(ctx.layers(last_fraction=cfg.last_fraction))
    num_layers, n, f64 = ctx.adapter.num_layers, ctx.seq_len, torch.float64
    if cfg.depth_prior:
        if cfg.depth_prior_form == "normalized":
            logit = [cfg.kappa * (layer + 1) / num_layers for layer in layers]
        else:
            logit = [cfg.lambda_d * (layer + 1) for layer in layers]
        exps = [math.exp(x - max(logit)) for x in logit]
        prior = [e / sum(exps) for e in exps]
    else:
        prior = [1.0 / len(layers)] * len(layers)
    rows, alphas, head_ws = [], [], []
    for t in range(ctx.num_answer_tokens):
        logits, captured = ctx.forward(CaptureSpec(layers=layers), check=False)
        z_t = ctx.target_logits(logits)[t]
        grads = torch.autograd.grad(z_t, [captured.probs[layer] for layer in layers])
        fused_layers, evidence, token_head_w = [], [], []
        for i, layer in enumerate(layers):
            attn = captured.probs[layer][0].detach().to(f64)  # (H, N, N)
            grad = grads[i][0].to(f64)
            heads = attn.shape[0]
            ghats, scores = [], []
            for h in range(heads):
                relu_g = torch.clamp(grad[h], min=0)
                ghat = attn[h] * relu_g
                ghats.append(ghat)
                mass = float(relu_g.sum())
                scores.append(float(ghat.sum()) / mass if mass > 0 else 0.0)
            if cfg.head_average:
                w = [1.0 / heads] * heads
            else:
                exps = [math.exp((s - max(scores)) / cfg.tau) for s in scores]
                w = [e / sum(exps) for e in exps]
            fused = sum(w[h] * ghats[h] for h in range(heads))
            for r in range(n):
                total = float(fused[r].sum())
                fused[r] = fused[r] / total if total > 0 else 0.0
            fused_layers.append(fused)
            evidence.append(float(sum(grad[h] for h in range(heads)).abs().sum()))
            token_head_w.append(w)
        if cfg.layer_relevance:
            total = sum(evidence)
            g = [e / total if total > 0 else 0.0 for e in evidence]
        else:
            g = [1.0 / len(layers)] * len(layers)
        gs = [g[i] * prior[i] for i in range(len(layers))]
        alpha = [x / sum(gs) if sum(gs) > 0 else 0.0 for x in gs]
        eye = torch.eye(n, dtype=f64)
        relevance = eye.clone()
        for i in range(len(layers)):  # l = 1 .. L, later layers on the left
            step = alpha[i] * fused_layers[i] @ relevance
            if cfg.propagation == "additive":
                relevance = relevance + step
            else:
                relevance = relevance + (eye + alpha[i] * fused_layers[i]) @ relevance
        rows.append(relevance[int(ctx.predict_rows[t])])
        alphas.append(alpha)
        head_ws.append(token_head_w)
    rows = torch.stack(rows)
    visual_pos, question_pos = ctx.visual_positions.tolist(), ctx.question_positions.tolist()
    probs = ctx.token_probabilities.tolist()
    a_p, a_v, raw_beta, raw_beta_p, raw_joint = [], [], [], [], []
    for t in range(len(rows)):
        ap = sum(float(rows[t, i]) for i in question_pos) / max(len(question_pos), 1)
        av = sum(float(rows[t, j]) for j in visual_pos) / len(visual_pos)
        p = probs[t] if cfg.confidence else 1.0
        a_p.append(ap)
        a_v.append(av)
        raw_beta.append(p * (ap if cfg.prompt_weighting else 1.0))
        raw_beta_p.append(p * (av if cfg.prompt_weighting else 1.0))
        raw_joint.append(p * ap * av)

    def normalized(values):
        total = sum(values)
        return [x / total if total > 0 else 1.0 / len(values) for x in values]

    weights = {"beta": normalized(raw_beta), "beta_prompt": normalized(raw_beta_p),
               "joint": normalized(raw_joint), "visual_alignment": a_v, "prompt_alignment": a_p}
    weights = {k: torch.tensor(v, dtype=f64) for k, v in weights.items()}
    if cfg.relevance_flow:
        identity = _identity_coefficient(cfg, len(layers))
        weights["display"] = relevance_flow(weights["joint"], rows, ctx, cfg, identity)
    return _output(rows, weights, torch.tensor(alphas), torch.tensor(head_ws), layers, ctx, cfg,
                   "reference")
