"""Grad-CAM on the decoder's hidden states of the visual tokens (Selvaraju et al. 2017,
"Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", ICCV),
applied per answer token as in LVLM comparison tables.

Notation -> code (DESIGN §3; equation numbers of the Grad-CAM paper):
  h^l_{j,c}          hidden[j, c]    output of decoder layer l at visual token j, channel c
  z_t                z[t]            raw logit of y_t at row t-1
  alpha^t_c          alpha[t, c]     (1/|V|) sum_{j in V} d z_t / d h^l_{j,c}          (Eq. 1)
  M_t                token_maps[t]   ReLU(sum_c alpha^t_c h^l_{V,c})                   (Eq. 2)
  sequence map       mean_t M_t

Layer choice. The visual tokens play the role of the CNN's spatial positions and the decoder
layer's output the role of the feature map. The paper takes the last convolutional layer; here
the output of the *last* decoder layer cannot be used: after it, position j only feeds its own
logits (final norm and LM head act per position), so d z_t / d h^L_V is identically zero. The
default `layer = -2` (output of the second-to-last decoder layer = input of the last one) is the
deepest hidden state through which visual tokens still reach z_t, the analogue of "last conv
layer". Any other layer can be chosen.

True per-token gradients: one forward, then exact d z_t / d h^l for chunks of tokens through
vectorized backwards (`is_grads_batched`). The hidden states need a gradient path, so the image
tensors are made to require gradients (parameters are frozen); nothing is differentiated w.r.t.
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..capture import CaptureSpec
from ..context import AttributionContext
from ..schema import MethodOutput
from ._common import per_token_gradients, sequence_output
from .registry import register_method


@dataclass(frozen=True)
class GradCamConfig:
    # Decoder layer whose output is the feature map (Python-style index over the L layers).
    # -2 = input of the last layer (see the module docstring); -1 is rejected (zero gradients).
    layer: int = -2
    token_chunk: int = 8  # answer tokens per vectorized backward
    # Largest token_chunk the service accepts: memory grows with it (answers are <= 64 tokens).
    COST_LIMITS: ClassVar[dict[str, int]] = {"token_chunk": 64}

    def validate(self) -> None:
        if self.layer == -1:
            raise ValueError("layer -1 (the last decoder layer's output) has zero gradient from "
                             "the visual tokens to any logit; use -2 or an earlier layer")
        if self.token_chunk < 1:
            raise ValueError("token_chunk must be >= 1")


def resolve_layer(layer: int, num_layers: int) -> int:
    index = layer + num_layers if layer < 0 else layer
    if not 0 <= index < num_layers - 1:
        raise ValueError(f"layer {layer} is not in [-{num_layers}, -2] or [0, {num_layers - 2}] "
                         f"for a {num_layers}-layer decoder (the last layer's output has zero "
                         "gradient from the visual tokens)")
    return index


def gradcam_maps(hidden: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Eqs. 1-2. hidden: (|V|, D) visual hidden states; grads: (T, |V|, D) = d z_t / d hidden.
    Returns (T, |V|)."""
    alpha = grads.mean(1)  # (T, D), global average pooling over the visual tokens
    return torch.relu(alpha @ hidden.T)


def gradcam_inputs(ctx: AttributionContext) -> dict[str, torch.Tensor]:
    """ctx.inputs with the image tensors requiring gradients (gives the hidden states a graph)."""
    inputs = dict(ctx.inputs)
    for key, value in ctx.adapter.image_inputs(inputs).items():
        if value.is_floating_point():
            inputs[key] = value.detach().clone().requires_grad_(True)
    return inputs


@register_method("gradcam", config=GradCamConfig, needs_gradients=True,
                 summary="Grad-CAM on decoder hidden states of the visual tokens, per token")
def attribute(ctx: AttributionContext, cfg: GradCamConfig) -> MethodOutput:
    layer = resolve_layer(cfg.layer, ctx.adapter.num_layers)
    logits, captured = ctx.forward(CaptureSpec(layers=[], layer_outputs=True),
                                   inputs=gradcam_inputs(ctx), check=False)
    ctx.check_against_plain(logits)  # the inputs are equal in value, so the usual check applies
    hidden = captured.layer_outputs[layer]  # (1, N, D)
    z = ctx.target_logits(logits)  # (T,)
    (grads,) = per_token_gradients(z, [hidden], cfg.token_chunk)  # (T, 1, N, D)
    visual = ctx.visual_positions
    token_maps = gradcam_maps(hidden[0, visual].detach().float(), grads[:, 0, visual].float())
    return sequence_output(ctx, token_maps, cfg, extras={"layer": layer})
