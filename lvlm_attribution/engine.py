"""The library API: load a model, answer a question, explain an answer.

`Explainer.explain` has two entry modes: generate-then-explain (no answer given), and audit mode
(explain a given answer, teacher-forced on exactly its token ids). Explaining a generated answer
in audit mode gives identical results because both run the same teacher-forced computation on the
same ids.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from . import images
from . import methods as _methods  # noqa: F401  (registers every method)
from .context import AttributionContext
from .deadline import Deadline, enforced
from .grounding import ground
from .llr import token_llr
from .methods.registry import SettingError, get_method, list_methods, settings_dict
from .models import PreparedPrompt, adapter_for
from .schema import ExplainOptions, Explanation, MethodOutput, TokenInfo

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

    @torch.no_grad()
    def generate_ids(self, prompt: PreparedPrompt, max_new_tokens: int,
                     deadline: Deadline | None = None) -> list[int]:
        """Greedy answer token ids, without the end-of-sequence token."""
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in prompt.model_inputs.items()}
        with enforced(deadline, self.adapter.decoder_layers()):
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        ids = out[0, prompt.prompt_length:].tolist()
        eos = self.adapter.eos_token_ids
        return ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]

    def generate(self, image: Image.Image, question: str, max_new_tokens: int,
                 deadline: Deadline | None = None) -> list[int]:
        return self.generate_ids(self.prepare(image, question), max_new_tokens, deadline)

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
    def explain(self, image: Image.Image, question: str, answer: str | None = None,
                answer_token_ids: list[int] | None = None,
                options: ExplainOptions | None = None,
                deadline: Deadline | None = None) -> Explanation:
        """Explain one answer; past `deadline` (if any) it raises DeadlineExceeded."""
        options = options or ExplainOptions()
        configs = self._configs(options)
        with enforced(deadline, self.adapter.decoder_layers()):
            return self._explain(image, question, answer, answer_token_ids, options, configs,
                                 deadline)

    def _explain(self, image, question, answer, answer_token_ids, options, configs,
                 deadline) -> Explanation:
        timings: dict[str, float] = {}
        with _timed(timings, "prepare", deadline):
            prompt = self.prepare(image, question)
        audit = answer is not None or answer_token_ids is not None
        with _timed(timings, "generate" if not audit else "tokenize", deadline):
            ids = self._answer_ids(prompt, answer, answer_token_ids, options.max_new_tokens)
        ctx = AttributionContext(self.model, self.adapter, prompt, ids)
        with _timed(timings, "forward", deadline):
            probabilities = ctx.token_probabilities.cpu().tolist()
        with _timed(timings, "llr", deadline):
            # The cheapest hallucination signal: one extra forward (batched with the blurred
            # image), shared with iGOS++ through the context cache.
            llrs = token_llr(ctx).cpu().tolist()
        outputs: dict[str, MethodOutput] = {}
        for name, cfg in configs.items():
            with _timed(timings, name, deadline):
                outputs[name] = get_method(name).attribute(ctx, cfg)
            _require_finite(name, outputs[name], options)
            if not options.per_token_maps:
                outputs[name].per_token_maps = None
        tokens = self._tokens(ids, probabilities, llrs, outputs)
        grounding = ground(tokens)  # sets TokenInfo.grounded; rule in grounding.py
        return Explanation(
            answer=self.decode(ids), answer_token_ids=ids, tokens=tokens, grounding=grounding,
            methods=outputs, question_tokens=prompt.question_tokens, grid=prompt.grid,
            image_size=prompt.image_size, audit_mode=audit, model_name=self.model_name,
            model_version=self.model_version, timings=timings, visual_box=prompt.grid_box,
        )

    def explain_batch(self, items, options: ExplainOptions | None = None) -> list[Explanation]:
        """`explain` for several requests with generation, the forward and DEX-AR batched
        across them (monitoring throughput); each result equals `explain` alone. See
        `lvlm_attribution.batching`."""
        from .batching import explain_batch

        return explain_batch(self, items, options)

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

    def _answer_ids(self, prompt, answer, answer_token_ids, max_new_tokens) -> list[int]:
        if answer_token_ids is not None:
            vocab = len(self.tokenizer)
            if not answer_token_ids or any(not 0 <= i < vocab for i in answer_token_ids):
                raise InvalidInput("answer_token_ids", f"must be non-empty ids in [0, {vocab})")
            return list(answer_token_ids)
        if answer is not None:
            return self.encode_answer(answer)
        ids = self.generate_ids(prompt, max_new_tokens)
        if not ids:
            raise InvalidInput("question", "the model produced an empty answer to explain")
        return ids

    def _tokens(self, ids, probabilities, llrs, outputs) -> list[TokenInfo]:
        texts = self.tokenizer.convert_ids_to_tokens(ids)
        tokens = []
        rows = zip(ids, texts, probabilities, llrs, strict=True)
        for t, (token_id, text, p, llr) in enumerate(rows):
            weights = {f"{name}.{key}": float(values[t]) for name, out in outputs.items()
                       for key, values in out.token_weights.items()}
            tokens.append(TokenInfo(index=t, token_id=token_id, text=text, probability=float(p),
                                    llr=float(llr), weights=weights))
        return tokens


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
