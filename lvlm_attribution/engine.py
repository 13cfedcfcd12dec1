"""The library API: load a model, answer a question, explain an answer.

`Explainer.explain` has two entry modes: generate-then-explain (no answer given), and audit mode
(explain a given answer, teacher-forced on exactly its token ids). Explaining a generated answer
in audit mode gives identical results because both run the same teacher-forced computation on the
same ids.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from . import images
from . import methods as _methods  # noqa: F401  (registers every method)
from .context import AttributionContext, ContextBatch
from .deadline import Deadline, enforced
from .faithfulness import ImageScorer, map_faithfulness
from .grounding import ground
from .llr import batch_llr, token_llr
from .methods.registry import SettingError, get_method, list_methods, settings_dict
from .models import PreparedPrompt, adapter_for
from .schema import BatchItem, ExplainOptions, Explanation, MethodOutput, TokenInfo

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class InvalidInput(ValueError):
    """A request the engine cannot serve; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Explainer:
    def __init__(self, model, processor, model_name: str, model_version: str) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)  # methods differentiate w.r.t. activations only
        self.processor = processor
        self.adapter = adapter_for(model, processor)
        self.model_name = model_name
        self.model_version = model_version
        self.tokenizer = self.adapter.tokenizer

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "cpu",
                        dtype: str = "float32") -> Explainer:
        import transformers

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model_cls = getattr(transformers, config.architectures[0])
        model = model_cls.from_pretrained(model_dir, dtype=DTYPES[dtype],
                                          attn_implementation="sdpa",
                                          local_files_only=True).to(device)
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        return cls(model, processor, model_dir.name, weights_version(model_dir))

    # ---- discovery -------------------------------------------------------------------------
    @staticmethod
    def available_methods() -> list[str]:
        return list_methods()

    @staticmethod
    def default_settings(method: str) -> dict:
        return settings_dict(get_method(method).make_config())

    # ---- answering ------------------------------------------------------------------------------
    def prepare(self, image: Image.Image, question: str) -> PreparedPrompt:
        if not question or not question.strip():
            raise InvalidInput("question", "must not be empty")
        self._refuse_special_tokens(question, "question")
        # An image given as a PIL object gets what `load_image` gives decoded bytes (upright,
        # 8-bit RGB, transparency over white), so the library and the service agree.
        return self.adapter.prepare(images.to_rgb(image), question)

    def generate_ids(self, prompt: PreparedPrompt, max_new_tokens: int,
                     deadline: Deadline | None = None) -> list[int]:
        """Greedy answer token ids, without the end-of-sequence token."""
        with enforced(deadline, self.adapter.decoder_layers()):
            return self._generate([prompt], max_new_tokens)[0].ids

    def generate(self, image: Image.Image, question: str, max_new_tokens: int,
                 deadline: Deadline | None = None) -> list[int]:
        return self.generate_ids(self.prepare(image, question), max_new_tokens, deadline)

    @torch.no_grad()
    def _generate(self, prompts: Sequence[PreparedPrompt], max_new_tokens: int,
                  record_hidden: bool = False) -> list[Generated]:
        """Greedy answers for several prompts in ONE `generate` over the left-padded prompts
        (new tokens are appended on the right; transformers derives positions from the attention
        mask, so every row sees what it sees alone): per prompt the ids without the end token
        and the raw logits (T, vocab) that produced them — teacher-forced row t-1's logits, so
        p_t and ln p(y_t | I) need no further forward — and, with `record_hidden`, the final
        norm's output at every position the steps computed (prefill, then one row per step)."""
        device = next(self.model.parameters()).device
        inputs = self.adapter.batch_inputs([p.model_inputs for p in prompts], side="left")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        steps: list[torch.Tensor] = []
        handle = (self.adapter.final_norm().register_forward_hook(
            lambda _m, _a, out: steps.append(out[0] if isinstance(out, tuple) else out))
            if record_hidden else None)
        try:
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      return_dict_in_generate=True, output_logits=True)
        finally:
            if handle is not None:
                handle.remove()
        logits = torch.stack(out.logits, dim=1).float()  # (B, steps, vocab)
        hidden = torch.cat(steps, dim=1) if steps else None  # (B, width + steps - 1, d)
        width, eos = inputs["input_ids"].shape[1], self.adapter.eos_token_ids
        answers = []
        for b, (row, prompt) in enumerate(zip(out.sequences[:, width:].tolist(), prompts,
                                              strict=True)):
            n = next((i for i, t in enumerate(row) if t in eos), len(row))
            start = width - prompt.prompt_length  # left padding
            answers.append(Generated(row[:n], logits[b, :n], None if hidden is None else
                                     hidden[b, start:start + prompt.prompt_length + n - 1]))
        return answers

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def encode_answer(self, answer: str) -> list[int]:
        self._refuse_special_tokens(answer, "answer")
        ids = self.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidInput("answer", "tokenizes to no tokens")
        return ids

    def _refuse_special_tokens(self, text: str, field: str) -> None:
        """A caller's text must not smuggle in the chat template's control tokens (an extra
        `<image>` would ask for a second image, an end-of-turn token would rewrite the prompt)."""
        for token in self._special_token_texts:
            if token in text:
                raise InvalidInput(field, f"contains the model's special token {token!r}; "
                                   "special tokens cannot be part of a question or an answer")

    @cached_property
    def _special_token_texts(self) -> tuple[str, ...]:
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        texts = set(self.tokenizer.all_special_tokens)
        texts.update(t.content for t in added.values() if getattr(t, "special", False))
        return tuple(sorted(t for t in texts if t and not t.isspace()))

    def context(self, image: Image.Image, question: str, answer: str) -> AttributionContext:
        """The attribution context of a given answer (audit mode), for calling one method's
        `attribute`, a reference implementation or a metric directly."""
        return AttributionContext(self.model, self.adapter, self.prepare(image, question),
                                  self.encode_answer(answer))

    # ---- explaining ----------------------------------------------------------------------------
    # One path for one request and for many: `explain` is `explain_batch` of one, and
    # `explain_batch` is `answer` (prepare, generate or tokenize) then `attribute` (the shared
    # passes, every method, one assembly step). The service calls the two halves itself to send a
    # streamed answer between them.
    def explain(self, image: Image.Image, question: str, answer: str | None = None,
                answer_token_ids: list[int] | None = None,
                options: ExplainOptions | None = None,
                deadline: Deadline | None = None) -> Explanation:
        """Explain one answer (generated, or given: audit mode); past `deadline` (if any) it
        raises DeadlineExceeded."""
        item = BatchItem(image, question, answer, answer_token_ids)
        return self.explain_batch([item], options, deadline)[0]

    def explain_batch(self, items: Sequence, options: ExplainOptions | None = None,
                      deadline: Deadline | None = None) -> list[Explanation]:
        """`explain` for several requests with generation, the LLR forward and every batchable
        method's passes shared across them (monitoring throughput); each result equals
        `explain` alone. Items: BatchItems, dicts of their fields or (image, question[, answer])
        tuples. An invalid item raises InvalidInput naming `items[i]` (when there are several)."""
        options = options or ExplainOptions()
        self.check_options(options)
        answered = self.answer(items, options, deadline)
        return self.attribute(answered, options, deadline)

    def answer(self, items: Sequence, options: ExplainOptions | None = None,
               deadline: Deadline | None = None) -> list[Answered]:
        """Prepare every item and generate (one batched generate, up to
        `options.max_new_tokens`) or tokenize its answer. What the requested methods declare
        they read from a forward (final hidden states) is recorded during generation."""
        options = options or ExplainOptions()
        record = any(get_method(m).needs_final_hidden for m in self._configs(options))
        items = [BatchItem.of(x) for x in items]
        timings: dict[str, float] = {}
        with _timed(timings, "prepare", deadline):
            prompts = [_per_item(i, len(items), self.prepare, x.image, x.question)
                       for i, x in enumerate(items)]
        answers = [Generated([], None, None)] * len(items)
        if any(x.audit for x in items):
            with _timed(timings, "tokenize", deadline):
                for i, x in enumerate(items):
                    if x.audit:
                        answers[i] = Generated(_per_item(i, len(items), self._given_ids, x),
                                               None, None)
        generated = [i for i, x in enumerate(items) if not x.audit]
        if generated:
            with _timed(timings, "generate", deadline), \
                    enforced(deadline, self.adapter.decoder_layers()):
                made = self._generate([prompts[i] for i in generated], options.max_new_tokens,
                                      record_hidden=record)
                for i, one in zip(generated, made, strict=True):
                    if not one.ids:
                        raise _item_error(i, len(items), "question", "the model produced an "
                                          "empty answer to explain")
                    answers[i] = one
        return [Answered(prompt, g.ids, x.audit, g.logits, g.hidden, timings)
                for x, prompt, g in zip(items, prompts, answers, strict=True)]

    def attribute(self, answered: Sequence[Answered], options: ExplainOptions | None = None,
                  deadline: Deadline | None = None) -> list[Explanation]:
        """Every requested method on answered requests, in shared passes; see `explain_batch`."""
        options = options or ExplainOptions()
        configs = self._configs(options)
        if not answered:
            return []
        timings = dict(answered[0].timings)
        with enforced(deadline, self.adapter.decoder_layers()):
            contexts = [AttributionContext(self.model, self.adapter, a.prompt, a.ids)
                        for a in answered]
            for ctx, a in zip(contexts, answered, strict=True):  # what generation computed
                if a.logits is not None:
                    ctx.prime_plain_logits(a.logits.to(ctx.device))
                if a.hidden is not None:
                    ctx.prime_final_hidden(a.hidden.to(ctx.device))
            llrs: list[list[float] | None] = [None] * len(contexts)
            if options.llr:
                with _timed(timings, "llr", deadline):
                    # The cheapest hallucination signal: the blurred image's forward (batched
                    # over the requests; audit requests add their original image: p_t).
                    batch_llr(contexts)
                    llrs = [token_llr(c).cpu().tolist() for c in contexts]
            with _timed(timings, "forward", deadline):  # free when generation primed them
                probabilities = [c.token_probabilities.cpu().tolist() for c in contexts]
            batch = ContextBatch(contexts)
            outputs: list[dict[str, MethodOutput]] = [{} for _ in contexts]
            for name, cfg in configs.items():
                with _timed(timings, name, deadline):
                    for out, result in zip(outputs, get_method(name).run_batch(batch, cfg),
                                           strict=True):
                        _require_finite(name, result, options)
                        if not options.per_token_maps:
                            result.per_token_maps = None
                        out[name] = result
            if options.faithfulness and configs:
                with _timed(timings, "faithfulness", deadline):
                    _score_faithfulness(contexts, outputs)
        return [self._assemble(a, p, llr, out, timings)
                for a, p, llr, out in zip(answered, probabilities, llrs, outputs, strict=True)]

    def _assemble(self, answered: Answered, probabilities: list[float],
                  llrs: list[float] | None, outputs: dict[str, MethodOutput],
                  timings: dict[str, float]) -> Explanation:
        """The one place an Explanation is built, for single and batched requests alike.
        Timings are the whole batch's stage times."""
        tokens = self._tokens(answered.ids, probabilities, llrs, outputs)
        # The rule needs LLR; without it there is no grounding verdict (not a guessed one).
        grounding = ground(tokens) if llrs is not None else None
        prompt = answered.prompt
        return Explanation(
            answer=self.decode(answered.ids), answer_token_ids=list(answered.ids),
            tokens=tokens, grounding=grounding, methods=outputs,
            question_tokens=prompt.question_tokens, grid=prompt.grid,
            image_size=prompt.image_size, audit_mode=answered.audit,
            model_name=self.model_name, model_version=self.model_version,
            timings=dict(timings), visual_box=prompt.grid_box)

    def check_options(self, options: ExplainOptions) -> None:
        """Raise InvalidInput for any method or setting `explain` would refuse, before any
        model work is spent on the request."""
        self._configs(options)

    def _configs(self, options: ExplainOptions) -> dict:
        configs = {}
        for name in options.methods:
            try:
                spec = get_method(name)
            except KeyError:
                raise InvalidInput("methods", f"unknown method {name!r}; available: "
                                   f"{list_methods()}") from None
            try:
                configs[name] = spec.make_config(options.method_settings.get(name),
                                                 options.setting_limits.get(name))
            except SettingError as err:
                raise InvalidInput(f"method_settings.{name}.{err.setting}",
                                   err.message) from None
        unknown = sorted(set(options.method_settings) - set(options.methods))
        if unknown:
            raise InvalidInput("method_settings", f"settings for methods not requested: {unknown}")
        return configs

    def _given_ids(self, item: BatchItem) -> list[int]:
        if item.answer_token_ids is not None:
            vocab = len(self.tokenizer)
            ids = list(item.answer_token_ids)
            if not ids or any(not 0 <= i < vocab for i in ids):
                raise InvalidInput("answer_token_ids", f"must be non-empty ids in [0, {vocab})")
            return ids
        return self.encode_answer(item.answer or "")

    def _tokens(self, ids, probabilities, llrs, outputs) -> list[TokenInfo]:
        texts = self.tokenizer.convert_ids_to_tokens(ids)
        tokens = []
        rows = zip(ids, texts, probabilities, llrs or [None] * len(ids), strict=True)
        for t, (token_id, text, p, llr) in enumerate(rows):
            weights = {f"{name}.{key}": float(values[t]) for name, out in outputs.items()
                       for key, values in out.token_weights.items()}
            tokens.append(TokenInfo(index=t, token_id=token_id, text=text, probability=float(p),
                                    llr=None if llr is None else float(llr), weights=weights))
        return tokens


