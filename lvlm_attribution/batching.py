"""Monitoring throughput: answer and explain a BATCH of requests with shared forwards.

`explain_batch(explainer, items, options)` returns, for every item, the same `Explanation` that
`Explainer.explain` returns for it alone (maps, weights, probabilities and LLRs equal to ≤ 1e-5 in
fp32; tests/test_batching.py checks this), but runs the expensive passes once for the batch:

  1. generation: one `model.generate` over the LEFT-padded prompts (what generation needs: new
     tokens are appended on the right; transformers derives position ids from the attention
     mask's cumulative sum, so every row sees the positions it sees alone);
  2. one plain no-grad forward over 2B sequences (each request with its image, then with its
     blurred baseline): p_t from the first half, LLR_t from both halves; it fills the context
     caches that `token_probabilities`, the capture guard and `token_llr` read;
  3. DEX-AR (DESIGN §4 one-pass form) for the whole batch: ONE capture forward over the
     RIGHT-padded teacher-forced sequences (real tokens keep positions 0..N_b-1 and never see a
     pad key, since pads come after them and the mask is causal), ONE backward of
     Σ_b Σ_l Σ_t o^l_{b,t}. Requests do not interact in a forward (attention is per sequence,
     everything else per token), so ∂/∂A_b of the batch sum is request b's own gradient; the
     captured query rows are the union of every request's rows t-1, and each request reads its
     own rows and its own first N_b keys — exactly the tensor `lens_gradients` returns for it.

Other methods run per request on the request's context (their single-request code, so exactly
the same results). Same-size images are the intended case (LLaVA always resizes to one size);
Qwen2.5-VL patch tensors of different sizes also concatenate, since its grid travels per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .capture import CaptureSpec, capture
from .context import GUARD_TOLERANCE, AttributionContext, CaptureMismatch
from .grounding import ground
from .methods.dexar import dexar_output
from .methods.registry import get_method
from .models.base import PreparedPrompt
from .perturbation import baseline_pixel_values
from .schema import ExplainOptions, Explanation, MethodOutput

# Per-token inputs (padded); everything else carries images and is concatenated along dim 0.
TOKEN_KEYS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0,
              "token_type_ids": 0}  # pad value (None: the tokenizer's pad id)
BATCHED_METHODS = ("dexar",)
LLR_BASELINE, LLR_SEED = "blur", 0  # what the engine's `token_llr(ctx)` uses


@dataclass
class BatchItem:
    image: Image.Image
    question: str
    answer: str | None = None
    answer_token_ids: list[int] | None = None

    @property
    def audit(self) -> bool:
        return self.answer is not None or self.answer_token_ids is not None


def _as_item(item) -> BatchItem:
    if isinstance(item, BatchItem):
        return item
    if isinstance(item, dict):
        return BatchItem(**item)
    return BatchItem(*item)  # (image, question[, answer])


# ---- padding ------------------------------------------------------------------------------------
def pad_inputs(inputs: Sequence[dict[str, torch.Tensor]], pad_id: int,
               side: str) -> dict[str, torch.Tensor]:
    """Batch single-request model inputs: token tensors padded on `side` ("left"/"right"), an
    attention mask made when absent, image tensors concatenated along dim 0."""
    lengths = [int(x["input_ids"].shape[1]) for x in inputs]
    width = max(lengths)
    out: dict[str, torch.Tensor] = {}
    keys = dict.fromkeys(k for x in inputs for k in x)
    keys.setdefault("attention_mask")
    for key in keys:
        if key in TOKEN_KEYS:
            fill = pad_id if TOKEN_KEYS[key] is None else TOKEN_KEYS[key]
            rows = []
            for x, n in zip(inputs, lengths, strict=True):
                row = x.get(key)
                if row is None:  # only attention_mask can be missing
                    row = torch.ones_like(x["input_ids"])
                pad = row.new_full((1, width - n), fill)
                rows.append(torch.cat([pad, row] if side == "left" else [row, pad], dim=1))
            out[key] = torch.cat(rows)
        else:
            out[key] = torch.cat([x[key] for x in inputs])
    return out


def _pad_id(explainer) -> int:
    pad = explainer.tokenizer.pad_token_id
    if pad is None:
        pad = explainer.model.generation_config.pad_token_id
    return int(pad if pad is not None else min(explainer.adapter.eos_token_ids))


# ---- stages -------------------------------------------------------------------------------------
@torch.no_grad()
def generate_batch(explainer, prompts: Sequence[PreparedPrompt],
                   max_new_tokens: int) -> list[list[int]]:
    """Greedy answers for several prompts in one `generate` (left padding); each list equals
    `explainer.generate_ids(prompt, max_new_tokens)`."""
    if not prompts:
        return []
    device = next(explainer.model.parameters()).device
    inputs = pad_inputs([p.model_inputs for p in prompts], _pad_id(explainer), "left")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    out = explainer.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    eos = explainer.adapter.eos_token_ids
    answers = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        answers.append(row[: next((i for i, t in enumerate(row) if t in eos), len(row))])
    return answers


def _union_rows(contexts: Sequence[AttributionContext]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sorted union of all predicting rows, and per request the indices of its rows in it."""
    device = contexts[0].device
    union = torch.unique(torch.cat([c.predict_rows for c in contexts]))  # sorted
    where = [torch.searchsorted(union, c.predict_rows) for c in contexts]
    return union.to(device), where


