"""DEX-AR: dynamic explanations for autoregressive VLMs (Bousselham et al., arXiv 2603.06302).

Notation -> code (DESIGN §3, paper 004):
  o^l_t              lens[l, t]   logit lens of layer l at row t-1 for answer token y_t
  g^{t,l,h}          grads[l][h, t, :]   d o^l_t / d A^{l,h}, row t-1, layer l's own attention
  S_V, S_T           s_visual, s_text    max of ReLU(g) over visual / text keys
  w^{t,l,h}          head_w       ReLU(S_V - S_T)                            (head filter)
  M_t                token_maps   Norm(sum_{l,h} w * ReLU(g)_V)              (per-token map)
  delta_t            delta        ReLU(max_{l,h} S_V - max_{l,h} S_T)        (token filter)
  sequence map       Norm(sum_t delta_t M_t)

Fast path (DESIGN §4): one teacher-forced forward in which every decoder layer's input is a fresh
leaf, so the residual stream carries no gradient between layers; sum o^l_t over all layers and
answer tokens; one backward. Row t-1 of d(sum)/dA^l is then exactly d o^l_t / d A^l, because with
detached inputs row t-1 of layer l's output depends on no other layer and no other row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import CaptureSpec
from ..context import AttributionContext, ContextBatch
from ..schema import MethodOutput
from .registry import register_method, settings_dict


@dataclass(frozen=True)
class DexArConfig:
    # "paper": min-max each token map, then the delta-weighted sum (Eqs. 4-6, App. G.1).
    # "official": one global min-max of ReLU(g) over all tokens/layers/heads before summing,
    #             the sequence map sums the un-normalised token maps (WalBouss/DEX-AR wrapper).
    normalization: str = "paper"
    last_k_layers: int | None = None  # None = all layers (paper); the official code uses 10
    key_aggregation: str = "max"  # "max" (paper, Table 3 best: top-1) or "mean" (ablation)
    token_filter: bool = True  # weight token maps by delta_t (False: plain sum, ablation)
    skip_first_text_token: bool = False  # official code skips the first text key after the image

    def validate(self) -> None:
        if self.normalization not in ("paper", "official"):
            raise ValueError("normalization must be 'paper' or 'official'")
        if self.key_aggregation not in ("max", "mean"):
            raise ValueError("key_aggregation must be 'max' or 'mean'")
        if self.last_k_layers is not None and self.last_k_layers < 1:
            raise ValueError("last_k_layers must be >= 1")


def lens_gradients(ctx: AttributionContext, layers: list[int]) -> torch.Tensor:
    """g: (L, H, T, N) = d o^l_t / d A^{l,h} at row t-1, all tokens and layers in one backward."""
    return lens_attention_and_gradients(ctx, layers)[1]


def lens_attention_and_gradients(ctx: AttributionContext,
                                 layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, g), each (L, H, T, N): attention at rows t-1 and d o^l_t / d A^{l,h} there, from one
    forward with detached layer inputs and one backward (the fast path above)."""
    return batch_lens_attention_and_gradients(ContextBatch([ctx]), layers)[0]


