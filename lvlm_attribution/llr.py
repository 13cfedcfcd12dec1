"""LLR token selection: which answer tokens depend on the image (paper 002, §3.1, Eq 5-6).

Notation -> code (DESIGN §3):
  ln p(y_t | I)      logp[t]        teacher-forced, original image
  ln p(y_t | Ĩ)      logp_base[t]   teacher-forced, baseline image (blur by default)
  LLR_t              llr[t]         ln p(y_t | I) − ln p(y_t | Ĩ)  (natural log)
  K                  selected       {t : LLR_t > α} minus punctuation / stop tokens, α = 1.0

Rules (official code `utils.find_keywords`, bytedance/LVLM_Interpretation):
  * keep t when LLR_t > α;
  * drop punctuation and stop tokens. The official code hard-codes LLaMA-tokenizer ids; here the
    rule is tokenizer-agnostic: the token's text is stripped of sub-word markers (▁, Ġ, Ċ, ##) and
    whitespace, lower-cased, and dropped when empty, made only of punctuation/symbols, or in
    STOP_WORDS below;
  * a single-token answer is kept when p_blur ≤ ½·p (⇔ LLR ≥ ln 2), stop list not applied (the
    token is the whole answer);
  * optional `skip_first` drops answer position 0 as the official code does (its LLaVA-1.5 answers
    open with a sentence-structure token); off by default because the embedded model's short
    answers start with content words ("top left").
  * fallback (ours; the official code then has nothing to optimize): when no token survives, keep
    the max-LLR token among the non-stop tokens (among all tokens if every token is a stop token)
    and report `fallback=True`.

Cost: ln p(y_t | I) is read from the context's plain logits when a pass that already ran primed
them (generation: the logits that produced each answer token); then the only extra pass is the
baseline image's forward. Otherwise ONE forward over a batch of two images (original, baseline)
with the same teacher-forced text, which also primes the plain logits. Logits only at the T
predicting rows. Cached on the context, so `token_llr(ctx)` is free after the first call (the
engine and iGOS share it). `batch_llr` does the same for a whole batch of requests in one forward.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .context import PLAIN_LOGITS, AttributionContext
from .perturbation import baseline_pixel_values, batch_answer_logits

# Function words the official list covers ("the", "a", "an", "and", "of", ...) plus common
# English auxiliaries/prepositions/pronouns. Compared after normalization (lower-case, no markers).
# ("no"/"yes" are not stop words: they carry the content of a binary question.)
STOP_WORDS = frozenset({
    "a", "an", "the", "and", "or", "but", "nor", "of", "to", "in", "on", "at", "by", "for",
    "with", "from", "into", "onto", "as", "than", "then", "so", "is", "are", "was", "were", "be",
    "been", "being", "am", "do", "does", "did", "has", "have", "had", "will", "would", "can",
    "could", "should", "may", "might", "it", "its", "this", "that", "these", "those", "there",
    "here", "which", "who", "whom", "whose", "what", "when", "where", "why", "how", "i", "you",
    "he", "she", "we", "they", "me", "him", "her", "us", "them", "my", "your", "his", "our",
    "their", "not", "very", "also", "just", "</s>", "<s>", "<pad>", "<unk>", "<eos>", "<bos>",
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>",
})
SUBWORD_MARKERS = ("▁", "Ġ", "Ċ", "ĉ", "##")


def llr_logprobs(ctx: AttributionContext, baseline: str = "blur",
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln p(y_t|I), ln p(y_t|Ĩ)), each (T,) fp32; cached on ctx."""
    key = _key(baseline, seed)
    if not ctx.has(key):
        batch_llr([ctx], baseline, seed)
    return ctx.memo(key, lambda: None)


