"""Image-space perturbation tools shared by LLR token selection, iGOS++ and the evaluation metrics.

Notation (DESIGN §3, papers 002/003):
  I            the image as received (PIL), Ĩ its baseline (blurred, zero or noise)
  pv, pṽ       their processed pixel values, (1, C, H, W), from the model's own image processor
  M            a mask in [0, 1] at processed resolution, (B, 1, H, W); 1 = keep the image
  φ(M)         composite pv·M + pṽ·(1 − M)                                          (Eq 7)
  ln p(y_t|·)  teacher-forced log-probability of answer token y_t, read at row t − 1

Compositing happens in processed pixel space. That is exact for LLaVA-style processors: resize,
rescale and normalize are linear maps applied channel-wise, so processing a pixel-space composite
equals compositing the processed images (up to the processor's uint8 rounding of resized images).
Families whose processor flattens patches (Qwen2.5-VL: pixel_values (num_patches, C·T·P·P)) are
handled by the adapter: `adapter.image_tensor` turns their inputs into (B, C, H, W) processed
pixels and `adapter.image_entries` turns a batch back (exact re-arrangements); `composite` refuses
anything but (B, C, H, W) rather than silently mis-compositing.

Blur baseline: the official code (bytedance/LVLM_Interpretation, `cv2.GaussianBlur` on the uint8
image, `np.asarray(PIL image)`) picks the kernel size by image width (101 / 201 / 301 / 501 for
width < 500 / ≥ 500 / ≥ 800 / ≥ 2000) and sets σ = kernel − 1. We implement the same blur as a
separable convolution with cv2's default border rule (BORDER_REFLECT_101, "dcb|abcd|cba") and
cv2's Gaussian taps, in float64, rounded back to uint8. This is the ONE blur of the project: the
engine (LLR, iGOS++) and the evaluation (deletion/insertion baseline) both use `blur_baseline`.
For small images (the embedded model's 64 px) the 101-tap kernel is wider than the image.
Reflect-101 indexing is computed modulo the period 2·(n − 1), so it stays defined (and equals
what cv2 does) even then; with σ = 100 the result is close to a flat image of the mean colour —
i.e. no spatial information, which is the baseline's purpose. Kernel size 1 is the identity (cv2
copies the image; σ is then irrelevant).

Measured against opencv-python-headless 4.12 and 5.0 (tests/test_llr_igos.py repeats it when cv2
is importable; cv2 is not a dependency): cv2's float path (`GaussianBlur` of a float64 image)
equals `blur_array` to ≤ 4e-13 for every size tried (1×1 … 300×800, odd sizes, kernels 3 … 301,
kernel wider than the image). cv2's uint8 path — the one the official code runs — is a bit-exact
fixed-point implementation whose taps are quantized to multiples of 1/256 (for k = 101, σ = 100
the exact taps 0.0091 … 0.0103 become 2/256 or 3/256 by error diffusion), so it is not the exact
Gaussian. Against our rounded float64 result: world scenes (64×64): ≤ 1 grey level, 6 % of the
values; uniform-noise images of 64 px and more: ≤ 2, 13–23 % of the values; images much narrower
than the kernel, where the folded taps' quantization errors add up: ≤ 3 at 10×10, ≤ 8 at 5×3.
Downstream, on 48 world scenes with the embedded model, LLR with cv2's uint8 blur instead of
ours moves by ≤ 0.023 and selects the same tokens everywhere. We keep the exact Gaussian (the
formula of the paper and of the official call); reproducing cv2's fixed-point rounding would
need its kernel quantization, not just its formula.

Batched scoring: `answer_logprobs` runs ONE forward over a batch of images sharing the same
teacher-forced text, and projects only the needed predicting rows through the LM head via
transformers' `logits_to_keep` (a 1-D index tensor), which every *ForConditionalGeneration in
transformers ≥ 4.50 accepts; no adapter change was needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .context import AttributionContext

# (min width, kernel size), checked top-down: the official rule.
BLUR_KERNEL_RULE: tuple[tuple[int, int], ...] = ((2000, 501), (800, 301), (500, 201), (0, 101))
BASELINES = ("blur", "zero", "noise")


# ---- baselines (Ĩ) -----------------------------------------------------------------------------
def blur_kernel_size(width: int) -> int:
    """Official kernel rule: 101 / 201 / 301 / 501 for width < 500 / ≥ 500 / ≥ 800 / ≥ 2000."""
    for min_width, ksize in BLUR_KERNEL_RULE:
        if width >= min_width:
            return ksize
    raise ValueError(f"invalid width {width}")


def gaussian_kernel_1d(ksize: int, sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel for σ > 0: exp(−(i − (k−1)/2)² / (2σ²)), normalized to sum 1.

    ksize must be a positive odd integer (as in cv2); ksize 1 is the identity [1.0] for any σ
    (cv2.GaussianBlur copies the image). σ ≤ 0 with ksize > 1 is refused: cv2 would derive σ
    from ksize (and use fixed tables for ksize ≤ 7), which is not implemented here."""
    if int(ksize) != ksize or ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"blur kernel size must be a positive odd integer, got {ksize}")
    if ksize == 1:
        return np.ones(1, dtype=np.float64)
    if not sigma > 0:
        raise ValueError(f"blur sigma must be positive for kernel size {ksize}, got {sigma}")
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2.0
    k = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return k / k.sum()


