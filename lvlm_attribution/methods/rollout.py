"""Attention Rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", ACL).

Notation -> code (DESIGN §3; equation numbers of the paper's §3):
  A^l                attn[l]         head-fused attention of layer l, (N, N), fusion = mean
  Â^l                a_hat[l]        rownorm(w·I + (1-w)·A^l), w = 0.5          (residual, Eq. 1)
  R                  rollout(...)    Â^L Â^{L-1} ··· Â^1                     (recursion, Eq. 2)
  M_t                token_maps[t]   R[t-1, V]
  sequence map       mean_t M_t

Forward only, all query rows of every used layer are needed (R mixes rows). Fast path: only the
T rows t-1 of R are wanted, so propagate row vectors, v ← v Â^l for l = L..1 (T·N² per layer
instead of N³); `rollout` is the plain full-matrix product, kept as the reference.
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
class RolloutConfig:
    residual_weight: float = 0.5  # w in Â = w·I + (1-w)·A (paper: 0.5)
    head_fusion: str = "mean"  # paper: mean over heads; "max"/"min" are common variants
    last_k_layers: int | None = None  # None = all layers (paper)

    def validate(self) -> None:
        if not 0.0 <= self.residual_weight <= 1.0:
            raise ValueError("residual_weight must be in [0, 1]")
        if self.head_fusion not in ("mean", "max", "min"):
            raise ValueError("head_fusion must be 'mean', 'max' or 'min'")
        if self.last_k_layers is not None and self.last_k_layers < 1:
            raise ValueError("last_k_layers must be >= 1")


def fuse_heads(probs: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(..., H, N, N) -> (..., N, N)."""
    if how == "mean":
        return probs.mean(-3)
    return probs.amax(-3) if how == "max" else probs.amin(-3)


def residual_attention(attn: torch.Tensor, residual_weight: float = 0.5) -> torch.Tensor:
    """Eq. 1: Â = rownorm(w·I + (1-w)·A) for attn (L, N, N) (already head-fused)."""
    eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    a_hat = residual_weight * eye + (1.0 - residual_weight) * attn
    return a_hat / a_hat.sum(-1, keepdim=True).clamp_min(1e-12)


def rollout(a_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 2, the full product R = Â^L ··· Â^1 for a_hat (L, N, N) (layer 1 first). Reference."""
    result = torch.eye(a_hat.shape[-1], dtype=a_hat.dtype, device=a_hat.device)
    for layer in range(a_hat.shape[0]):
        result = a_hat[layer] @ result
    return result


def rollout_rows(a_hat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of R = Â^L ··· Â^1, (T, N), by row-vector propagation from the top layer."""
    v = torch.zeros(len(rows), a_hat.shape[-1], dtype=a_hat.dtype, device=a_hat.device)
    v[torch.arange(len(rows), device=v.device), rows.to(v.device)] = 1.0  # e_{t-1}^T
    for layer in reversed(range(a_hat.shape[0])):
        v = v @ a_hat[layer]
    return v


@register_method("rollout", config=RolloutConfig, needs_gradients=False,
                 summary="Attention Rollout: product of 0.5·I + 0.5·A over layers, row t-1")
def attribute(ctx: AttributionContext, cfg: RolloutConfig) -> MethodOutput:
    layers = list(ctx.layers(last_k=cfg.last_k_layers))
    captured = forward_only_capture(ctx, CaptureSpec(layers=layers, rows=None))
    attn = torch.stack([fuse_heads(captured.probs[k][0].float(), cfg.head_fusion)
                        for k in layers])  # (L, N, N), fused layer by layer
    a_hat = residual_attention(attn, cfg.residual_weight)
    rows = rollout_rows(a_hat, ctx.predict_rows)  # (T, N)
    return sequence_output(ctx, rows[:, ctx.visual_positions], cfg)