def batch_llr(contexts: Sequence[AttributionContext], baseline: str = "blur",
              seed: int = 0) -> None:
    """Fill every context's LLR cache (and plain logits where missing) from ONE forward: the
    baseline image of every request, plus the original image of the requests whose plain logits
    no pass has primed yet (audit mode)."""
    contexts = [c for c in contexts if not c.has(_key(baseline, seed))]
    if not contexts:
        return
    unprimed = [c for c in contexts if not c.has(PLAIN_LOGITS)]
    rows = [(c, baseline_pixel_values(c, baseline, seed)) for c in contexts]
    rows += [(c, c.image_tensor) for c in unprimed]
    logits = batch_answer_logits([(c, pv.to(c.image_tensor.dtype)) for c, pv in rows])
    for c, z in zip(unprimed, logits[len(contexts):], strict=True):
        c.prime_plain_logits(z)
    for c, z in zip(contexts, logits[:len(contexts)], strict=True):
        logp_base = torch.log_softmax(z, dim=-1).gather(1, c.answer_ids_tensor[:, None])[:, 0]
        c.prime(_key(baseline, seed), (c.token_logprobs, logp_base))


def _key(baseline: str, seed: int) -> tuple:
    return ("llr_logprobs", baseline, seed)


def token_llr(ctx: AttributionContext, baseline: str = "blur", seed: int = 0) -> torch.Tensor:
    """LLR_t = ln p(y_t | I) − ln p(y_t | Ĩ), (T,), natural log (paper 002, Eq 6)."""
    logp, logp_base = llr_logprobs(ctx, baseline, seed)
    return logp - logp_base


def normalize_token_text(text: str) -> str:
    for marker in SUBWORD_MARKERS:
        text = text.replace(marker, "")
    return text.strip().lower()


def is_stop_token(text: str) -> bool:
    """Punctuation/symbol-only, whitespace-only or a stop word (tokenizer-agnostic)."""
    norm = normalize_token_text(text)
    if not norm:
        return True
    if all(unicodedata.category(c)[0] in "PSZ" for c in norm):
        return True
    return norm in STOP_WORDS


Floats = torch.Tensor | Sequence[float]


@dataclass(frozen=True)
class TokenSelection:
    selected: list[int]  # answer-token indices in K, ascending
    fallback: bool  # True: nothing passed the rules; `selected` is the max-LLR token
    rule: str

    def as_dict(self) -> dict:
        return {"selected": list(self.selected), "fallback": self.fallback, "rule": self.rule}


def select_tokens_detailed(llr: Floats, probs: Floats, probs_blur: Floats,
                           token_texts: Sequence[str], alpha: float = 1.0,
                           skip_first: bool = False) -> TokenSelection:
    llr = torch.as_tensor(llr, dtype=torch.float64).flatten()
    probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
    probs_blur = torch.as_tensor(probs_blur, dtype=torch.float64).flatten()
    n = len(llr)
    if not (len(probs) == len(probs_blur) == len(token_texts) == n) or n == 0:
        raise ValueError("llr, probs, probs_blur and token_texts need one equal, non-zero length")
    if n == 1:
        keep = bool(probs_blur[0] <= 0.5 * probs[0])
        return TokenSelection([0], fallback=not keep, rule="single-token: p_blur <= p/2")
    candidates = [t for t in range(n)
                  if not is_stop_token(token_texts[t]) and not (skip_first and t == 0)]
    selected = [t for t in candidates if llr[t] > alpha]
    rule = f"LLR > {alpha:g}, no stop/punctuation tokens"
    if skip_first:
        rule += ", skip position 0"
    if selected:
        return TokenSelection(selected, fallback=False, rule=rule)
    pool = candidates or list(range(n))
    best = max(pool, key=lambda t: float(llr[t]))
    return TokenSelection([best], fallback=True, rule=rule + "; fallback: max-LLR token")


def select_tokens(llr, probs, probs_blur, token_texts, alpha: float = 1.0,
                  skip_first: bool = False) -> list[int]:
    """K: indices of the visually relevant answer tokens (see the module docstring)."""
    return select_tokens_detailed(llr, probs, probs_blur, token_texts, alpha, skip_first).selected


def select_for_context(ctx: AttributionContext, baseline: str = "blur", alpha: float = 1.0,
                       skip_first: bool = False,
                       seed: int = 0) -> tuple[TokenSelection, torch.Tensor]:
    """Token selection for a context: (selection, llr (T,))."""
    logp, logp_base = llr_logprobs(ctx, baseline, seed)
    llr = logp - logp_base
    sel = select_tokens_detailed(llr.cpu(), logp.exp().cpu(), logp_base.exp().cpu(),
                                 ctx.answer_token_texts(), alpha, skip_first)
    return sel, llr
