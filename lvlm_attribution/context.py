"""What an attribution method sees: one teacher-forced (image, prompt, answer) and the model;
and, for methods that run a whole batch of requests at once, a `ContextBatch`.

Notation (DESIGN §3): the sequence is [visual | prompt | answer] of length N; answer token y_t
sits at position `answer_positions[t]` and is predicted by the logits at `predict_rows[t]`
(= answer_positions[t] - 1): methods read row t-1, never row t.

Shared results are memoised on the context (`memo`), so a pass that already ran is never run
again: the plain logits at the predicting rows can be primed from generation (the logits that
produced each answer token) or from a batched forward (`prime_plain_logits`), and every capture
forward is checked against them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .capture import Captured, CaptureSpec, capture
from .models.base import ModelAdapter, PreparedPrompt

# The capture forward must reproduce the plain forward (masks and causality intact).
GUARD_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 0.25,
                   torch.float16: 0.05}


PLAIN_LOGITS = "plain_logits"
FINAL_HIDDEN = "final_hidden"  # (N or N-1, d): the final norm's output (what the LM head reads)


class CaptureMismatch(RuntimeError):
    """The capture forward's logits differ from the plain forward's."""


@dataclass
class AttributionContext:
    model: nn.Module
    adapter: ModelAdapter
    prompt: PreparedPrompt
    answer_ids: list[int]
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- geometry ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def inputs(self) -> dict[str, torch.Tensor]:
        raw = self.adapter.teacher_forced_inputs(self.prompt, self.answer_ids)
        return {k: v.to(self.device) for k, v in raw.items()}

    @cached_property
    def image_tensor(self) -> torch.Tensor:
        """The image as processed pixels (1, C, H, W), whatever the family's input layout."""
        return self.adapter.image_tensor(self.inputs)

    @property
    def seq_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def num_answer_tokens(self) -> int:
        return len(self.answer_ids)

    @cached_property
    def answer_positions(self) -> torch.Tensor:
        start = self.prompt.prompt_length
        return torch.arange(start, start + len(self.answer_ids), device=self.device)

    @cached_property
    def predict_rows(self) -> torch.Tensor:
        """Row t-1 for every answer token t: the position whose logits predict y_t."""
        return self.answer_positions - 1

    @cached_property
    def visual_positions(self) -> torch.Tensor:
        return self.prompt.visual_positions.to(self.device)

    @cached_property
    def question_positions(self) -> torch.Tensor:
        return self.prompt.question_positions.to(self.device)

    @cached_property
    def text_key_positions(self) -> list[torch.Tensor]:
        """Per answer token t: the text keys it may attend to (prompt text and earlier answer
        tokens up to and including row t-1), i.e. every non-visual key < t."""
        is_visual = torch.zeros(self.seq_len, dtype=torch.bool, device=self.device)
        is_visual[self.visual_positions] = True
        return [torch.nonzero(~is_visual[: row + 1]).flatten() for row in self.predict_rows]

    @property
    def grid(self) -> tuple[int, int]:
        return self.prompt.grid

    @cached_property
    def answer_ids_tensor(self) -> torch.Tensor:
        return torch.tensor(self.answer_ids, device=self.device)

    # ---- shared results -------------------------------------------------------------------------
    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value stored under `key`, computed (once) by `compute` when absent."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def prime(self, key: Hashable, value: Any) -> None:
        """Store a value another pass already computed (e.g. a batched forward)."""
        self._cache[key] = value

    def has(self, key: Hashable) -> bool:
        return key in self._cache

    # ---- forwards -------------------------------------------------------------------------------
    @property
    def plain_logits(self) -> torch.Tensor:
        """(T, vocab) fp32 logits at the predicting rows: primed from a pass that already ran
        (generation, a batched forward), else one plain (SDPA) forward, no grad. The LM head runs
        on those T rows only (`logits_to_keep`), not on all N: at 7B with N ~ 600 and a 32k
        vocabulary the full logits would be ~77 MB in fp32 for nothing."""
        return self.memo(PLAIN_LOGITS, self._plain_forward)

    def prime_plain_logits(self, logits: torch.Tensor) -> None:
        if logits.shape[0] != self.num_answer_tokens:
            raise ValueError(f"{logits.shape[0]} logit rows for {self.num_answer_tokens} tokens")
        self.prime(PLAIN_LOGITS, logits.float())

    def prime_final_hidden(self, hidden: torch.Tensor) -> None:
        """The final norm's output at positions 0..N-2 at least (every row a method reads: the
        visual, question and predicting rows), e.g. recorded during generation."""
        if hidden.shape[0] < self.seq_len - 1:
            raise ValueError(f"{hidden.shape[0]} hidden rows for a sequence of {self.seq_len}")
        self.prime(FINAL_HIDDEN, hidden)

    def _plain_forward(self) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(**self.inputs, logits_to_keep=self.predict_rows).logits[0]
        return logits.float()

    @property
    def token_probabilities(self) -> torch.Tensor:
        """p_t = softmax(z)[y_t], (T,)."""
        return self.token_logprobs.exp()

    @property
    def token_logprobs(self) -> torch.Tensor:
        """ln p_t, (T,) fp32, from the plain logits."""
        def compute() -> torch.Tensor:
            logp = torch.log_softmax(self.plain_logits, dim=-1)
            return logp.gather(1, self.answer_ids_tensor[:, None])[:, 0]
        return self.memo("token_logprobs", compute)

    def forward(self, spec: CaptureSpec, inputs: dict[str, torch.Tensor] | None = None,
                check: bool = True) -> tuple[torch.Tensor, Captured]:
        """A forward with gradients under `spec`. Returns (logits (B, N, vocab), captured)."""
        with torch.enable_grad(), capture(self.model, self.adapter, spec) as captured:
            logits = self.model(**(inputs or self.inputs)).logits
        if check and inputs is None:
            self.check_against_plain(logits)
        return logits, captured

    def check_against_plain(self, logits: torch.Tensor) -> None:
        """Raise CaptureMismatch when a capture forward's logits at the predicting rows differ
        from the plain ones (a hook or attention override changed the model's math; when the
        plain logits came from generation, also: the explained pass is not the one that
        answered). `logits`: (1, N, vocab) or already (T, vocab) at the predicting rows."""
        got = logits[0, self.predict_rows] if logits.dim() == 3 else logits
        diff = (got.detach().float() - self.plain_logits).abs().max().item()
        if diff > GUARD_TOLERANCE.get(logits.dtype, 1e-3):
            raise CaptureMismatch(f"capture forward differs from the plain forward by {diff:.3g}")

    def target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """z_t: raw logit of y_t at row t-1, (T,) from (1, N, vocab) logits."""
        return logits[0, self.predict_rows].gather(1, self.answer_ids_tensor[:, None])[:, 0]

    def logit_lens(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head(final_norm(h)): the layer's hidden state read as next-token logits."""
        return self.adapter.lm_head()(self.adapter.final_norm()(hidden))

    def lens_target_logits(self, layer_output: torch.Tensor) -> torch.Tensor:
        """o^l_t = logit lens of layer l's output at row t-1, for y_t. (T,)"""
        hidden = layer_output[0, self.predict_rows]
        return self.logit_lens(hidden).gather(1, self.answer_ids_tensor[:, None])[:, 0]

    def to_grid(self, values_over_visual: torch.Tensor) -> torch.Tensor:
        """(..., |V|) -> (..., h, w) in row-major patch order."""
        return values_over_visual.reshape(*values_over_visual.shape[:-1], *self.grid)

    def answer_token_texts(self) -> list[str]:
        return self.adapter.tokenizer.convert_ids_to_tokens(self.answer_ids)

    def layers(self, last_fraction: float | None = None,
               last_k: int | None = None) -> Sequence[int]:
        n = self.adapter.num_layers
        if last_k is not None:
            return list(range(max(0, n - last_k), n))
        if last_fraction is not None:
            return list(range(n - max(1, round(n * last_fraction)), n))
        return list(range(n))


class ContextBatch:
    """Several requests' contexts for one batched pass (a method's `attribute_batch`).

    Token inputs are right-padded: every real token keeps its positions 0..N_b-1 and never sees a
    pad key (pads come after it, the mask is causal), and requests do not interact in a forward
    (attention is per sequence, everything else per token), so one forward over the batch gives
    every request exactly what its own forward gives. The LM head runs only on the union of the
    requests' predicting rows; `rows_of(b)` are request b's rows within that union.
    """

    def __init__(self, contexts: Sequence[AttributionContext]) -> None:
        if not contexts:
            raise ValueError("a batch needs at least one context")
        self.contexts = list(contexts)
        first = self.contexts[0]
        self.model, self.adapter = first.model, first.adapter
        self.union_rows = torch.unique(torch.cat([c.predict_rows for c in self.contexts]))
        self._where = [torch.searchsorted(self.union_rows, c.predict_rows)
                       for c in self.contexts]

    def __len__(self) -> int:
        return len(self.contexts)

    def rows_of(self, b: int) -> torch.Tensor:
        """Indices of request b's predicting rows within `union_rows` (captured tensors)."""
        return self._where[b]

    def union_index(self, b: int) -> torch.Tensor:
        """Request b's predicting rows as sequence positions (for full-length tensors)."""
        return self.contexts[b].predict_rows

    def padded_inputs(self) -> dict[str, torch.Tensor]:
        return self.adapter.batch_inputs([c.inputs for c in self.contexts], side="right")

    def forward(self, spec: CaptureSpec) -> tuple[torch.Tensor, Captured]:
        """One capture forward with gradients over the batch: (logits (B, |union rows|, vocab),
        captured); each request's logits are checked against its plain logits, as alone."""
        spec.rows = self.union_rows if spec.rows is None else spec.rows
        with torch.enable_grad(), capture(self.model, self.adapter, spec) as captured:
            logits = self.model(**self.padded_inputs(), logits_to_keep=self.union_rows,
                                use_cache=False).logits
        for b, ctx in enumerate(self.contexts):
            ctx.check_against_plain(logits[b, self.rows_of(b)])
        return logits, captured
