"""LLaVA-1.5 (llava-hf layout) and the embedded tiny-shapes model, which is a LLaVA."""

from __future__ import annotations

from PIL import Image

from .base import ModelAdapter, PreparedPrompt
from .registry import register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    decoder_path = "model.language_model.layers"
    final_norm_path = "model.language_model.norm"

    def prepare(self, image: Image.Image, question: str) -> PreparedPrompt:
        inputs = self.processor(images=image, text=self.prompt_text(question), return_tensors="pt")
        input_ids = inputs["input_ids"][0]
        visual, side = self.square_grid_positions(input_ids)
        # The received image is kept: perturbation baselines (LLR's blur) are made from it, as
        # the official code blurs the image before processing, not the processed crop.
        return self.make_prompt(dict(inputs), input_ids, question, visual, (side, side), image,
                                self._grid_box(image.size), {"image": image})

    def _grid_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """CLIP's processor resizes the shortest edge, then centre-crops a square: the grid
        covers the central square of the original image."""
        width, height = size
        crop = getattr(self.processor.image_processor, "do_center_crop", True)
        if not crop:
            return (0.0, 0.0, float(width), float(height))
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side)
