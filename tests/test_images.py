"""`lvlm_attribution.images.load_image`: one loader, the pixels a person sees, safe messages.

Every case is real encoded bytes (Pillow writes them), decoded the way the service, the CLI and
the audit tool decode them."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lvlm_attribution import cli
from lvlm_attribution.audit.backends import LocalBackend
from lvlm_attribution.audit.runner import run_audit
from lvlm_attribution.images import ImageError, load_image, to_rgb
from lvlm_attribution.service.config import ServiceConfig
from lvlm_attribution.service.errors import InvalidRequest
from lvlm_attribution.service.validation import _image

LIMITS = {"max_pixels": 4_000_000, "max_aspect_ratio": 20.0}
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def pixels(data: bytes, **limits) -> np.ndarray:
    image = load_image(data, **{**LIMITS, **limits})
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue: orientation errors show as swapped or rotated halves."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2], arr[:, width // 2 :] = RED, BLUE
    return Image.fromarray(arr)


def exif_rotated_jpeg() -> bytes:
    """`halves()` as a camera stores it when held rotated: pixels turned 90°, EXIF
    orientation 6 ("rotate 90° clockwise to view")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(halves().transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=95)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over a few bytes of pixels (a bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I",
                                                                         zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# ---- colour modes ------------------------------------------------------------------------------
def test_16_bit_greyscale_keeps_its_grey_levels() -> None:
    levels = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(2, axis=0)
    data = encode(Image.fromarray(levels))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    # Pillow's own convert("RGB") clips at 255: everything but 0 would be white
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, 1, 0] == 255
    out = pixels(data)
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize(("values", "expected"), [
    (np.array([[0, 32768, 65535]], dtype=np.int32), [0, 128, 255]),  # mode I, 16-bit data
    (np.array([[-10, 0, 10]], dtype=np.int32), [0, 128, 255]),  # mode I, its own range
    (np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),  # mode F in 0..1
    (np.array([[2.0, 3.0, 4.0]], dtype=np.float32), [0, 128, 255]),  # mode F, its own range
])
def test_wide_greyscale_is_scaled_not_clipped(values: np.ndarray, expected: list[int]) -> None:
    out = np.asarray(to_rgb(Image.fromarray(values)))
    assert out[0, :, 0].tolist() == expected


def test_exif_orientation_gives_the_upright_pixels() -> None:
    data = exif_rotated_jpeg()
    assert Image.open(io.BytesIO(data)).size == (20, 40)  # as stored
    image = load_image(data, **LIMITS)
    assert image.size == (40, 20)
    out = np.asarray(image).astype(int)
    assert np.abs(out[10, 5] - RED).max() < 8 and np.abs(out[10, 35] - BLUE).max() < 8
    assert to_rgb(image).size == (40, 20), "the orientation is applied once"


def test_rgba_is_composited_over_white() -> None:
    arr = np.zeros((4, 4, 4), dtype=np.uint8)  # transparent black: hidden colour must not show
    arr[0, 0] = (255, 0, 0, 255)  # opaque red
    arr[0, 1] = (255, 0, 0, 128)  # half-transparent red
    out = pixels(encode(Image.fromarray(arr, "RGBA")))
    assert out[0, 0].tolist() == list(RED)
    assert out[0, 1].tolist() == [255, 127, 127]
    assert out[3, 3].tolist() == list(WHITE)


def test_greyscale_with_alpha_over_white() -> None:
    arr = np.zeros((4, 4, 2), dtype=np.uint8)
    arr[0, 0] = (0, 255)  # opaque black; the rest transparent
    out = pixels(encode(Image.fromarray(arr, "LA")))
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == list(WHITE)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_over_white(fmt: str) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)  # index 0 black (transparent), 1 red
    image.putpixel((0, 0), 1)
    out = pixels(encode(image, fmt, transparency=0))
    assert out[0, 0].tolist() == list(RED) and out[2, 2].tolist() == list(WHITE)


def test_palette_without_transparency() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, *BLUE] + [0] * 762)
    assert pixels(encode(image, "BMP"))[1, 1].tolist() == list(BLUE)