@dataclass
class Generated:
    ids: list[int]
    logits: torch.Tensor | None  # (T, vocab): what produced each token
    hidden: torch.Tensor | None  # (N - 1, d): the final norm's output, when recorded


@dataclass
class Answered:
    """One request after answering: its prompt, the answer's ids, and for a generated answer what
    generation computed anyway (the logits that produced each token, (T, vocab); the final
    hidden states when a requested method reads them), which prime the attribution context."""

    prompt: PreparedPrompt
    ids: list[int]
    audit: bool
    logits: torch.Tensor | None
    hidden: torch.Tensor | None
    timings: dict[str, float]  # the answering stages (shared by the batch)


def _score_faithfulness(contexts: Sequence[AttributionContext],
                        outputs: Sequence[dict[str, MethodOutput]]) -> None:
    """Every map's deletion/insertion AUC; one scorer per request, so its image and baseline
    are scored once for all of its maps."""
    for ctx, out in zip(contexts, outputs, strict=True):
        scorer = ImageScorer(ctx)
        for result in out.values():
            f = map_faithfulness(ctx, result.visual_map, scorer)
            result.faithfulness = {"deletion_auc": f.deletion_auc,
                                   "insertion_auc": f.insertion_auc}


def _per_item(i: int, n: int, fn, *args):
    """fn(*args), with an InvalidInput's field prefixed by items[i] when there are several."""
    try:
        return fn(*args)
    except InvalidInput as err:
        raise _item_error(i, n, err.field, err.message) from None


def _item_error(i: int, n: int, field: str, message: str) -> InvalidInput:
    return InvalidInput(f"items[{i}].{field}" if n > 1 else field, message)


def _require_finite(name: str, out: MethodOutput, options: ExplainOptions) -> None:
    """A non-finite map cannot be encoded or trusted: the caller's settings caused it (a 400
    naming them) or, at the defaults, it is our bug."""
    if np.isfinite(np.asarray(out.visual_map)).all():
        return
    if options.method_settings.get(name):
        defaults = Explainer.default_settings(name)
        raise InvalidInput(f"method_settings.{name}", "these settings produce a non-finite map "
                           f"(NaN or infinity); the defaults are {defaults}")
    raise FloatingPointError(f"method {name!r} produced a non-finite map at its defaults")


def weights_version(model_dir: Path) -> str:
    """A short content hash of the weight files: the version an audit can pin."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


@contextmanager
def _timed(timings: dict[str, float], stage: str,
           deadline: Deadline | None = None) -> Iterator[None]:
    if deadline is not None:
        deadline.check(stage)  # also names the stage a later layer-hook stop happens in
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = time.perf_counter() - start
