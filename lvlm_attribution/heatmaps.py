"""Heatmap encodings for the wire: small at the patch grid, exact when asked, a picture on request.

- ``png_u8``  (default): 8-bit greyscale PNG at the patch grid. Values are min-max quantized:
  ``value = min + pixel / 255 * (max - min)`` (error <= (max - min) / 510). An 8x8 map is
  ~100 bytes, a 24x24 map ~600 bytes.
- ``f16_zlib``: zlib-compressed little-endian float16, row-major; exact up to float16.
- ``overlay_png``: the map upsampled bilinearly onto the region of the image the model saw
  (``visual_box``; a processor may crop), coloured with a perceptual colormap and blended on the
  image, the rest of the image dimmed; optionally downscaled to a longest side (RGB PNG) — for
  people, not for analysis.

No protobuf here: the service maps these names to the proto enum.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

ENCODINGS = ("png_u8", "f16_zlib")
# Overlays: the image outside the region the model saw is blended this much towards this grey.
DIM_GREY = (128, 128, 128)
DIM_WEIGHT = 0.65

# Control points of an "inferno"-like colormap (black -> purple -> orange -> pale yellow).
_CMAP_POINTS = np.array([
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
    [245, 125, 21], [250, 193, 39], [252, 255, 164],
], dtype=np.float64)


@dataclass(frozen=True)
class Encoded:
    """One encoded map and the value range needed to decode it."""

    data: bytes
    min_value: float
    max_value: float


def _as_grid(values: np.ndarray) -> np.ndarray:
    grid = np.asarray(values, dtype=np.float32)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"a heatmap must be a non-empty 2-D array, got shape {grid.shape}")
    if not np.isfinite(grid).all():
        raise ValueError("a heatmap must be finite")
    return grid


def encode(values: np.ndarray, encoding: str = "png_u8") -> Encoded:
    """Encode a (h, w) map; see the module docstring for the formats."""
    grid = _as_grid(values)
    lo, hi = float(grid.min()), float(grid.max())
    if encoding == "png_u8":
        scale = (grid - lo) / (hi - lo) if hi > lo else np.zeros_like(grid)
        pixels = np.rint(scale * 255.0).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG", optimize=True)
        return Encoded(buf.getvalue(), lo, hi)
    if encoding == "f16_zlib":
        raw = grid.astype("<f2").tobytes(order="C")
        return Encoded(zlib.compress(raw, 9), lo, hi)
    raise ValueError(f"unknown heatmap encoding {encoding!r}; expected one of {ENCODINGS}")


def decode(data: bytes, encoding: str, shape: tuple[int, int], min_value: float = 0.0,
           max_value: float = 1.0) -> np.ndarray:
    """Inverse of `encode` (float32 (h, w)); PNG values come back quantized to 256 levels."""
    if encoding == "png_u8":
        pixels = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)
        if pixels.shape != tuple(shape):
            raise ValueError(f"PNG is {pixels.shape}, expected {tuple(shape)}")
        return (min_value + pixels / 255.0 * (max_value - min_value)).astype(np.float32)
    if encoding == "f16_zlib":
        flat = np.frombuffer(zlib.decompress(data), dtype="<f2")
        return flat.reshape(shape).astype(np.float32)
    raise ValueError(f"unknown heatmap encoding {encoding!r}; expected one of {ENCODINGS}")


def colormap(unit: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 (..., 3)."""
    x = np.clip(unit, 0.0, 1.0) * (len(_CMAP_POINTS) - 1)
    stops = np.arange(len(_CMAP_POINTS))
    rgb = [np.interp(x, stops, _CMAP_POINTS[:, c]) for c in range(3)]
    return np.rint(np.stack(rgb, axis=-1)).astype(np.uint8)


def overlay_image(image: Image.Image, values: np.ndarray,
                  box: tuple[float, float, float, float] | None = None,
                  max_side: int | None = None, alpha: float = 0.5) -> Image.Image:
    """The map over the image (RGB): upsampled bilinearly into `box` (left, top, right, bottom
    in image pixels: the region the visual-token grid covers; None = the whole image),
    coloured and blended with weight `alpha`; outside the box the image is shown dimmed, since
    the model never saw it. With `max_side` the image is first downscaled so its longer side is
    at most that (never enlarged), which bounds the picture's size."""
    grid = _as_grid(values)
    base = image.convert("RGB")  # a copy: thumbnail works in place
    if max_side is not None:
        base.thumbnail((max_side, max_side), Image.LANCZOS)
    left, top, right, bottom = _pixel_box(box, image.size, base.size)
    out = base if (left, top, right, bottom) == (0, 0, *base.size) else _dimmed(base)
    up = np.asarray(Image.fromarray(grid, mode="F").resize((right - left, bottom - top),
                                                           Image.BILINEAR))
    lo, hi = float(up.min()), float(up.max())
    unit = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    seen = np.asarray(base.crop((left, top, right, bottom)), dtype=np.float32)
    blended = (1.0 - alpha) * seen + alpha * colormap(unit).astype(np.float32)
    out.paste(Image.fromarray(np.rint(blended).astype(np.uint8), mode="RGB"), (left, top))
    return out


def overlay_png(image: Image.Image, values: np.ndarray,
                box: tuple[float, float, float, float] | None = None,
                max_side: int | None = None, alpha: float = 0.5) -> bytes:
    """`overlay_image` as an RGB PNG."""
    buf = io.BytesIO()
    overlay_image(image, values, box, max_side, alpha).save(buf, format="PNG")
    return buf.getvalue()


def scale_box(box: tuple[float, float, float, float] | None, size: tuple[int, int],
              shown: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """`box` in pixels of an image of `size`, in pixels of the same image resized to `shown`."""
    if box is None:
        return None
    sx, sy = shown[0] / size[0], shown[1] / size[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _pixel_box(box: tuple[float, float, float, float] | None, size: tuple[int, int],
               shown: tuple[int, int]) -> tuple[int, int, int, int]:
    """`scale_box` in whole pixels, clamped to the image and at least one pixel wide and high."""
    scaled = scale_box(box, size, shown)
    if scaled is None:
        return (0, 0, *shown)
    left = min(max(round(scaled[0]), 0), shown[0] - 1)
    top = min(max(round(scaled[1]), 0), shown[1] - 1)
    right = min(max(round(scaled[2]), left + 1), shown[0])
    bottom = min(max(round(scaled[3]), top + 1), shown[1])
    return left, top, right, bottom


def _dimmed(image: Image.Image) -> Image.Image:
    """The image faded towards grey: visibly the part the model did not see."""
    return Image.blend(image, Image.new("RGB", image.size, DIM_GREY), DIM_WEIGHT)
