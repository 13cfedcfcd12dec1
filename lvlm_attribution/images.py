"""Untrusted image bytes -> the RGB pixels a person sees: the one loader of every entry point.

The service (`service/validation.py`), the CLI (`explain --image`) and the audit tool all call
`load_image`, so a model, its heatmaps and the person reading them see the same pixels:

- **Limits before decoding**: the pixel count and the aspect ratio are read from the header and
  checked before any pixel is decoded; Pillow's decompression-bomb warning is an error.
- **Orientation**: the EXIF orientation tag is applied (a phone photo stored sideways is turned
  upright, as every viewer shows it); the returned image has no orientation tag left.
- **Colour**: every mode becomes 8-bit RGB. 16-bit greyscale is scaled to 8 bits (Pillow's own
  conversion clips it, turning anything above 255/65535 white); 32-bit integer and float
  greyscale are scaled too (see `_value_range`). Palette, 1-bit, greyscale and CMYK images go
  through Pillow's conversions.
- **Transparency** (RGBA, LA, PA, palette or greyscale with a transparent colour) is composited
  over **white**, the background a viewer shows a transparent image on; the model never sees the
  colour values hidden under alpha 0 (often black, sometimes leftovers of an edit).
- **Animations** (GIF, WebP): the first frame.

Errors are `ImageError`, whose message says what is wrong and which formats are accepted; it
never carries a Python repr (Pillow's "cannot identify image file <_io.BytesIO object at 0x…>").
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
BACKGROUND = (255, 255, 255)  # what transparent pixels become
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WIDE_GREY_MODES = (*_SIXTEEN_BIT_MODES, "I", "F")  # greyscale wider than 8 bits


class ImageError(ValueError):
    """Image bytes that cannot be served; `message` is safe to show to the sender."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def load_image(data: bytes, *, max_pixels: int, max_aspect_ratio: float,
               formats: Sequence[str] = IMAGE_FORMATS) -> Image.Image:
    """Decode `data` (one of `formats`) into an upright RGB image; see the module docstring."""
    accepted = describe_formats(formats)
    if not data:
        raise ImageError(f"is empty (expected {accepted} bytes)")
    image_format = "image"  # until the header names it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=tuple(formats))
            image_format = image.format or image_format
            _check_size(image.size, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"unsupported or corrupt image: not a {accepted} image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow's message names the sizes only (no repr).
        raise ImageError(f"rejected as a possible decompression bomb: {err}") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for corrupt data
        # Pillow's message is not passed on: some carry reprs of its internal objects.
        raise ImageError(f"unsupported or corrupt image: the {image_format} data is truncated or "
                         f"damaged (accepted formats: {accepted})") from None
    return to_rgb(image)


def _check_size(size: tuple[int, int], *, max_pixels: int, max_aspect_ratio: float) -> None:
    """Refuse a (width, height) above the pixel limit or more elongated than the ratio limit
    (a 20000x1 strip resized to a shortest edge of 336 would be gigapixels)."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"has no pixels ({width}x{height})")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageError(f"{width}x{height} = {pixels} pixels exceeds the limit of "
                         f"{max_pixels} pixels")
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ImageError(f"{width}x{height} has an aspect ratio of {ratio:.1f}:1, above the "
                         f"limit of {max_aspect_ratio:g}:1 (crop or pad it)")


def to_rgb(image: Image.Image) -> Image.Image:
    """An upright 8-bit RGB copy of a decoded image (EXIF orientation applied, wide greyscale
    scaled, transparency over white). Idempotent: an image it returned comes back unchanged."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not hide the pixels
        image = image.copy()
    if image.mode in _WIDE_GREY_MODES:
        image = _to_8bit(image)
    if image.has_transparency_data:
        image = _over_background(image)
    try:
        return image.convert("RGB")
    except ValueError:  # a colour mode Pillow cannot convert (e.g. LAB)
        raise ImageError(f"has an unsupported colour mode {image.mode}") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """Greyscale wider than 8 bits -> mode L, scaled linearly from its value range."""
    values = np.asarray(image, dtype=np.float64)
    lo, hi = _value_range(image.mode, values)
    unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")


def _value_range(mode: str, values: np.ndarray) -> tuple[float, float]:
    """The range that maps to black..white: 16-bit modes their full range (0..65535, as a viewer
    shows them); mode I usually carries 16-bit data (Pillow decodes some 16-bit files to it), so
    0..65535 when the values fit; float data 0..1 when it fits; otherwise the data's own min..max
    (the only range such an image defines)."""
    lo, hi = float(values.min()), float(values.max())
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and lo >= 0 and hi <= 65535):
        return 0.0, 65535.0
    if mode == "F" and lo >= 0 and hi <= 1:
        return 0.0, 1.0
    return lo, hi


def _over_background(image: Image.Image) -> Image.Image:
    """Composite an image with alpha (or a transparent colour) over `BACKGROUND`."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba)


def describe_formats(formats: Sequence[str] = IMAGE_FORMATS) -> str:
    """ "PNG, JPEG, WebP, BMP or GIF": the formats as an error message names them."""
    names = [{"WEBP": "WebP"}.get(f, f) for f in formats]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)
