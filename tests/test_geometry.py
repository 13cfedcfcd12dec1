"""Non-square images, per model family: the grid, the region of the image it covers
(`visual_box`), and that heatmaps land on that region.

Families: the embedded LLaVA (model_store; CLIP: shortest edge + centre crop), tiny Qwen2.5-VL
(whole image resized to multiples of 14 px here, 28 px for the real model; non-square grid) and
tiny PaliGemma (SigLIP: whole image squashed to a square). The checks read the processed pixels
the model actually gets (`adapter.image_tensor`), undo the processor's rescale/normalize, and
compare each grid cell with the image region `visual_box` says it covers.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_attribution import heatmaps
from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.engine import Explainer
from lvlm_attribution.models.tiny import build_tiny
from lvlm_attribution.schema import ExplainOptions
from lvlm_attribution.service.config import ServiceConfig
from lvlm_attribution.service.response import full_response
from lvlm_attribution.service.validation import validate

QUESTION = "what color is the circle ?"
ANSWER = "the circle is red"
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SIZE = (96, 64)  # (width, height)
# family -> (grid, visual_box) for a 96x64 image
EXPECTED = {
    "embedded-llava": ((8, 8), (16.0, 0.0, 80.0, 64.0)),  # the central 64x64 square
    "qwen2_5_vl": ((3, 4), (0.0, 0.0, 96.0, 64.0)),  # resized to 56x42: 3x4 merged tokens
    "paligemma": ((4, 4), (0.0, 0.0, 96.0, 64.0)),  # squashed to 32x32
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def family(request, embedded_dir) -> tuple[str, Explainer]:
    if request.param == "embedded-llava":
        return request.param, Explainer.from_pretrained(embedded_dir)
    model, processor = build_tiny(request.param)
    return request.param, Explainer(model, processor, f"tiny-{request.param}", "random")


def encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def ramp(size: tuple[int, int]) -> Image.Image:
    """Red rises with x, green with y: each pixel's colour says where it is."""
    width, height = size
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.rint(np.stack([x, y, np.full_like(x, 128)], -1)).astype(np.uint8))


