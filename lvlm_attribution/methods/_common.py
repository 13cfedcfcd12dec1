"""Plumbing shared by the baseline methods (raw attention, rollout, Grad-CAM, TMME, AttnGrad).

No attribution math lives here: a forward-only capture, exact per-token gradients in chunks, and
the sequence-level packaging every baseline shares (mean of the per-token maps, DESIGN §3).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..capture import Captured, CaptureSpec, capture
from ..context import AttributionContext
from ..schema import MethodOutput
from .registry import settings_dict


def forward_only_capture(ctx: AttributionContext, spec: CaptureSpec) -> Captured:
    """One capture forward under `torch.no_grad()`: the probabilities are plain tensors, no graph
    is kept. `ctx.forward` always enables gradients, so forward-only methods call this instead;
    the capture is still checked against the plain forward."""
    with torch.no_grad(), capture(ctx.model, ctx.adapter, spec) as captured:
        logits = ctx.model(**ctx.inputs).logits
    ctx.check_against_plain(logits)  # same check as ctx.forward(check=True)
    return captured


def per_token_gradient_chunks(outputs: torch.Tensor, wrt: Sequence[torch.Tensor],
                              token_chunk: int) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """Exact d outputs[t] / d wrt[k] for chunks of tokens: yields (start, stop, grads) with
    grads[k] of shape (stop - start, *wrt[k].shape).

    Each chunk is one vectorized backward (`is_grads_batched=True`, DESIGN §4: exact, faster than
    a Python loop over tokens). The graph is kept until the last chunk; a caller that reduces each
    chunk at once (e.g. fuses heads) keeps only the reduced result in memory."""
    num = outputs.shape[0]
    eye = torch.eye(num, dtype=outputs.dtype, device=outputs.device)
    for start in range(0, num, token_chunk):
        stop = min(num, start + token_chunk)
        grads = torch.autograd.grad(outputs, list(wrt), grad_outputs=eye[start:stop],
                                    is_grads_batched=True, retain_graph=stop < num,
                                    allow_unused=True)
        yield start, stop, [x.new_zeros(stop - start, *x.shape) if g is None else g
                            for g, x in zip(grads, wrt, strict=True)]  # None: no path, exactly 0


def per_token_gradients(outputs: torch.Tensor, wrt: Sequence[torch.Tensor],
                        token_chunk: int) -> list[torch.Tensor]:
    """All chunks of `per_token_gradient_chunks` concatenated: (T, *wrt[k].shape) per input."""
    parts: list[list[torch.Tensor]] = [[] for _ in wrt]
    for _, _, grads in per_token_gradient_chunks(outputs, wrt, token_chunk):
        for k, g in enumerate(grads):
            parts[k].append(g)
    return [torch.cat(p) for p in parts]


def sequence_output(ctx: AttributionContext, token_maps: torch.Tensor, cfg,
                    token_weights: dict[str, torch.Tensor] | None = None,
                    extras: dict | None = None) -> MethodOutput:
    """token_maps: (T, |V|) per-token maps read at row t-1. The sequence map is their mean."""
    token_maps = token_maps.detach().float()
    sequence = token_maps.mean(0)
    return MethodOutput(
        visual_map=ctx.to_grid(sequence).cpu().numpy(),
        per_token_maps=ctx.to_grid(token_maps).cpu().numpy(),
        token_weights={k: v.detach().float().cpu().numpy()
                       for k, v in (token_weights or {}).items()},
        settings=settings_dict(cfg),
        extras=dict(extras or {}),
    )
