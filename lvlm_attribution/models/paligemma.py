"""PaliGemma (google/paligemma-3b-*, google/paligemma2-* layout): SigLIP + linear projector + Gemma.

Geometry: the SigLIP processor resizes the whole image to a fixed square (224/448/896 px; no crop,
aspect ratio not kept), giving (size/patch)^2 visual tokens, row-major, at the *first* positions
of the sequence: [<image> x n | <bos> | prefix | "\\n" | answer].

Mask: prefix-LM. `token_type_ids` is 0 for the prefix (image, bos, prompt, "\\n") and 1 for the
suffix (answer); the model builds block ids from it so every prefix token attends to every prefix
token (bidirectionally) and suffix tokens attend causally. Generation appends 1s for generated
tokens; teacher forcing here does the same for the answer, so the mask (and the logits) match.
Without `token_type_ids` the model would treat the answer as prefix and attend bidirectionally.

Prompt: PaliGemma has no chat template; the checkpoint's task prefix is part of the prompt
("answer en " for the mix checkpoints' VQA task). The question positions exclude the task prefix,
<bos> and the trailing "\\n".
"""

from __future__ import annotations

import torch
from PIL import Image

from .base import ModelAdapter, PreparedPrompt
from .registry import register_adapter


@register_adapter
class PaliGemmaAdapter(ModelAdapter):
    family = "paligemma"
    model_classes = ("PaliGemmaForConditionalGeneration",)
    decoder_path = "model.language_model.layers"
    final_norm_path = "model.language_model.norm"
    prefix_lm = True
    answer_token_type = ("token_type_ids", 1)  # the answer is the suffix
    task_prefix = "answer en "

    @property
    def image_token(self) -> str:
        return getattr(self.tokenizer, "image_token", None) or "<image>"

    def prompt_text(self, question: str) -> str:
        return f"{self.task_prefix}{question}"

    def prepare(self, image: Image.Image, question: str) -> PreparedPrompt:
        # The processor inserts <bos> after the image tokens and appends "\n".
        inputs = self.processor(images=image, text=self.image_token + self.prompt_text(question),
                                return_tensors="pt")
        inputs = {k: v for k, v in inputs.items() if k != "labels"}  # labels only for training
        input_ids = inputs["input_ids"][0]
        visual, side = self.square_grid_positions(input_ids)
        if int(visual[-1]) != len(visual) - 1:
            raise ValueError("PaliGemma expects the image tokens first")
        if "token_type_ids" not in inputs:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        # SigLIP's processor resizes the whole image to a square: the grid covers all of it.
        return self.make_prompt(inputs, input_ids, question, visual, (side, side), image,
                                self.whole_image_box(image.size),
                                {"prefix_length": int(input_ids.shape[0]), "image": image})
