"""Heatmap encodings for the wire: small at the patch grid, exact when asked, a picture on request.

- ``png_u8``  (default): 8-bit greyscale PNG at the patch grid. Values are min-max quantized:
  ``value = min + pixel / 255 * (max - min)`` (error <= (max - min) / 510). An 8x8 map is
  ~100 bytes, a 24x24 map ~600 bytes.
- ``f16_zlib``: zlib-compressed little-endian float16, row-major; exact up to float16.
- ``overlay_png``: the map upsampled bilinearly to the image's resolution, coloured with a
  perceptual colormap and blended on the image (RGB PNG) — for people, not for analysis.

No protobuf here: the service maps these names to the proto enum.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

ENCODINGS = ("png_u8", "f16_zlib")

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


def overlay_png(image: Image.Image, values: np.ndarray, alpha: float = 0.5) -> bytes:
    """RGB PNG of the map, upsampled to the image size and blended on it with weight `alpha`."""
    grid = _as_grid(values)
    width, height = image.size
    up = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BILINEAR))
    lo, hi = float(up.min()), float(up.max())
    unit = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1.0 - alpha) * base + alpha * colormap(unit).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.rint(blended).astype(np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