def reflect101_index(idx: np.ndarray, n: int) -> np.ndarray:
    """cv2 BORDER_REFLECT_101 for any offset, also beyond one image width ("dcb|abcd|cba")."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


def blur_matrix(n: int, kernel: np.ndarray) -> np.ndarray:
    """(n, n) matrix B with (B @ x)[i] = Σ_j kernel[j] · x[reflect101(i + j − k//2)]: the 1-D
    convolution with cv2's border folded in (exact for any n, also when the kernel is wider)."""
    half = len(kernel) // 2
    rows = np.repeat(np.arange(n), len(kernel))
    cols = reflect101_index(rows + np.tile(np.arange(len(kernel)) - half, n), n)
    mat = np.zeros((n, n), dtype=np.float64)
    np.add.at(mat, (rows, cols), np.tile(kernel, n))
    return mat


DENSE_BLUR_MAX = 512  # sides up to this blur with the folded matrix; longer ones by FFT


def blur_array(arr: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W[, C]) array, reflect-101 border, float64 result.

    Per axis: the folded (n, n) matrix for short sides (exact for any kernel, also wider than
    the image), an FFT convolution of the reflect-101 padded axis for long ones — the dense
    matrix costs O(n²) per line (a 2000 px photo took a minute on 2 cores), the FFT O(n log n);
    both compute the same sums (to ~1e-12)."""
    kernel = gaussian_kernel_1d(ksize, sigma)
    x = arr.astype(np.float64)
    for axis in (1, 0):
        x = _blur_axis(x, kernel, axis)
    return x


def _blur_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    n = x.shape[axis]
    if n <= DENSE_BLUR_MAX:
        return np.moveaxis(np.tensordot(blur_matrix(n, kernel), np.moveaxis(x, axis, 0),
                                        axes=1), 0, axis)
    half = len(kernel) // 2
    padded = np.take(x, reflect101_index(np.arange(-half, n + half), n), axis=axis)
    size = padded.shape[axis] + len(kernel) - 1
    shape = [1] * x.ndim
    shape[axis] = -1
    spectrum = np.fft.rfft(padded, n=size, axis=axis) * np.fft.rfft(kernel, n=size).reshape(
        shape)
    full = np.fft.irfft(spectrum, n=size, axis=axis)
    return np.take(full, np.arange(len(kernel) - 1, len(kernel) - 1 + n), axis=axis)


def blur_baseline(image: Image.Image, ksize: int | None = None,
                  sigma: float | None = None) -> Image.Image:
    """Ĩ = GaussianBlur(I, ksize by width, σ = ksize − 1), as the official code does it; uint8
    RGB, same size. The evaluation's baseline too (`np.asarray(blur_baseline(pil))`)."""
    rgb = np.asarray(image.convert("RGB"))
    ksize = blur_kernel_size(image.width) if ksize is None else int(ksize)
    sigma = float(ksize - 1) if sigma is None else sigma
    out = blur_array(rgb, ksize, sigma)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def zero_baseline(image: Image.Image) -> Image.Image:
    """All-zero (black) image of the same size; processed like any image (ablation, paper 002)."""
    return Image.new("RGB", image.size, (0, 0, 0))


def noise_baseline(image: Image.Image, seed: int = 0) -> Image.Image:
    """Uniform noise in [0, 255], seeded (ablation, paper 002)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(image.height, image.width, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def make_baseline(image: Image.Image, kind: str = "blur", seed: int = 0) -> Image.Image:
    if kind == "blur":
        return blur_baseline(image)
    if kind == "zero":
        return zero_baseline(image)
    if kind == "noise":
        return noise_baseline(image, seed)
    raise ValueError(f"unknown baseline {kind!r}; known: {BASELINES}")


# ---- processed pixel space -----------------------------------------------------------------------
def source_image(ctx: AttributionContext) -> Image.Image:
    """The image being explained. Uses `prompt.extras["image"]` when the adapter kept it; else
    inverts the processor's rescale/normalize on the processed pixels (exact up to uint8
    rounding for LLaVA at its own resolution; the blur kernel is then chosen by the processed
    width instead of the received width — documented in docs/methods/igos.md)."""
    kept = ctx.prompt.extras.get("image")
    if isinstance(kept, Image.Image):
        return kept
    pv = ctx.prompt.model_inputs["pixel_values"]
    if pv.dim() != 4:
        raise NotImplementedError("cannot reconstruct an image from flattened-patch pixel values; "
                                  "the adapter must keep the image in prompt.extras['image']")
    proc = _image_processor(ctx)
    x = pv[0].detach().double().cpu()
    if getattr(proc, "do_normalize", False):
        mean = torch.tensor(proc.image_mean, dtype=torch.float64)[:, None, None]
        std = torch.tensor(proc.image_std, dtype=torch.float64)[:, None, None]
        x = x * std + mean
    if getattr(proc, "do_rescale", False):
        x = x / proc.rescale_factor
    arr = x.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def _image_processor(ctx: AttributionContext) -> Any:
    return getattr(ctx.adapter.processor, "image_processor", ctx.adapter.processor)


def image_inputs_for(ctx: AttributionContext, image: Image.Image) -> dict[str, torch.Tensor]:
    """The model's image entries for `image`, through the model's own image processor and the
    adapter's `image_inputs` (so the family decides which entries carry the image)."""
    raw = _image_processor(ctx)(images=image.convert("RGB"), return_tensors="pt")
    dtype = ctx.inputs["pixel_values"].dtype
    out = {}
    for k, v in ctx.adapter.image_inputs(dict(raw)).items():
        v = v.to(ctx.device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def baseline_pixel_values(ctx: AttributionContext, kind: str = "blur",
                          seed: int = 0) -> torch.Tensor:
    """pṽ: processed pixel values of the baseline image, (1, C, H, W); cached on the context."""
    def compute() -> torch.Tensor:
        baseline = make_baseline(source_image(ctx), kind, seed)
        return ctx.adapter.image_tensor(image_inputs_for(ctx, baseline))
    return ctx.memo(("baseline_pixels", kind, seed), compute)


def composite(pv: torch.Tensor, pv_base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """φ(M) = pv·M + pṽ·(1 − M); mask (B, 1, H, W) broadcast over channels (Eq 7)."""
    if pv.dim() != 4:
        raise ValueError("compositing needs (B, C, H, W) processed pixels (adapter.image_tensor)")
    return pv * mask + pv_base * (1 - mask)


# ---- batched scorer ---------------------------------------------------------------------------
def batched_inputs(ctx: AttributionContext, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """ctx.inputs with the text repeated over the batch and the image entries replaced."""
    batch = pixel_values.shape[0]
    image_keys = set(ctx.adapter.image_inputs(ctx.inputs))
    inputs = {k: v.expand(batch, *v.shape[1:]) for k, v in ctx.inputs.items()
              if k not in image_keys}
    inputs.update(ctx.adapter.image_entries(pixel_values.to(ctx.inputs["pixel_values"].dtype)))
    return inputs


def batch_answer_logits(rows: Sequence[tuple[AttributionContext, torch.Tensor]]
                        ) -> list[torch.Tensor]:
    """(T_i, vocab) fp32 logits at the predicting rows of each (context, image) pair, no grad:
    each context's teacher-forced text with the given processed image (1, C, H, W). One forward
    per image size (right-padded text: every row sees exactly what it sees alone)."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    groups: dict[tuple, list[int]] = {}
    for i, (_, pv) in enumerate(rows):
        groups.setdefault(tuple(pv.shape), []).append(i)
    for members in groups.values():
        for i, logits in zip(members, _same_size_logits([rows[i] for i in members]),
                             strict=True):
            out[i] = logits
    return out


@torch.no_grad()
def _same_size_logits(rows: Sequence[tuple[AttributionContext, torch.Tensor]]
                      ) -> list[torch.Tensor]:
    contexts = [c for c, _ in rows]
    first = contexts[0]
    image_keys = set(first.adapter.image_inputs(first.inputs))
    text = [{k: v for k, v in c.inputs.items() if k not in image_keys} for c in contexts]
    inputs = first.adapter.batch_inputs(text, side="right")
    pixels = torch.cat([pv for _, pv in rows]).to(first.inputs["pixel_values"].dtype)
    inputs.update(first.adapter.image_entries(pixels))
    union = torch.unique(torch.cat([c.predict_rows for c in contexts]))
    logits = first.model(**inputs, logits_to_keep=union, use_cache=False).logits.float()
    return [logits[i, torch.searchsorted(union, c.predict_rows)]
            for i, c in enumerate(contexts)]


def answer_logprobs(ctx: AttributionContext, pixel_values: torch.Tensor,
                    positions: torch.Tensor | list[int] | None = None) -> torch.Tensor:
    """(B, T') ln p(y_t | image_b, prompt, y_<t) for t in `positions` (all answer tokens if None).

    One forward over the whole batch; the LM head is applied only at the predicting rows t − 1.
    Differentiable w.r.t. `pixel_values` when called under grad mode."""
    if positions is None:
        positions = torch.arange(ctx.num_answer_tokens, device=ctx.device)
    positions = torch.as_tensor(positions, dtype=torch.long, device=ctx.device)
    rows = ctx.predict_rows[positions]
    targets = ctx.answer_ids_tensor[positions]
    out = ctx.model(**batched_inputs(ctx, pixel_values), logits_to_keep=rows, use_cache=False)
    logp = torch.log_softmax(out.logits.float(), dim=-1)  # (B, T', vocab)
    return logp.gather(2, targets[None, :, None].expand(logp.shape[0], -1, 1))[..., 0]