def split_box(size: tuple[int, int], box: tuple[float, ...]) -> Image.Image:
    """Green outside `box`, the box's left half red, its right half blue."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:] = GREEN
    left, top, right, bottom = (round(v) for v in box)
    middle = (left + right) // 2
    arr[top:bottom, left:middle], arr[top:bottom, middle:right] = RED, BLUE
    return Image.fromarray(arr)


def processed_rgb(explainer: Explainer, prompt) -> np.ndarray:
    """(H, W, 3) in 0..255: the pixels the vision tower gets, rescale/normalize undone."""
    proc = explainer.adapter.processor.image_processor
    x = explainer.adapter.image_tensor(prompt.model_inputs)[0].double()
    mean = torch.tensor(proc.image_mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(proc.image_std, dtype=torch.float64)[:, None, None]
    return ((x * std + mean) / proc.rescale_factor).permute(1, 2, 0).numpy()


def cells(pixels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h, w, 3): the processed pixel at the centre of each grid cell."""
    height, width = pixels.shape[:2]
    assert height % grid[0] == 0 and width % grid[1] == 0, "the grid tiles the processed image"
    ch, cw = height // grid[0], width // grid[1]
    return pixels[ch // 2 :: ch, cw // 2 :: cw][: grid[0], : grid[1]]


# ---- grid and box ------------------------------------------------------------------------------
def test_grid_and_visual_box(family) -> None:
    name, explainer = family
    prompt = explainer.prepare(ramp(SIZE), QUESTION)
    assert (prompt.grid, prompt.grid_box) == EXPECTED[name]
    assert prompt.image_size == SIZE
    if name == "qwen2_5_vl":
        assert prompt.extras["resized_size"] == (56, 42)  # the aspect ratio changes a little


def test_portrait_llava_crops_the_central_square(embedded_explainer) -> None:
    prompt = embedded_explainer.prepare(ramp((64, 96)), QUESTION)
    assert (prompt.grid, prompt.grid_box) == ((8, 8), (0.0, 16.0, 64.0, 80.0))


def test_every_method_explains_a_non_square_image(family) -> None:
    name, explainer = family
    grid, box = EXPECTED[name]
    methods = tuple(explainer.available_methods())
    result = explainer.explain(ramp(SIZE), QUESTION, answer=ANSWER,
                               options=ExplainOptions(methods=methods))
    assert set(result.methods) == set(methods) and len(methods) >= 8
    for method, out in result.methods.items():
        assert out.visual_map.shape == grid, method
        assert np.isfinite(out.visual_map).all(), method
    assert result.grid == grid and result.visual_box == box
    assert result.to_dict()["visualBox"] == list(box)


# ---- the grid sees what the box says -----------------------------------------------------------
def test_each_cell_sees_the_image_where_the_box_puts_it(family) -> None:
    """Cell (i, j)'s processed colour is the ramp's colour at the cell's centre in the box."""
    name, explainer = family
    grid, (left, top, right, bottom) = EXPECTED[name]
    prompt = explainer.prepare(ramp(SIZE), QUESTION)
    seen = cells(processed_rgb(explainer, prompt), grid)
    # centres of the cells in image pixels, and the ramp's value there (pixel k has value
    # 255 k / (n - 1), centred at k + 0.5)
    xs = left + (np.arange(grid[1]) + 0.5) * (right - left) / grid[1]
    ys = top + (np.arange(grid[0]) + 0.5) * (bottom - top) / grid[0]
    red = (xs - 0.5) * 255 / (SIZE[0] - 1)
    green = (ys - 0.5) * 255 / (SIZE[1] - 1)
    assert np.abs(seen[..., 0] - red[None, :]).max() < 6  # a pixel is 2.7 levels wide
    assert np.abs(seen[..., 1] - green[:, None]).max() < 6


def test_left_half_of_the_grid_is_the_left_half_of_the_box(family) -> None:
    name, explainer = family
    grid, box = EXPECTED[name]
    prompt = explainer.prepare(split_box(SIZE, box), QUESTION)
    pixels = processed_rgb(explainer, prompt)
    seen = cells(pixels, grid)
    half = grid[1] // 2
    assert np.abs(seen[:, :half] - RED).max() < 12
    assert np.abs(seen[:, half:] - BLUE).max() < 12
    assert pixels[..., 1].max() < 40, "nothing outside the box reaches the model"


# ---- heatmaps land on the box -----------------------------------------------------------------
def test_overlay_of_a_left_column_map_is_hot_only_in_the_box_left_part(family) -> None:
    name, explainer = family
    grid, box = EXPECTED[name]
    image = Image.new("RGB", SIZE, (200, 200, 200))
    values = np.zeros(grid, dtype=np.float32)
    values[:, 0] = 1.0
    out = np.asarray(Image.open(io.BytesIO(heatmaps.overlay_png(image, values, box=box))))
    out = out.astype(int)
    assert out.shape == (SIZE[1], SIZE[0], 3)
    left, right = round(box[0]), round(box[2])
    cell = (right - left) / grid[1]
    cold = np.rint(0.5 * 200 + 0.5 * heatmaps.colormap(np.zeros(1))[0]).astype(int)
    distance = np.abs(out - cold).sum(-1)  # (H, W)
    assert (distance[:, left : left + int(cell)] > 60).all(), "the left column is hot"
    assert (distance[:, left + int(np.ceil(1.5 * cell)) : right] <= 3).all(), "the rest is cold"
    dimmed = 200 * (1 - heatmaps.DIM_WEIGHT) + 128 * heatmaps.DIM_WEIGHT
    outside = np.concatenate([out[:, :left], out[:, right:]], axis=1)
    assert outside.size == 0 or np.abs(outside - dimmed).max() <= 1, "the unseen part is dimmed"


def test_overlay_longer_side_is_capped() -> None:
    values = np.zeros((8, 8), dtype=np.float32)
    values[:, 0] = 1.0

    def rendered(size, box=None, max_side=1024) -> np.ndarray:
        png = heatmaps.overlay_png(Image.new("RGB", size, (200, 200, 200)), values, box=box,
                                   max_side=max_side)
        return np.asarray(Image.open(io.BytesIO(png))).astype(int)

    assert rendered((2000, 2000)).shape == (1024, 1024, 3)
    assert rendered((300, 2000)).shape == (1024, 154, 3)
    assert rendered((100, 50)).shape == (50, 100, 3), "never enlarged"
    # a centre-crop box scales with the picture: (500, 0, 1500, 1000) -> (256, 0, 768, 512)
    out = rendered((2000, 1000), box=(500.0, 0.0, 1500.0, 1000.0))
    assert out.shape == (512, 1024, 3)
    dimmed = round(200 * (1 - heatmaps.DIM_WEIGHT) + 128 * heatmaps.DIM_WEIGHT)
    assert (out[:, :256] == dimmed).all() and (out[:, 768:] == dimmed).all()
    assert (np.abs(out[:, 256:290] - dimmed).sum(-1) > 60).all()


def test_response_carries_the_box_and_a_capped_overlay(embedded_explainer) -> None:
    cfg = ServiceConfig()
    for size, box in [(SIZE, (16, 0, 80, 64)), ((2000, 1000), (500, 0, 1500, 1000))]:
        req = pb.ExplainRequest(image=encode(ramp(size)), question=QUESTION, answer=ANSWER,
                                methods=["glimpse"], heatmaps=pb.HeatmapOptions(overlay=True))
        job = validate(req, cfg, embedded_explainer.available_methods())
        expl = embedded_explainer.explain(job.image, job.question, answer=job.answer,
                                          options=job.options)
        msg = full_response(job, expl, audit=True)
        b = msg.visual_box
        assert (b.left, b.top, b.right, b.bottom) == box
        overlay = Image.open(io.BytesIO(msg.heatmaps[0].overlay_png))
        assert max(overlay.size) <= cfg.max_overlay_side
        assert overlay.size[0] / overlay.size[1] == size[0] / size[1]