@pytest.mark.parametrize(("image", "fmt", "expected"), [
    (Image.new("1", (4, 4), 1), "PNG", WHITE),
    (Image.new("1", (4, 4), 0), "BMP", (0, 0, 0)),
    (Image.new("L", (4, 4), 100), "PNG", (100, 100, 100)),
    (Image.new("L", (4, 4), 100), "JPEG", (100, 100, 100)),
    (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", RED),  # CMYK red
    (Image.new("RGB", (4, 4), BLUE), "WEBP", BLUE),
])
def test_other_modes(image: Image.Image, fmt: str, expected: tuple[int, int, int]) -> None:
    assert np.abs(pixels(encode(image, fmt))[2, 2] - expected).max() <= 2


# ---- limits and messages ----------------------------------------------------------------------
def test_aspect_ratio_limit() -> None:
    assert load_image(encode(Image.new("RGB", (200, 10))), **LIMITS).size == (200, 10)  # 20:1
    for size in [(210, 10), (10, 210)]:
        with pytest.raises(ImageError) as err:
            load_image(encode(Image.new("RGB", size)), **LIMITS)
        assert err.value.message == (f"{size[0]}x{size[1]} has an aspect ratio of 21.0:1, "
                                     "above the limit of 20:1 (crop or pad it)")


def test_pixel_limit_is_checked_from_the_header() -> None:
    # No pixel data at all: it must be refused before decoding is attempted.
    with pytest.raises(ImageError, match=r"^3000x2000 = 6000000 pixels exceeds the limit of "
                                         r"4000000 pixels$"):
        load_image(header_only_png(3000, 2000), **LIMITS)


def test_decompression_bomb_guard() -> None:
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(header_only_png(100_000, 100_000), max_pixels=10**11, max_aspect_ratio=20)


@pytest.mark.parametrize(("data", "expected"), [
    (b"not an image at all", "unsupported or corrupt image: not a PNG, JPEG, WebP, BMP or GIF "
                             "image"),
    (b"GIF89a-not-really", "unsupported or corrupt image"),
    (encode(Image.new("RGB", (8, 8)), "TIFF"), "not a PNG, JPEG, WebP, BMP or GIF image"),
    (encode(Image.new("RGB", (64, 64)), "PNG")[:60], "the PNG data is truncated or damaged"),
    (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "data is truncated or damaged"),
    (b"", "is empty"),
])
def test_bad_data_messages_have_no_python_reprs(data: bytes, expected: str) -> None:
    with pytest.raises(ImageError) as err:
        load_image(data, **LIMITS)
    message = err.value.message
    assert expected in message
    assert "0x" not in message and "<" not in message and "object" not in message


def test_service_maps_image_errors_to_the_image_field() -> None:
    with pytest.raises(InvalidRequest) as err:
        _image(b"not an image at all", ServiceConfig())
    assert err.value.field == "image" and "PNG, JPEG, WebP, BMP or GIF" in err.value.message
    with pytest.raises(InvalidRequest, match="aspect ratio of 30.0:1, above the limit of 20:1"):
        _image(encode(Image.new("RGB", (300, 10))), ServiceConfig())
    assert _image(exif_rotated_jpeg(), ServiceConfig()).size == (40, 20)


# ---- every entry point sees the same pixels ------------------------------------------------------
def test_library_entry_point_converts_like_the_loader(random_llava_explainer) -> None:
    """A PIL image handed to the engine (16-bit, transparent, EXIF-rotated) gives the model the
    pixels `load_image` gives the same bytes."""
    arr = np.zeros((32, 48, 4), dtype=np.uint8)
    arr[:, :24] = (255, 0, 0, 255)  # right half transparent
    for data in (encode(Image.fromarray(arr, "RGBA")), exif_rotated_jpeg(),
                 encode(Image.fromarray(np.full((32, 48), 30000, dtype=np.uint16)))):
        given = random_llava_explainer.prepare(Image.open(io.BytesIO(data)), "what is it ?")
        loaded = random_llava_explainer.prepare(load_image(data, **LIMITS), "what is it ?")
        assert given.image_size == loaded.image_size
        assert np.array_equal(given.model_inputs["pixel_values"],
                              loaded.model_inputs["pixel_values"])


def test_cli_refuses_a_bad_image_with_a_plain_message(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    assert cli.main(["explain", "--image", str(bad), "--question", "what ?"]) == 2
    err = capsys.readouterr().err
    assert "unsupported or corrupt image" in err and "0x" not in err


def test_audit_loads_images_like_the_service(random_llava_explainer, tmp_path) -> None:
    (tmp_path / "rotated.jpg").write_bytes(exif_rotated_jpeg())
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    lines = [{"id": "rotated", "image": "rotated.jpg", "question": "what color is the circle ?",
              "answer": "red"},
             {"id": "broken", "image": "broken.png", "question": "what ?", "answer": "a"}]
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    backend = LocalBackend(random_llava_explainer, ("glimpse",))
    summary = run_audit(jsonl, tmp_path / "out", backend, progress=False)
    rows = {r["id"]: r for r in summary["items"]}
    assert rows["broken"]["error_kind"] == "image_unreadable"
    assert "unsupported or corrupt image" in rows["broken"]["error"]
    assert "0x" not in rows["broken"]["error"]
    record = json.loads((tmp_path / "out" / "items" / "rotated" / "record.json").read_text())
    assert record["record"]["imageSize"] == [40, 20]  # upright
    assert record["record"]["visualBox"] == [10.0, 0.0, 30.0, 20.0]  # LLaVA: central square
