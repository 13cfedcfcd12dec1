"""The canonical view of a vision-language model that every attribution method works on.

An adapter is declarative: where the decoder layers, the final norm and the LM head live, how a
prompt is built with the model's own chat template, where the visual tokens sit and how they
map onto a patch grid, which prompt tokens are the user's question, and whether the prefix is
attended bidirectionally. Adapters hold no attribution math.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn


@dataclass
class PreparedPrompt:
    """A prompt ready for generation or teacher forcing."""

    model_inputs: dict[str, torch.Tensor]  # batch of one, prompt only
    visual_positions: torch.Tensor  # (|V|,) long, row-major over the patch grid
    grid: tuple[int, int]  # (h, w) of the visual-token grid
    question_positions: torch.Tensor  # (|P|,) long: the user's question, no template tokens
    question_tokens: list[str]
    image_size: tuple[int, int]  # (width, height) as received
    grid_box: tuple[float, float, float, float]  # (left, top, right, bottom) in image pixels
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_length(self) -> int:
        return int(self.model_inputs["input_ids"].shape[1])


class ModelAdapter:
    """Base adapter; subclasses set the class attributes and override little else."""

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]  # transformers class names this adapter serves
    decoder_path: ClassVar[str]  # dotted path from the model to the decoder's layer list
    final_norm_path: ClassVar[str]
    lm_head_path: ClassVar[str] = "lm_head"
    text_config_key: ClassVar[str] = "text_config"  # sub-config whose attention we capture
    prefix_lm: ClassVar[bool] = False  # True: image + prefix attend bidirectionally
    # Per-token type ids the model takes alongside input_ids, and the value answer tokens get
    # when the answer is appended (e.g. PaliGemma's suffix = 1); None: the model takes none.
    answer_token_type: ClassVar[tuple[str, int] | None] = None
    # Per-token inputs and the value padding fills them with in a batch (None: the pad token id);
    # every other input carries images and is concatenated along dim 0. The answer token type
    # key, if any, is per-token too (padded with 0).
    token_pad_values: ClassVar[dict[str, int | None]] = {"input_ids": None, "attention_mask": 0}

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)

    # ---- structure -------------------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        return _resolve(self.model, self.decoder_path)

    def final_norm(self) -> nn.Module:
        return _resolve(self.model, self.final_norm_path)

    def lm_head(self) -> nn.Module:
        return _resolve(self.model, self.lm_head_path)

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos])

    # ---- prompts -----------------------------------------------------------------------------
    def chat_messages(self, question: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": question}]}]

    def prompt_text(self, question: str) -> str:
        return self.processor.apply_chat_template(self.chat_messages(question),
                                                  add_generation_prompt=True)

    def prepare(self, image: Image.Image, question: str) -> PreparedPrompt:
        """The prompt for an upright 8-bit RGB `image` (`Explainer.prepare` passes every image
        through `images.to_rgb` first)."""
        raise NotImplementedError

    def teacher_forced_inputs(self, prompt: PreparedPrompt,
                              answer_ids: list[int]) -> dict[str, torch.Tensor]:
        """Inputs for one forward over [prompt | answer]; logits at position i predict i+1."""
        inputs = dict(prompt.model_inputs)
        answer = torch.tensor([answer_ids], dtype=inputs["input_ids"].dtype)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
        if "attention_mask" in inputs:
            ones = torch.ones_like(answer, dtype=inputs["attention_mask"].dtype)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=1)
        if self.answer_token_type is not None:
            key, value = self.answer_token_type
            types = torch.full_like(answer, value, dtype=inputs[key].dtype)
            inputs[key] = torch.cat([inputs[key], types], dim=1)
        return inputs

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        return int(pad if pad is not None else min(self.eos_token_ids))

    def batch_inputs(self, inputs: Sequence[dict[str, torch.Tensor]],
                     side: str) -> dict[str, torch.Tensor]:
        """Several single-request model inputs as one batch: per-token tensors padded on `side`
        ("left" for generation, which appends on the right; "right" for teacher forcing), an
        attention mask made where absent, image tensors concatenated along dim 0."""
        pad_values = dict(self.token_pad_values)
        if self.answer_token_type is not None:
            pad_values.setdefault(self.answer_token_type[0], 0)
        lengths = [int(x["input_ids"].shape[1]) for x in inputs]
        width = max(lengths)
        keys = dict.fromkeys(k for x in inputs for k in x)
        keys.setdefault("attention_mask")
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            if key not in pad_values:
                out[key] = torch.cat([x[key] for x in inputs])
                continue
            fill = self.pad_token_id if pad_values[key] is None else pad_values[key]
            rows = []
            for x, n in zip(inputs, lengths, strict=True):
                row = x.get(key)
                if row is None:  # only attention_mask can be missing
                    row = torch.ones_like(x["input_ids"])
                pad = row.new_full((1, width - n), fill)
                rows.append(torch.cat([pad, row] if side == "left" else [row, pad], dim=1))
            out[key] = torch.cat(rows)
        return out

    def image_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The entries that carry the image (replaced when perturbing the image)."""
        return {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}

    def image_tensor(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The image as processed pixels (B, C, H, W): the space perturbations work in."""
        return inputs["pixel_values"]

    def image_entries(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of `image_tensor`: model inputs carrying a batch of processed images."""
        return {"pixel_values": images}

    # ---- helpers for subclasses ------------------------------------------------------------------
    def square_grid_positions(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Positions of the image tokens in a 1-D prompt and the side of their square grid."""
        visual = torch.nonzero(input_ids == self.model.config.image_token_id).flatten()
        side = math.isqrt(len(visual))
        if side * side != len(visual):
            raise ValueError(f"{len(visual)} visual tokens do not form a square grid")
        return visual, side

    @staticmethod
    def whole_image_box(size: tuple[int, int]) -> tuple[float, float, float, float]:
        """grid_box of a processor that resizes the whole image onto the grid (no crop)."""
        return (0.0, 0.0, float(size[0]), float(size[1]))

    def make_prompt(self, inputs: dict[str, torch.Tensor], input_ids: torch.Tensor,
                    question: str, visual: torch.Tensor, grid: tuple[int, int],
                    image: Image.Image, grid_box: tuple[float, float, float, float],
                    extras: dict[str, Any] | None = None) -> PreparedPrompt:
        """The PreparedPrompt of a 1-D prompt `input_ids`, locating the question in it."""
        question_positions = self.locate_question(input_ids, question)
        return PreparedPrompt(
            model_inputs=inputs, visual_positions=visual, grid=grid,
            question_positions=question_positions,
            question_tokens=self.tokenizer.convert_ids_to_tokens(
                input_ids[question_positions].tolist()),
            image_size=image.size, grid_box=grid_box, extras=dict(extras or {}))

    def locate_question(self, input_ids: torch.Tensor, question: str) -> torch.Tensor:
        """Positions of the question's tokens inside the prompt (last occurrence)."""
        ids = input_ids.tolist()
        for candidate in (question, " " + question):
            q = self.tokenizer(candidate, add_special_tokens=False)["input_ids"]
            for start in range(len(ids) - len(q), -1, -1):
                if q and ids[start : start + len(q)] == q:
                    return torch.arange(start, start + len(q))
        raise ValueError("could not locate the question's tokens inside the prompt")


def _resolve(root: nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
