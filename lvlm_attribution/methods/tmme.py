"""TMME / CheferCAM: gradient-weighted attention relevance propagation (Chefer, Gur & Wolf 2021,
"Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers", ICCV; code: hila-chefer/Transformer-MM-Explainability).

Notation -> code (DESIGN §3; equation numbers of the paper, self-attention rules only: the
decoder of an LVLM is one self-attention stack over [visual | prompt | answer]):
  A^{l,h}            probs[l][h]      post-softmax attention of layer l, head h, (N, N)
  G^{l,h}_t          grads[l][t, h]   d z_t / d A^{l,h}, all rows (rows >= t are exactly 0)
  Ā^l_t              a_bar            E_h[(G^{l,h}_t ⊙ A^{l,h})^+]                        (Eq. 5)
  R_t                                 R ← I; for l = 1..L: R ← R + Ā^l_t R          (Eqs. 6-7)
                                      i.e. R_t = (I + Ā^L_t) ··· (I + Ā^1_t)
  M_t                token_maps[t]    R_t[t-1, V]
  sequence map       mean_t M_t

Fast path: one capture forward with all rows of the used layers; exact per-token gradients in
chunks of tokens through vectorized backwards (`is_grads_batched`, DESIGN §4); heads are fused as
soon as a chunk's gradients exist; only row t-1 of R_t is needed, so a row vector is propagated
from the top layer down, v ← v + v Ā^l_t for l = L..1 (N² per layer and token instead of N³).
`reference_tmme` is the plain procedure (one forward and backward per token, the full N×N R,
loops over heads and layers); a test checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..capture import CaptureSpec
from ..context import AttributionContext
from ..schema import MethodOutput
from ._common import per_token_gradient_chunks, sequence_output
from .registry import register_method


@dataclass(frozen=True)
class TmmeConfig:
    last_k_layers: int | None = None  # None = all layers (paper); k = only the last k layers
    token_chunk: int = 8  # answer tokens per vectorized backward (memory vs speed)
    # Largest token_chunk the service accepts: memory grows with it (answers are <= 64 tokens).
    COST_LIMITS: ClassVar[dict[str, int]] = {"token_chunk": 64}

    def validate(self) -> None:
        if self.last_k_layers is not None and self.last_k_layers < 1:
            raise ValueError("last_k_layers must be >= 1")
        if self.token_chunk < 1:
            raise ValueError("token_chunk must be >= 1")


def chefer_layer(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Eq. 5: Ā = E_h[(G ⊙ A)^+]. attn, grad: (..., H, N, N) -> (..., N, N)."""
    return (grad * attn).clamp_min(0).mean(-3)


def propagate_full(a_bar: torch.Tensor) -> torch.Tensor:
    """Eqs. 6-7 as written: R = I; R ← R + Ā^l R for l = 1..L. a_bar: (L, N, N) -> R (N, N)."""
    relevance = torch.eye(a_bar.shape[-1], dtype=a_bar.dtype, device=a_bar.device)
    for layer in range(a_bar.shape[0]):
        relevance = relevance + a_bar[layer] @ relevance
    return relevance


def propagate_rows(a_bar: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Row `rows[t]` of R_t = (I + Ā^L_t) ··· (I + Ā^1_t) for each token t.
    a_bar: (L, T, N, N) per-token fused layers -> (T, N)."""
    num_tokens, n = a_bar.shape[1], a_bar.shape[-1]
    v = torch.zeros(num_tokens, 1, n, dtype=a_bar.dtype, device=a_bar.device)
    v[torch.arange(num_tokens, device=v.device), 0, rows.to(v.device)] = 1.0  # e_{t-1}^T
    for layer in reversed(range(a_bar.shape[0])):
        v = v + torch.bmm(v, a_bar[layer])
    return v[:, 0]


def tmme_rows(ctx: AttributionContext, layers: list[int], token_chunk: int) -> torch.Tensor:
    """Fast path: (T, N) rows t-1 of R_t from one forward and T/chunk vectorized backwards."""
    logits, captured = ctx.forward(CaptureSpec(layers=layers, rows=None), check=True)
    probs = [captured.probs[k] for k in layers]  # (1, H, N, N) each, in the graph
    attn = [p[0].detach().float() for p in probs]
    z = ctx.target_logits(logits)  # (T,)
    out = []
    for start, stop, grads in per_token_gradient_chunks(z, probs, token_chunk):
        # grads[k]: (c, 1, H, N, N); fuse heads now so only (L, c, N, N) is kept
        a_bar = torch.stack([chefer_layer(a, g[:, 0].float())
                             for a, g in zip(attn, grads, strict=True)])
        out.append(propagate_rows(a_bar, ctx.predict_rows[start:stop]))
    return torch.cat(out)


def tmme_token_maps(ctx: AttributionContext, cfg: TmmeConfig) -> torch.Tensor:
    """(T, |V|): M_t = R_t[t-1, V] by the fast path."""
    layers = list(ctx.layers(last_k=cfg.last_k_layers))
    return tmme_rows(ctx, layers, cfg.token_chunk)[:, ctx.visual_positions]


def reference_tmme(ctx: AttributionContext, cfg: TmmeConfig) -> torch.Tensor:
    """The plain procedure, for tests: per answer token a fresh forward and backward, the full
    N×N relevance matrix, explicit loops over tokens, layers and heads. Returns (T, |V|)."""
    layers = list(ctx.layers(last_k=cfg.last_k_layers))
    maps = []
    for t in range(ctx.num_answer_tokens):
        logits, captured = ctx.forward(CaptureSpec(layers=layers, rows=None), check=False)
        z_t = ctx.target_logits(logits)[t]
        probs = [captured.probs[k] for k in layers]
        grads = torch.autograd.grad(z_t, probs)
        n, device = probs[0].shape[-1], probs[0].device
        relevance = torch.eye(n, device=device)
        for attn, grad in zip(probs, grads, strict=True):
            heads = attn.shape[1]
            a_bar = torch.zeros(n, n, device=device)
            for h in range(heads):
                a_bar = a_bar + torch.relu(grad[0, h].float() * attn[0, h].detach().float())
            a_bar = a_bar / heads
            relevance = relevance + a_bar @ relevance
        maps.append(relevance[int(ctx.predict_rows[t]), ctx.visual_positions])
    return torch.stack(maps)


@register_method("tmme", config=TmmeConfig, needs_gradients=True,
                 summary="TMME / CheferCAM: R += E_h[(grad ⊙ A)+] R per token, row t-1")
def attribute(ctx: AttributionContext, cfg: TmmeConfig) -> MethodOutput:
    return sequence_output(ctx, tmme_token_maps(ctx, cfg), cfg)
