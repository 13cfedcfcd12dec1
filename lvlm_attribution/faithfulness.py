"""A trust score on a map: its deletion and insertion AUC for the answer it explains.

The same scoring as `lvlm-attribution evaluate` (its `deletion_llr` / `insertion_llr` columns,
`evaluation.perturbation.deletion_insertion`): cells of the patch grid are switched, most
salient first, from the image to its blurred baseline (deletion) or back (insertion) in 50
steps; each composite is scored by the mean probability of the answer's LLR-selected tokens,
teacher-forced; the curves are normalised by the scores of the image and of the baseline, and
their area is the AUC. Low deletion AUC (the answer collapses when the marked cells go) and high
insertion AUC (it comes back with them) mean the map points at what the answer depends on.

Where a processor crops (LLaVA's centre crop), the map covers only `visual_box`: the curves are
computed on that region of the image, the region the model saw, so that every switched cell is
one the map speaks about. Cost: ~2 x steps images scored, batched (measured in docs/quality.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .context import AttributionContext
from .evaluation.perturbation import deletion_insertion, mean_token_probability
from .llr import select_for_context
from .perturbation import answer_logprobs, blur_baseline, image_inputs_for, source_image

STEPS = 50


class ImageScorer:
    """(B, H, W, 3) uint8 images -> (B, T) teacher-forced ln p(y_t | image) of the context's
    answer, through the model's own image processor; each distinct image is scored once."""

    def __init__(self, ctx: AttributionContext, batch_size: int = 32) -> None:
        self.ctx = ctx
        self.batch_size = batch_size
        self.cache: dict[bytes, np.ndarray] = {}
        self.forwards = 0
        self.images_scored = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        keys = [hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).digest()
                for im in images]
        todo: dict[bytes, np.ndarray] = {}
        for key, im in zip(keys, images, strict=True):
            if key not in self.cache and key not in todo:
                todo[key] = im
        pending = list(todo.items())
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start:start + self.batch_size]
            pixels = torch.cat([self.ctx.adapter.image_tensor(
                image_inputs_for(self.ctx, Image.fromarray(im))) for _, im in chunk])
            with torch.no_grad():
                logp = answer_logprobs(self.ctx, pixels).double().cpu().numpy()
            self.forwards += 1
            self.images_scored += len(chunk)
            for (key, _), row in zip(chunk, logp, strict=True):
                self.cache[key] = row
        return np.stack([self.cache[k] for k in keys])


@dataclass(frozen=True)
class Faithfulness:
    deletion_auc: float  # lower is better
    insertion_auc: float  # higher is better
    tokens: tuple[int, ...]  # the answer tokens scored (LLR-selected)


def seen_region(ctx: AttributionContext) -> np.ndarray:
    """The part of the received image the visual-token grid covers (uint8 (H, W, 3))."""
    image = source_image(ctx).convert("RGB")
    left, top, right, bottom = ctx.prompt.grid_box
    box = (round(left), round(top), round(right), round(bottom))
    if box != (0, 0, image.width, image.height):
        image = image.crop(box)
    return np.asarray(image)


def map_faithfulness(ctx: AttributionContext, visual_map: np.ndarray, scorer: ImageScorer,
                     steps: int = STEPS) -> Faithfulness:
    """Deletion and insertion AUC of `visual_map` (the grid) for the context's answer."""
    image = seen_region(ctx)
    baseline = np.asarray(blur_baseline(Image.fromarray(image)))
    tokens = select_for_context(ctx)[0].selected
    result = deletion_insertion(np.asarray(visual_map, dtype=np.float64), image, baseline,
                                lambda ims: mean_token_probability(scorer(ims), tokens),
                                steps=steps, batch_size=10_000)
    return Faithfulness(float(result["deletion_auc"]), float(result["insertion_auc"]),
                        tuple(int(t) for t in tokens))
