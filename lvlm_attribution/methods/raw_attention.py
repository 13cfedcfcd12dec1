"""Raw attention: the mean attention the predicting row pays to the visual tokens (baseline).

Notation -> code (DESIGN §3):
  A^{l,h}[t-1, :]    probs[l][h, t, :]   post-softmax attention of row t-1 (captured rows only)
  M_t                token_maps[t]       (1/|L|) sum_l (1/H) sum_h A^{l,h}[t-1, V]     (Eq. R1)
  sequence map       mean_t M_t                                                    (Eq. R2)

The simplest attention baseline used in the attention-explainability literature (e.g. Abnar &
Zuidema 2020, "Quantifying Attention Flow in Transformers", ACL, §2 "raw attention"; Chefer et
al. 2021 use it as a baseline too). Forward only: one capture forward of the selected layers'
rows t-1 under `torch.no_grad()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import CaptureSpec
from ..context import AttributionContext
from ..schema import MethodOutput
from ._common import forward_only_capture, sequence_output
from .registry import register_method


@dataclass(frozen=True)
class RawAttentionConfig:
    last_k_layers: int | None = None  # None = mean over all decoder layers (the usual baseline)
    head_fusion: str = "mean"  # "mean" over heads (baseline); "max" as an ablation

    def validate(self) -> None:
        if self.last_k_layers is not None and self.last_k_layers < 1:
            raise ValueError("last_k_layers must be >= 1")
        if self.head_fusion not in ("mean", "max"):
            raise ValueError("head_fusion must be 'mean' or 'max'")


def raw_attention_maps(probs: torch.Tensor, visual: torch.Tensor,
                       head_fusion: str = "mean") -> torch.Tensor:
    """Eq. R1. probs: (L, H, T, N) attention of the predicting rows. Returns (T, |V|)."""
    fused = probs.mean(1) if head_fusion == "mean" else probs.amax(1)  # (L, T, N)
    return fused.mean(0)[:, visual]


@register_method("raw_attention", config=RawAttentionConfig, needs_gradients=False,
                 summary="Raw attention: mean over heads and layers of A[t-1, V]")
def attribute(ctx: AttributionContext, cfg: RawAttentionConfig) -> MethodOutput:
    layers = list(ctx.layers(last_k=cfg.last_k_layers))
    captured = forward_only_capture(ctx, CaptureSpec(layers=layers, rows=ctx.predict_rows))
    probs = torch.stack([captured.probs[k][0] for k in layers]).float()  # (L, H, T, N)
    token_maps = raw_attention_maps(probs, ctx.visual_positions, cfg.head_fusion)
    return sequence_output(ctx, token_maps, cfg)