def batch_lens_attention_and_gradients(
        batch: ContextBatch, layers: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A_b, g_b) for every request b of the batch, each (L, H, T_b, N_b), from ONE forward and
    ONE backward of sum_b sum_l sum_t o^l_{b,t}. Requests do not interact in a forward, so the
    gradient of the batch sum w.r.t. A_b is request b's own; each request reads its own rows
    (within the union the forward captured) and its own first N_b keys."""
    spec = CaptureSpec(layers=layers, layer_outputs=True, detach_layer_inputs=True)
    _, captured = batch.forward(spec)
    contexts = batch.contexts
    which = torch.cat([torch.full_like(c.predict_rows, b) for b, c in enumerate(contexts)])
    rows = torch.cat([batch.union_index(b) for b in range(len(batch))])
    targets = torch.cat([c.answer_ids_tensor for c in contexts])
    with torch.enable_grad():
        total = 0
        for layer in layers:
            hidden = captured.layer_outputs[layer][which, rows]  # (sum_b T_b, D) at rows t-1
            total = total + contexts[0].logit_lens(hidden).gather(1, targets[:, None]).sum()
        probs = [captured.probs[layer] for layer in layers]
        grads = torch.autograd.grad(total, probs)
    out = []
    for b, ctx in enumerate(contexts):
        rows_b, n = batch.rows_of(b), ctx.seq_len
        attn = torch.stack([p[b][:, rows_b, :n].detach() for p in probs]).float()
        out.append((attn, torch.stack([g[b][:, rows_b, :n] for g in grads]).float()))
    return out


def reference_lens_gradients(ctx: AttributionContext, layers: list[int]) -> torch.Tensor:
    """The official procedure, plainly: one full forward and backward per answer token and layer,
    no detaching, all attention rows materialized. Slow; for tests."""
    out = None
    for t in range(ctx.num_answer_tokens):
        for i, layer in enumerate(layers):
            _, captured = ctx.forward(CaptureSpec(layers=[layer], layer_outputs=True), check=False)
            o = ctx.lens_target_logits(captured.layer_outputs[layer])[t]
            (g,) = torch.autograd.grad(o, captured.probs[layer])
            row = g[0, :, int(ctx.predict_rows[t])].float()  # (H, N)
            if out is None:
                out = torch.zeros(len(layers), row.shape[0], ctx.num_answer_tokens, row.shape[1])
            out[i, :, t] = row.cpu()
    return out


def _aggregate(values: torch.Tensor, how: str) -> torch.Tensor:
    if values.shape[-1] == 0:
        return values.new_zeros(values.shape[:-1])
    return values.amax(-1) if how == "max" else values.mean(-1)


def _minmax(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def dexar_from_gradients(g: torch.Tensor, ctx: AttributionContext, cfg: DexArConfig):
    """Everything after the gradients. g: (L, H, T, N). Returns maps and filters."""
    pos = g.clamp_min(0)  # ReLU(g)
    if cfg.normalization == "official":
        pos = _minmax(pos, dims=(0, 1, 2, 3))
    visual = pos[..., ctx.visual_positions]  # (L, H, T, |V|)
    s_visual = _aggregate(visual, cfg.key_aggregation)  # (L, H, T)
    s_text = torch.stack([
        _aggregate(pos[:, :, t, _text_keys(ctx, t, cfg)], cfg.key_aggregation)
        for t in range(ctx.num_answer_tokens)], dim=-1)  # (L, H, T)
    head_w = (s_visual - s_text).clamp_min(0)  # head filter
    raw_maps = (head_w[..., None] * visual).sum(dim=(0, 1))  # (T, |V|)
    token_maps = _minmax(raw_maps, dims=(1,))  # M_t
    delta = (s_visual.amax(dim=(0, 1)) - s_text.amax(dim=(0, 1))).clamp_min(0)  # token filter
    weights = delta if cfg.token_filter else torch.ones_like(delta)
    summed = token_maps if cfg.normalization == "paper" else raw_maps
    sequence = _minmax((weights[:, None] * summed).sum(0), dims=(0,))
    return sequence, token_maps, delta, head_w


def _text_keys(ctx: AttributionContext, t: int, cfg: DexArConfig) -> torch.Tensor:
    keys = ctx.text_key_positions[t]
    if cfg.skip_first_text_token:
        first_after_image = int(ctx.visual_positions.max()) + 1
        keys = keys[keys != first_after_image]
    return keys


def attribute_batch(batch: ContextBatch, cfg: DexArConfig) -> list[MethodOutput]:
    """Every request's DEX-AR from one forward and one backward over the batch."""
    layers = list(batch.contexts[0].layers(last_k=cfg.last_k_layers))
    grads = batch_lens_attention_and_gradients(batch, layers)
    return [dexar_output(ctx, cfg, g) for ctx, (_, g) in zip(batch.contexts, grads, strict=True)]


@register_method("dexar", config=DexArConfig, needs_gradients=True, batch=attribute_batch,
                 summary="DEX-AR: head- and token-filtered logit-lens attention gradients")
def attribute(ctx: AttributionContext, cfg: DexArConfig) -> MethodOutput:
    return attribute_batch(ContextBatch([ctx]), cfg)[0]


def dexar_output(ctx: AttributionContext, cfg: DexArConfig, g: torch.Tensor) -> MethodOutput:
    """The method's output from lens gradients g (L, H, T, N)."""
    sequence, token_maps, delta, head_w = dexar_from_gradients(g, ctx, cfg)
    return MethodOutput(
        visual_map=ctx.to_grid(sequence).detach().cpu().numpy(),
        per_token_maps=ctx.to_grid(token_maps).detach().cpu().numpy(),
        token_weights={"delta": delta.detach().cpu().numpy()},
        settings=settings_dict(cfg),
        extras={"head_weights": head_w.detach().cpu()},
    )
