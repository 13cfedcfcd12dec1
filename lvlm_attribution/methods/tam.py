"""TAM: Token Activation Map (Li et al., ICCV 2025, "Token Activation Map to Visually Explain
Multimodal LLMs", arXiv 2506.23270; official code xmed-lab/TAM, `tam.py`, commit 7c7df1d).

Forward only: the final hidden states of ONE teacher-forced forward and a few columns of the LM
head. Notation -> code (the paper's symbols; the official function each step lives in):

  F_v, F_x         final-norm hidden states at the visual rows V / a context row x (what the
                   LM head reads; the official code uses `hidden_states[-1]` of `generate`)
  w_c              LM-head row of token c
  A_t              answer_visual[t]   ReLU(F_v w_{y_t})          raw activation map    (TAM)
  A_{p_i}          context_visual[i]  ReLU(F_v w_{c_i})          prompt token i's map  (TAM)
  s_{t,x}          weights[t, x]      ReLU(F_x w_{y_t})          y_t's activation on context
                                                                 token x ("txt_scores") (TAM)
  I_t              interference       sum_x s_{t,x} A_x / (sum_x s_{t,x} + 1e-8)  (TAM, ECI)
  k_t              eci_scale          argmin_k ||A_t - k I_t||^2 (`least_squares`)  (ECI)
  Â_t              relu(A_t - k_t I_t)                                                (ECI)
  N_t              minmax of Â_t jointly with y_t's text activations s_{t,.}
                                                                 (`multimodal_process`)
  M_t              token_maps[t]      RGF(N_t), 3x3 rank Gaussian filter (`rank_guassian_filter`)
  sequence map     mean_t M_t        (ours: the official code explains tokens one by one)

Context of answer token y_t (official `TAM`, with its off-by-one class choices fixed, see
docs/methods/tam.md): the question tokens q_i (row = the token's own position, map of its own
id) and the earlier answer tokens y_j, j < t (row = `predict_rows[j]`, the row whose logits
produced y_j; map A_j). Context tokens with the same id as y_t are left out of ECI (their map
*is* y_t's evidence) but still count in the normalization, as in the official code.

Cost: one forward with `logits_to_keep=1` (the LM head runs on one row), then two small
products with only the needed LM-head rows: |V| x d x (|Q| + T) for the maps and
(|Q| + T) x d x T for the text activations; nothing else touches the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..context import FINAL_HIDDEN, AttributionContext, ContextBatch
from ..models.base import ModelAdapter
from ..schema import MethodOutput
from .registry import register_method, settings_dict

ECI_EPS = 1e-8  # official: w / (w.sum() + 1e-8)


@dataclass(frozen=True)
class TamConfig:
    eci: bool = True  # estimated causal inference (official: always on; False = ablation)
    exclude_repeated: bool = True  # official: context tokens equal to y_t are not interference
    rank_filter: bool = True  # rank Gaussian filter (official: always on; False = ablation)
    kernel_size: int = 3  # official `rank_guassian_filter(..., 3)`
    # The filter sorts kernel_size² values per visual token and answer token: memory grows with
    # T·|V|·kernel_size² (7 -> 49 values: ~200 MB at T = 256, a 64x64 grid).
    COST_LIMITS: ClassVar[dict[str, int]] = {"kernel_size": 7}

    def validate(self) -> None:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be an odd integer >= 1")


@dataclass
class TamInputs:
    """Everything TAM needs from one forward, as plain tensors (leading dims allowed).

    C = |Q| + T context tokens: the question tokens, then the answer tokens."""

    answer_visual: torch.Tensor  # (..., T, |V|)  A_t
    context_visual: torch.Tensor  # (..., C, |V|) A_x (the last T rows are A_t again)
    weights: torch.Tensor  # (..., T, C)  s_{t,x}
    eci_mask: torch.Tensor  # (..., T, C) bool: x is interference for y_t (earlier, not y_t)
    norm_mask: torch.Tensor  # (..., T, C) bool: x enters y_t's joint normalization (earlier)


# ---- the forward ---------------------------------------------------------------------------------
def final_hidden_states(model: nn.Module, adapter: ModelAdapter,
                        inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, N, d): the final norm's output, i.e. what the LM head reads at every position, from
    ONE no-grad forward. `logits_to_keep=1`: the LM head runs on one row, not on N x vocab.
    A batched (right-padded) forward serves a batch: request b reads rows [:N_b] of row b."""
    store: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        store["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = adapter.final_norm().register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return store["hidden"]


def class_logits(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """lm_head(hidden)[..., ids] in fp32, computing only the `ids` columns when the head is a
    plain linear layer (every supported family): |ids| << vocab."""
    if isinstance(head, nn.Linear):
        weight = head.weight[ids].float()
        bias = None if head.bias is None else head.bias[ids].float()
        return F.linear(hidden.float(), weight, bias)
    return head(hidden)[..., ids].float()


# ---- from one request's hidden states to TAM's inputs ----------------------------------------
def tam_inputs(ctx: AttributionContext, hidden: torch.Tensor) -> TamInputs:
    """TAM's inputs for one request from its final hidden states `hidden` (N, d) (any forward
    that ran [image | prompt | answer]: `final_hidden_states` alone or a batched one)."""
    ids = ctx.inputs["input_ids"][0]
    question = ctx.question_positions
    answer = ctx.answer_ids_tensor
    context_ids = torch.cat([ids[question], answer])  # c_x, (C,)
    context_rows = torch.cat([question, ctx.predict_rows])  # where s_{t,x} is read, (C,)
    head = ctx.adapter.lm_head()
    visual = class_logits(head, hidden[ctx.visual_positions], context_ids).clamp_min(0)
    context_visual = visual.T  # (C, |V|): A_{p_i}, then A_t
    weights = class_logits(head, hidden[context_rows], answer).clamp_min(0).T  # (T, C)
    earlier = _earlier_mask(len(question), len(answer), hidden.device)
    repeated = answer[:, None] == context_ids[None, :]
    return TamInputs(answer_visual=context_visual[len(question):], context_visual=context_visual,
                     weights=weights, eci_mask=earlier & ~repeated, norm_mask=earlier)


def _earlier_mask(num_question: int, num_answer: int, device) -> torch.Tensor:
    """(T, |Q| + T): every question token and the answer tokens j < t precede y_t."""
    answer_part = torch.ones(num_answer, num_answer, dtype=torch.bool, device=device).tril(-1)
    question_part = torch.ones(num_answer, num_question, dtype=torch.bool, device=device)
    return torch.cat([question_part, answer_part], dim=1)


# ---- the method, pure over tensors ---------------------------------------------------------------
def estimated_causal_inference(inputs: TamInputs,
                               exclude_repeated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ECI (official `TAM` + `least_squares`). Returns (Â_t (..., T, |V|), k_t (..., T))."""
    mask = inputs.eci_mask if exclude_repeated else inputs.norm_mask
    w = inputs.weights * mask
    w = w / (w.sum(-1, keepdim=True) + ECI_EPS)
    interference = w @ inputs.context_visual  # I_t
    # argmin_k ||A - k I||^2 in closed form (the official code runs scipy's Brent search on this
    # quadratic); k = 0 when there is no interference, where any k gives the same Â.
    energy = (interference * interference).sum(-1)
    scale = (inputs.answer_visual * interference).sum(-1) / energy.clamp_min(1e-30)
    scale = torch.where(energy > 0, scale, torch.zeros_like(scale))
    return (inputs.answer_visual - scale[..., None] * interference).clamp_min(0), scale


def joint_minmax(visual: torch.Tensor, weights: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Official `multimodal_process`: min-max the visual map together with y_t's activations on
    its earlier text tokens (`txt_scores[:-1]`, the self score dropped), so a token that is
    mostly activated by text gets a dim map. A constant input gives 0 (the official: NaN)."""
    lo = torch.minimum(visual.amin(-1), _masked(weights, mask, float("inf")).amin(-1))
    hi = torch.maximum(visual.amax(-1), _masked(weights, mask, float("-inf")).amax(-1))
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    return (visual - lo[..., None]) / span[..., None]


def _masked(values: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(mask, values, torch.full_like(values, fill))


def rank_gaussian_filter(maps: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Official `rank_guassian_filter` on (..., h, w) maps >= 0: for each k x k window (numpy
    'reflect' padding), sort its k² values and average them with a Gaussian over RANK
    (centred on the median) whose sigma is the window's coefficient of variation std/mean;
    0 where the window's mean is 0. sigma = 0 (a constant window) gives the median, the limit
    of the official formula (which returns NaN there)."""
    pad = kernel_size // 2
    h, w = maps.shape[-2:]
    rows = _reflect_index(h, pad, maps.device)
    cols = _reflect_index(w, pad, maps.device)
    padded = maps[..., rows[:, None], cols[None, :]]
    windows = padded.unfold(-2, kernel_size, 1).unfold(-2, kernel_size, 1)  # (..., h, w, k, k)
    ranked = windows.flatten(-2).sort(-1).values  # (..., h, w, k²)
    mean = ranked.mean(-1, keepdim=True)
    sigma = ranked.std(-1, correction=0, keepdim=True) / mean.clamp_min(1e-30)
    ax = torch.arange(kernel_size**2, device=maps.device, dtype=maps.dtype) - kernel_size**2 // 2
    # ax / sigma, not ax² / sigma²: stays finite for tiny sigma, and sigma = 0 (clamped) leaves
    # exp(0) = 1 at the median rank only, i.e. the median.
    kernel = torch.exp(-0.5 * (ax / sigma.clamp_min(1e-30)) ** 2)
    value = (ranked * kernel).sum(-1) / kernel.sum(-1)
    return torch.where(mean[..., 0] > 0, value, torch.zeros_like(value))


def _reflect_index(size: int, pad: int, device) -> torch.Tensor:
    """Indices of numpy's pad(mode='reflect') (edge not repeated), for any pad, also pad >= size."""
    index = torch.arange(-pad, size + pad, device=device)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def token_activation_maps(inputs: TamInputs, grid: tuple[int, int],
                          cfg: TamConfig) -> dict[str, torch.Tensor]:
    """The whole method after the forward, pure over tensors (leading batch dims pass through).
    Returns maps M_t (..., T, h, w), eci_scale k_t (..., T), visual_peak max_j N_t (..., T)."""
    if cfg.eci:
        visual, scale = estimated_causal_inference(inputs, cfg.exclude_repeated)
    else:
        visual = inputs.answer_visual
        scale = visual.new_zeros(visual.shape[:-1])
    normed = joint_minmax(visual, inputs.weights, inputs.norm_mask)
    maps = normed.reshape(*normed.shape[:-1], *grid)
    if cfg.rank_filter:
        maps = rank_gaussian_filter(maps, cfg.kernel_size)
    return {"maps": maps, "eci_scale": scale, "visual_peak": normed.amax(-1)}


# ---- registration --------------------------------------------------------------------------------
def attribute_batch(batch: ContextBatch, cfg: TamConfig) -> list[MethodOutput]:
    """Every request's TAM. The final hidden states come from generation when the engine
    recorded them (no forward at all); the requests without them share ONE forward."""
    missing = [c for c in batch.contexts if not c.has(FINAL_HIDDEN)]
    if missing:
        inputs = batch.adapter.batch_inputs([c.inputs for c in missing], side="right")
        hidden = final_hidden_states(batch.model, batch.adapter, inputs)
        for b, ctx in enumerate(missing):  # right padding: request b's rows are [:N_b]
            ctx.prime_final_hidden(hidden[b, :ctx.seq_len])
    return [tam_output(ctx, cfg, ctx.memo(FINAL_HIDDEN, lambda: None))
            for ctx in batch.contexts]


@register_method("tam", config=TamConfig, needs_gradients=False, batch=attribute_batch,
                 needs_final_hidden=True,
                 summary="TAM: LM-head token activations on visual tokens, context interference "
                         "removed (ECI), rank Gaussian filter; one forward, or none after "
                         "generation")
def attribute(ctx: AttributionContext, cfg: TamConfig) -> MethodOutput:
    return attribute_batch(ContextBatch([ctx]), cfg)[0]


def tam_output(ctx: AttributionContext, cfg: TamConfig, hidden: torch.Tensor) -> MethodOutput:
    """The method's output from one request's final hidden states (N, d); shared with a batched
    forward, which passes its row b cut to N_b."""
    with torch.no_grad():
        result = token_activation_maps(tam_inputs(ctx, hidden), ctx.grid, cfg)
    maps = result["maps"].float()
    return MethodOutput(
        visual_map=maps.mean(0).cpu().numpy(),
        per_token_maps=maps.cpu().numpy(),
        token_weights={k: result[k].float().cpu().numpy() for k in ("eci_scale", "visual_peak")},
        settings=settings_dict(cfg),
    )
