"""Heatmap encodings: sizes, exactness bounds, decoding, overlays."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lvlm_attribution import heatmaps


def _map(h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w)).astype(np.float32) * 3.0


def test_png_u8_round_trip_within_quantization_step() -> None:
    grid = _map()
    enc = heatmaps.encode(grid, "png_u8")
    assert enc.data.startswith(b"\x89PNG")
    assert enc.min_value == pytest.approx(grid.min()) and enc.max_value == pytest.approx(grid.max())
    back = heatmaps.decode(enc.data, "png_u8", grid.shape, enc.min_value, enc.max_value)
    step = (grid.max() - grid.min()) / 255
    assert np.abs(back - grid).max() <= step / 2 + 1e-6
    assert Image.open(io.BytesIO(enc.data)).size == (8, 8)


def test_png_u8_is_small_at_patch_grid() -> None:
    assert len(heatmaps.encode(_map(8, 8), "png_u8").data) < 300
    assert len(heatmaps.encode(_map(24, 24), "png_u8").data) < 2048


def test_f16_zlib_is_exact_to_float16() -> None:
    grid = _map(6, 5)
    enc = heatmaps.encode(grid, "f16_zlib")
    back = heatmaps.decode(enc.data, "f16_zlib", grid.shape)
    np.testing.assert_array_equal(back, grid.astype(np.float16).astype(np.float32))


def test_constant_map_encodes() -> None:
    enc = heatmaps.encode(np.full((4, 4), 2.0), "png_u8")
    back = heatmaps.decode(enc.data, "png_u8", (4, 4), enc.min_value, enc.max_value)
    np.testing.assert_allclose(back, 2.0)


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.zeros(5), np.array([[np.nan]])])
def test_rejects_bad_maps(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        heatmaps.encode(bad)


def test_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="unknown heatmap encoding"):
        heatmaps.encode(_map(), "jpeg")


def test_overlay_is_full_resolution_rgb() -> None:
    image = Image.new("RGB", (64, 48), (200, 200, 200))
    grid = np.zeros((6, 8), dtype=np.float32)
    grid[0, 0] = 1.0
    png = heatmaps.overlay_png(image, grid)
    out = Image.open(io.BytesIO(png))
    assert out.mode == "RGB" and out.size == (64, 48)
    pixels = np.asarray(out).astype(int)
    # the hot corner is coloured differently from the cold far corner
    assert np.abs(pixels[0, 0] - pixels[-1, -1]).sum() > 100


def test_colormap_endpoints() -> None:
    cm = heatmaps.colormap(np.array([0.0, 1.0]))
    assert cm.shape == (2, 3) and cm.dtype == np.uint8
    assert cm[0].sum() < cm[1].sum()