@torch.no_grad()
def batched_plain_and_llr(contexts: Sequence[AttributionContext], pad_id: int) -> None:
    """One forward over [requests | their blurred baselines]; fills each context's plain logits
    (p_t, capture guard) and LLR cache, exactly what the single-request forwards would."""
    model, adapter = contexts[0].model, contexts[0].adapter
    text = pad_inputs([c.inputs for c in contexts], pad_id, "right")
    image_keys = set(adapter.image_inputs(text))
    batch = {k: torch.cat([v, v]) for k, v in text.items() if k not in image_keys}
    # Images as the perturbation code sees them (processed (1, C, H, W) each; the adapter maps
    # them back to its own entries, e.g. Qwen2.5-VL patches + grid), exactly as `llr_logprobs`.
    originals = [c.image_tensor for c in contexts]
    baselines = [baseline_pixel_values(c, LLR_BASELINE, LLR_SEED).to(p.dtype)
                 for c, p in zip(contexts, originals, strict=True)]
    images = torch.cat([*originals, *baselines])
    batch.update(adapter.image_entries(images.to(contexts[0].inputs["pixel_values"].dtype)))
    union, where = _union_rows(contexts)
    logits = model(**batch, logits_to_keep=union, use_cache=False).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    n = len(contexts)
    for b, (ctx, idx) in enumerate(zip(contexts, where, strict=True)):
        ctx.__dict__["plain_logits"] = logits[b, idx]  # the cached_property's slot
        targets = ctx.answer_ids_tensor[:, None]
        ctx._cache[("llr_logprobs", LLR_BASELINE, LLR_SEED)] = (
            logp[b, idx].gather(1, targets)[:, 0], logp[n + b, idx].gather(1, targets)[:, 0])


def batched_lens_gradients(contexts: Sequence[AttributionContext],
                           layers: list[int], pad_id: int) -> list[torch.Tensor]:
    """Per request g: (L, H, T_b, N_b) = d o^l_t / d A^{l,h} at row t-1 — what
    `dexar.lens_gradients(ctx_b, layers)` returns — from ONE forward and ONE backward."""
    first = contexts[0]
    model, adapter = first.model, first.adapter
    inputs = pad_inputs([c.inputs for c in contexts], pad_id, "right")
    union, where = _union_rows(contexts)
    spec = CaptureSpec(layers=layers, rows=union, layer_outputs=True, detach_layer_inputs=True)
    with torch.enable_grad(), capture(model, adapter, spec) as captured:
        logits = model(**inputs, logits_to_keep=union, use_cache=False).logits
    for b, (ctx, idx) in enumerate(zip(contexts, where, strict=True)):  # same guard as alone
        diff = (logits[b, idx].detach().float() - ctx.plain_logits).abs().max().item()
        if diff > GUARD_TOLERANCE.get(logits.dtype, 1e-3):
            raise CaptureMismatch(f"request {b}: capture forward differs by {diff:.3g}")
    batch_index = torch.cat([torch.full_like(c.predict_rows, b) for b, c in enumerate(contexts)])
    rows = torch.cat([c.predict_rows for c in contexts])
    targets = torch.cat([c.answer_ids_tensor for c in contexts])
    with torch.enable_grad():
        total = 0
        for layer in layers:
            hidden = captured.layer_outputs[layer][batch_index, rows]  # (ΣT_b, D)
            total = total + first.logit_lens(hidden).gather(1, targets[:, None]).sum()
        grads = torch.autograd.grad(total, [captured.probs[layer] for layer in layers])
    out = []
    for b, (ctx, idx) in enumerate(zip(contexts, where, strict=True)):
        n = ctx.seq_len
        out.append(torch.stack([g[b][:, idx, :n] for g in grads]).float())
    return out


