"""Qwen2.5-VL (Qwen/Qwen2.5-VL-*-Instruct layout).

Geometry: dynamic resolution. The image processor resizes the whole image (no crop) so that both
sides are multiples of patch*merge (28 px for the real model) and the pixel count lies within
[min_pixels, max_pixels]; the ViT sees a (t, h, w) patch grid (`image_grid_thw`, t = 1 for a still
image) and the merger fuses 2x2 patches, so the decoder gets t*h*w/4 visual tokens, row-major
over the (h/2, w/2) LLM grid, at the `<|image_pad|>` positions between `<|vision_start|>` and
`<|vision_end|>`. The vision tower permutes patches into windows and the merger un-permutes them,
so decoder order is plain row-major.

Positions: 3D mrope. The model computes them from `input_ids`, `image_grid_thw` and
`mm_token_type_ids` (0 text, 1 image), which the real processor returns; without
`mm_token_type_ids` the model silently falls back to 1D positions. The prompt is therefore
built here (image processor + tokenizer, one `<|image_pad|>` expanded to the token count, exactly
as `Qwen2_5_VLProcessor` does for images), which also works where that processor cannot be
constructed (no torchvision: its video processor needs it). Teacher forcing extends
`mm_token_type_ids` with 0s for the answer, so a full [prompt | answer] forward reproduces the
positions generation uses (text positions continue at max(prompt positions) + 1).
"""

from __future__ import annotations

import torch
from PIL import Image

from .base import ModelAdapter, PreparedPrompt
from .registry import register_adapter


@register_adapter
class Qwen2_5_VLAdapter(ModelAdapter):  # noqa: N801  (the transformers class spelling)
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    decoder_path = "model.language_model.layers"
    final_norm_path = "model.language_model.norm"
    answer_token_type = ("mm_token_type_ids", 0)  # answer tokens are text

    @property
    def image_token(self) -> str:
        return getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def prepare(self, image: Image.Image, question: str) -> PreparedPrompt:
        text = self.prompt_text(question)
        if text.count(self.image_token) != 1:
            raise ValueError(f"the chat template must place exactly one {self.image_token}")
        pixels = self.processor.image_processor(images=image, return_tensors="pt")
        grid_thw = pixels["image_grid_thw"]
        t, h, w = (int(v) for v in grid_thw[0])
        grid = (t * h // self.merge_size, w // self.merge_size)
        text = text.replace(self.image_token, self.image_token * (grid[0] * grid[1]))
        encoded = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        input_ids = encoded["input_ids"]
        config = self.model.config
        is_image = input_ids[0] == config.image_token_id
        visual = torch.nonzero(is_image).flatten()
        self._check_visual_block(input_ids[0], visual, grid)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": encoded["attention_mask"],
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": grid_thw,
            "mm_token_type_ids": is_image.to(torch.long)[None],
        }
        resized = (w * self.patch_size, h * self.patch_size)  # (width, height) the ViT saw
        return self.make_prompt(
            inputs, input_ids[0], question, visual, grid, image,
            self.whole_image_box(image.size),
            {"image_grid_thw": (t, h, w), "resized_size": resized,
             "image": image})  # pixel_values are patches: perturbations need the image

    @property
    def patch_size(self) -> int:
        return int(self.model.config.vision_config.patch_size)

    @property
    def temporal_patch_size(self) -> int:
        return int(self.model.config.vision_config.temporal_patch_size)

    # ---- pixel layout: flattened patches <-> images ------------------------------------------
    # The processor emits pixel_values as (t*h*w, C*T*P*P): patches grouped by 2x2 merge blocks,
    # each patch repeated over the temporal patch (T = 2) for a still image. Both maps below are
    # exact, differentiable re-arrangements, so image-space perturbations (masks, composites,
    # blurs in processed space) can be done on (B, C, H, W) tensors and converted back.
    def patches_to_images(self, pixel_values: torch.Tensor,
                          image_grid_thw: torch.Tensor) -> torch.Tensor:
        """(B*t*h*w, C*T*P*P) -> (B, C, h*P, w*P): frame 0 of each still image, processed
        (rescaled, normalized) pixel space."""
        t, h, w = (int(v) for v in image_grid_thw[0])
        if t != 1 or not torch.all(image_grid_thw == image_grid_thw[0]):
            raise ValueError("only batches of same-size still images are supported")
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        batch = pixel_values.shape[0] // (h * w)
        x = pixel_values.reshape(batch, h // m, w // m, m, m, -1, tp, p, p)[:, :, :, :, :, :, 0]
        # (B, gh/m, gw/m, mh, mw, C, ph, pw) -> (B, C, gh/m, mh, ph, gw/m, mw, pw)
        x = x.permute(0, 5, 1, 3, 6, 2, 4, 7)
        return x.reshape(batch, x.shape[1], h * p, w * p)

    def images_to_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) processed pixels -> (pixel_values (B*h*w, C*T*P*P), image_grid_thw
        (B, 3)): the inverse of `patches_to_images`, as the image processor lays them out."""
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        batch, channels, height, width = images.shape
        h, w = height // p, width // p
        x = images.reshape(batch, channels, h // m, m, p, w // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, mh, mw, C, ph, pw)
        x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], tp, p, p)
        pixel_values = x.reshape(batch * h * w, channels * tp * p * p)
        grid = torch.tensor([[1, h, w]] * batch, dtype=torch.long, device=images.device)
        return pixel_values, grid

    def image_tensor(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.patches_to_images(inputs["pixel_values"], inputs["image_grid_thw"])

    def image_entries(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixel_values, grid = self.images_to_patches(images)
        return {"pixel_values": pixel_values, "image_grid_thw": grid}

    def _check_visual_block(self, ids: torch.Tensor, visual: torch.Tensor,
                            grid: tuple[int, int]) -> None:
        config = self.model.config
        if len(visual) != grid[0] * grid[1]:
            raise ValueError(f"{len(visual)} image tokens for an LLM grid of {grid}")
        first, last = int(visual[0]), int(visual[-1])
        if (last - first + 1 != len(visual)
                or int(ids[first - 1]) != config.vision_start_token_id
                or int(ids[last + 1]) != config.vision_end_token_id):
            raise ValueError("image tokens are not one block between vision start and end")
