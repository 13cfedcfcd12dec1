"""AttnGrad: attention weighted by positive logit-lens gradients, summed over layers (the
gradient-weighted attention baseline used in LVLM attribution comparisons, e.g. the DEX-AR paper,
arXiv 2603.06302; the A ⊙ ReLU(∇A) form follows Chefer et al. 2021 Eq. 5 without propagation).

Notation -> code (DESIGN §3):
  o^l_t              lens logit      lm_head(final_norm(h^l[t-1]))[y_t]
  A^{l,h}[t-1, :]    attn[l, h, t]   post-softmax attention of row t-1
  g^{t,l,h}          grads[l, h, t]  d o^l_t / d A^{l,h} at row t-1, layer l's own attention only
  M_t                token_maps[t]   sum_l (1/H) sum_h (A ⊙ ReLU(g))^{t,l,h}[t-1, V]   (Eq. G1)
  sequence map       mean_t M_t                                                   (Eq. G2)

One pass, exact (DESIGN §4, as in dexar.py): teacher-force once with every decoder layer's input
a fresh leaf, so o^l reaches only layer l's own attention; sum o^l_t over layers and tokens; one
backward. Row t-1 of the gradient w.r.t. A^l is then exactly d o^l_t / d A^l (rows are separate:
row t-1 of layer l's output depends only on row t-1 of A^l once the input is a leaf). Only the
rows t-1 are materialized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import AttributionContext, ContextBatch
from ..schema import MethodOutput
from ._common import sequence_output
from .dexar import batch_lens_attention_and_gradients
from .registry import register_method


@dataclass(frozen=True)
class AttnGradConfig:
    last_k_layers: int | None = None  # None = sum over all layers

    def validate(self) -> None:
        if self.last_k_layers is not None and self.last_k_layers < 1:
            raise ValueError("last_k_layers must be >= 1")


def attngrad_maps(attn: torch.Tensor, grads: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Eq. G1. attn, grads: (L, H, T, N) at the predicting rows. Returns (T, |V|)."""
    return (attn * grads.clamp_min(0)).mean(1).sum(0)[:, visual]


def attribute_batch(batch: ContextBatch, cfg: AttnGradConfig) -> list[MethodOutput]:
    """Every request's AttnGrad from one forward and one backward over the batch."""
    layers = list(batch.contexts[0].layers(last_k=cfg.last_k_layers))
    pairs = batch_lens_attention_and_gradients(batch, layers)
    return [sequence_output(ctx, attngrad_maps(attn, grads, ctx.visual_positions), cfg)
            for ctx, (attn, grads) in zip(batch.contexts, pairs, strict=True)]


@register_method("attngrad", config=AttnGradConfig, needs_gradients=True, batch=attribute_batch,
                 summary="AttnGrad: sum over layers of E_h[A ⊙ ReLU(d o^l / d A)], row t-1")
def attribute(ctx: AttributionContext, cfg: AttnGradConfig) -> MethodOutput:
    return attribute_batch(ContextBatch([ctx]), cfg)[0]