# ---- the batch API -----------------------------------------------------------------------------
def explain_batch(explainer, items: Sequence, options: ExplainOptions | None = None,
                  ) -> list[Explanation]:
    """`Explainer.explain` for every item, with generation, the plain/LLR forward and DEX-AR
    batched across items. Items: `BatchItem`s, dicts of its fields, or (image, question[,
    answer]) tuples. Timings are the whole batch's stage times (the same values on every
    explanation)."""
    from .engine import InvalidInput, _timed  # the engine imports this module lazily

    options = options or ExplainOptions()
    items = [_as_item(x) for x in items]
    if not items:
        return []
    configs = explainer._configs(options)
    timings: dict[str, float] = {}
    with _timed(timings, "prepare"):
        prompts = []
        for i, item in enumerate(items):
            try:
                prompts.append(explainer.prepare(item.image, item.question))
            except InvalidInput as err:
                raise InvalidInput(f"items[{i}].{err.field}", err.message) from None
    ids: list[list[int] | None] = [None] * len(items)
    with _timed(timings, "tokenize"):
        for i, item in enumerate(items):
            if item.audit:
                ids[i] = explainer._answer_ids(prompts[i], item.answer, item.answer_token_ids,
                                               options.max_new_tokens)
    generated = [i for i, item in enumerate(items) if not item.audit]
    with _timed(timings, "generate"):
        answers = generate_batch(explainer, [prompts[i] for i in generated],
                                 options.max_new_tokens)
    for i, answer in zip(generated, answers, strict=True):
        if not answer:
            raise InvalidInput(f"items[{i}].question",
                               "the model produced an empty answer to explain")
        ids[i] = answer
    contexts = [AttributionContext(explainer.model, explainer.adapter, p, a)
                for p, a in zip(prompts, ids, strict=True)]
    pad_id = _pad_id(explainer)
    with _timed(timings, "forward"):
        batched_plain_and_llr(contexts, pad_id)
        probabilities = [c.token_probabilities.cpu().tolist() for c in contexts]
    with _timed(timings, "llr"):
        llrs = [(lp - lb).cpu().tolist() for lp, lb in
                (c._cache[("llr_logprobs", LLR_BASELINE, LLR_SEED)] for c in contexts)]
    outputs: list[dict[str, MethodOutput]] = [{} for _ in contexts]
    for name, cfg in configs.items():
        with _timed(timings, name):
            if name == "dexar":
                layers = list(contexts[0].layers(last_k=cfg.last_k_layers))
                grads = batched_lens_gradients(contexts, layers, pad_id)
                for out, ctx, g in zip(outputs, contexts, grads, strict=True):
                    out[name] = dexar_output(ctx, cfg, g)
            else:  # per request, the method's own single-request code
                for out, ctx in zip(outputs, contexts, strict=True):
                    out[name] = get_method(name).attribute(ctx, cfg)
        if not options.per_token_maps:
            for out in outputs:
                out[name].per_token_maps = None
    explanations = []
    for item, prompt, a, p, llr, out in zip(items, prompts, ids, probabilities, llrs, outputs,
                                            strict=True):
        tokens = explainer._tokens(a, p, llr, out)
        grounding = ground(tokens)  # as `Explainer.explain`: sets TokenInfo.grounded
        explanations.append(Explanation(
            answer=explainer.decode(a), answer_token_ids=a, tokens=tokens, grounding=grounding,
            methods=out, question_tokens=prompt.question_tokens, grid=prompt.grid,
            image_size=prompt.image_size, audit_mode=item.audit,
            model_name=explainer.model_name, model_version=explainer.model_version,
            timings=dict(timings), visual_box=prompt.grid_box))
    return explanations
